"""Tests of patchknn.metrics against scikit-learn, brute force and naive reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from sklearn import metrics as skm

from patchknn import metrics as M
from patchknn.errors import ConfigError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- references ---------------------------------------------------------------------------------


def naive_pro_points(maps: np.ndarray, masks: np.ndarray) -> tuple[list[float], list[float]]:
    """(FPR, PRO) at every distinct threshold, by looping over thresholds and regions."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks) > 0
    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions += [(index, labelled == k) for k in range(1, count + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append((predicted & normal).sum() / normal.sum())
        pros.append(float(np.mean([(predicted[i] & region).sum() / region.sum() for i, region in regions])))
    fprs.append(1.0)
    pros.append(1.0)
    return fprs, pros


def area_up_to(xs: list[float], ys: list[float], limit: float) -> float:
    """Area under the polyline through (xs, ys) from its start to x = limit."""
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
    return area


def naive_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    fprs, pros = naive_pro_points(maps, masks)
    return area_up_to(fprs, pros, limit) / limit


def brute_force_f1(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """Best F1 over every distinct score as threshold; ties go to the highest threshold."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    targets = np.asarray(targets).ravel() > 0
    best = (-1.0, math.nan)
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        tp = np.sum(predicted & targets)
        f1 = 2 * tp / (2 * tp + np.sum(predicted & ~targets) + np.sum(~predicted & targets))
        if f1 > best[0]:
            best = (float(f1), float(threshold))
    return best


def random_case(seed: int, shape=(5, 12, 12), levels: int | None = 7, blobs: int = 4):
    """Maps with many ties (``levels`` distinct values) and blob-shaped masks, half the images good."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    masks = np.zeros(shape, dtype=bool)
    for index in range(0, n, 2):
        for _ in range(blobs):
            r, c = rng.integers(0, h), rng.integers(0, w)
            masks[index, r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = True
    maps = rng.random(shape) + 0.6 * masks * rng.random(shape)
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps, masks


pixel_data = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)).flatmap(
    lambda shape: st.tuples(
        hnp.arrays(np.float64, shape, elements=st.integers(0, 4).map(float)),
        hnp.arrays(np.bool_, shape),
    )
)


# -- agreement with scikit-learn ----------------------------------------------------------------


@FAST
@given(pixel_data)
def test_auprc_auroc_match_sklearn_on_ties(data):
    maps, masks = data
    y, s = masks.ravel(), maps.ravel()
    if y.any():
        assert M.pixel_auprc(maps, masks) == pytest.approx(skm.average_precision_score(y, s), abs=1e-9)
    if y.any() and not y.all():
        assert M.pixel_auroc(maps, masks) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_metrics_match_sklearn_on_random_maps(seed, dtype):
    maps, masks = random_case(seed, shape=(6, 20, 20), levels=None if seed % 2 else 9)
    maps = maps.astype(dtype)
    y, s = masks.ravel(), maps.ravel()
    assert M.pixel_auprc(maps, masks) == pytest.approx(skm.average_precision_score(y, s), abs=1e-9)
    assert M.pixel_auroc(maps, masks) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)


@FAST
@given(
    st.integers(2, 30).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.float64, n, elements=st.floats(-3, 3, allow_nan=False, width=16)),
            hnp.arrays(np.int64, n, elements=st.integers(0, 1)),
        )
    )
)
def test_image_auroc_matches_sklearn(data):
    scores, labels = data
    if 0 < labels.sum() < labels.size:
        assert M.image_auroc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    else:
        with pytest.raises(ConfigError, match="undefined"):
            M.image_auroc(scores, labels)


def test_uint8_masks_0_255_equal_bool_masks():
    maps, masks = random_case(1)
    as_uint8 = masks.astype(np.uint8) * 255
    assert M.pixel_auprc(maps, as_uint8) == M.pixel_auprc(maps, masks)
    assert M.pixel_auroc(maps, as_uint8) == M.pixel_auroc(maps, masks)
    assert M.aupro(maps, as_uint8) == M.aupro(maps, masks)


def test_single_two_dimensional_map_is_one_image():
    maps, masks = random_case(2, shape=(1, 10, 10))
    assert M.pixel_auprc(maps[0], masks[0]) == M.pixel_auprc(maps, masks)
    assert M.aupro(maps[0], masks[0]) == M.aupro(maps, masks)


def test_float16_maps_are_accepted():
    maps, masks = random_case(3)
    half = maps.astype(np.float16)
    expected = skm.average_precision_score(masks.ravel(), half.astype(np.float64).ravel())
    assert M.pixel_auprc(half, masks) == pytest.approx(expected, abs=1e-9)


# -- perfect, inverted and constant maps ----------------------------------------------------


def test_perfect_maps():
    _, masks = random_case(4)
    maps = masks.astype(np.float32) + 0.1 * np.random.default_rng(0).random(masks.shape)
    assert M.pixel_auprc(maps, masks) == 1.0
    assert M.pixel_auroc(maps, masks) == 1.0
    assert M.aupro(maps, masks) == pytest.approx(1.0, abs=1e-12)
    assert M.pixel_f1_max(maps, masks)[0] == 1.0
    assert M.image_auroc([0.1, 0.9], [0, 1]) == 1.0


def test_inverted_maps():
    _, masks = random_case(5)
    maps = -masks.astype(np.float64)
    assert M.pixel_auroc(maps, masks) == 0.0
    assert M.aupro(maps, masks) == 0.0
    assert M.pixel_auprc(maps, masks) == pytest.approx(
        skm.average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12
    )
    assert M.image_auroc([0.9, 0.1], [0, 1]) == 0.0


def test_constant_maps():
    _, masks = random_case(6)
    maps = np.zeros(masks.shape)
    assert M.pixel_auroc(maps, masks) == 0.5
    assert M.pixel_auprc(maps, masks) == pytest.approx(masks.mean(), abs=1e-12)
    # One threshold only: every pixel predicted defective, FPR jumps from 0 to 1 with PRO 0 -> 1.
    assert M.aupro(maps, masks) == pytest.approx(0.15, abs=1e-12)
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


# -- AUPRO ----------------------------------------------------------------------------------------


def two_regions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 2x2 and a 5x5 region in one 12x12 image, and normal pixels with distinct scores in (0, 1)."""
    masks = np.zeros((1, 12, 12), dtype=bool)
    small, large = np.zeros_like(masks), np.zeros_like(masks)
    small[0, 1:3, 1:3] = True
    large[0, 5:10, 5:10] = True
    masks = small | large
    normal_scores = np.linspace(0.01, 0.99, masks.size).reshape(masks.shape)
    return np.where(masks, 0.0, normal_scores), small, large


@pytest.mark.parametrize("which", ["small", "large"])
def test_aupro_map_detecting_one_of_two_regions_is_one_half(which):
    maps, small, large = two_regions()
    found, missed = (small, large) if which == "small" else (large, small)
    maps = np.where(found, 2.0, np.where(missed, -1.0, maps))
    assert M.aupro(maps, small | large) == pytest.approx(0.5, abs=1e-12)
    fpr, pro = M.pro_curve(maps, small | large, max_points=None)
    low = (fpr > 0) & (fpr < 1)
    assert np.all(pro[low] == pytest.approx(0.5, abs=1e-12))
    assert M.pixel_f1_max(maps, small | large) == pytest.approx(brute_force_f1(maps, small | large))


def test_aupro_half_of_the_large_region_detected():
    maps, small, large = two_regions()
    half = large.copy()
    half[0, 5:10, 5:8] = False  # 10 of 25 pixels stay detected
    maps = np.where(small | half, 2.0, np.where(large, -1.0, maps))
    assert M.aupro(maps, small | large) == pytest.approx((1.0 + 10 / 25) / 2, abs=1e-12)


def test_aupro_hand_computed_interpolation():
    # Small region found above all normal pixels, large one at 0: PRO 0.5 from FPR 0 to 1, where it
    # jumps to 1; with every pixel of the large region tied at the lowest normal score instead the
    # last piece slopes from (1 - 1/n, 0.5) to (1, 1).
    maps, small, large = two_regions()
    maps = np.where(small, 2.0, maps)
    masks = small | large
    n_normal = (~masks).sum()
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)
    maps = np.where(large, maps[~masks].min(), maps)
    expected = (0.5 * (1 - 1 / n_normal) + (0.5 + 1.0) / 2 / n_normal) / 1.0
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(expected, abs=1e-12)
    # Limit inside that last piece: interpolated PRO at the limit.
    limit = 1 - 0.5 / n_normal
    expected = (0.5 * (1 - 1 / n_normal) + (0.5 + 0.75) / 2 * 0.5 / n_normal) / limit
    assert M.aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


def test_aupro_regions_are_8_connected_within_an_image_only():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 1:3, 1:3] = True  # touches (0, 0) diagonally only: one region of 5 pixels
    maps = np.linspace(0.0, 0.5, masks.size).reshape(masks.shape)
    maps[0, 0, 0] = 1.0  # only that single pixel is found
    assert M.aupro(maps[:1], masks[:1]) == pytest.approx(0.2, abs=1e-12)  # 4-connected would be 0.5
    # A region at the same place in the next image is a region of its own, though the pixels line
    # up: the single found pixel gives PRO (1 + 0) / 2, not 1 / 4 as one merged region would.
    masks[0, 1:3, 1:3] = False
    masks[1, 0, 0:3] = True
    maps[1, 0, 0:3] = 0.0
    assert M.aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.3, 0.05, 0.77, 1.0])
def test_aupro_matches_naive_threshold_loop(seed, limit):
    maps, masks = random_case(seed, shape=(3, 9, 9), levels=None if seed % 3 == 0 else 5)
    assert M.aupro(maps, masks, fpr_limit=limit) == pytest.approx(naive_aupro(maps, masks, limit), abs=1e-9)


@FAST
@given(pixel_data, st.sampled_from([0.3, 0.1, 1.0]))
def test_aupro_matches_naive_threshold_loop_property(data, limit):
    maps, masks = data
    if not masks.any() or masks.all():
        with pytest.raises(ConfigError, match="undefined"):
            M.aupro(maps, masks, fpr_limit=limit)
        return
    assert M.aupro(maps, masks, fpr_limit=limit) == pytest.approx(naive_aupro(maps, masks, limit), abs=1e-9)


def test_pro_curve_is_the_polyline_aupro_integrates():
    maps, masks = random_case(7, levels=4)
    fpr, pro = M.pro_curve(maps, masks, max_points=None)
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0)
    assert np.all(np.diff(pro) >= -1e-12)
    for limit in (0.3, 1.0):
        assert area_up_to(list(fpr), list(pro), limit) / limit == pytest.approx(M.aupro(maps, masks, limit))
    # Every vertex is a point of the naive curve.
    naive_fpr, naive_pro = (np.round(values, 9) for values in naive_pro_points(maps, masks))
    naive = set(zip(naive_fpr, naive_pro, strict=True))
    assert set(zip(np.round(fpr, 9), np.round(pro, 9), strict=True)) <= naive


def test_pro_curve_is_thinned_for_plots():
    maps, masks = random_case(8, shape=(4, 30, 30), levels=None)
    full_fpr, _ = M.pro_curve(maps, masks, max_points=None)
    assert full_fpr.size > 300
    fpr, pro = M.pro_curve(maps, masks, max_points=300)
    assert 100 < fpr.size <= 300
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0)


# -- F1 -------------------------------------------------------------------------------------------


@FAST
@given(pixel_data)
def test_pixel_f1_max_matches_brute_force(data):
    maps, masks = data
    if not masks.any():
        with pytest.raises(ConfigError, match="undefined"):
            M.pixel_f1_max(maps, masks)
        return
    f1, threshold = M.pixel_f1_max(maps, masks)
    expected_f1, expected_threshold = brute_force_f1(maps, masks)
    assert f1 == pytest.approx(expected_f1, abs=1e-12)
    assert threshold == expected_threshold


@pytest.mark.parametrize("seed", range(3))
def test_f1_max_matches_brute_force_on_random_maps(seed):
    maps, masks = random_case(seed, levels=None if seed else 11)
    f1, threshold = M.pixel_f1_max(maps, masks)
    assert (f1, threshold) == pytest.approx(brute_force_f1(maps, masks), abs=1e-12)
    predicted = maps >= threshold
    assert skm.f1_score(masks.ravel(), predicted.ravel()) == pytest.approx(f1, abs=1e-12)


def test_f1_optimal_threshold_returns_threshold_first():
    scores = np.array([0.2, 0.5, 0.5, 0.9, 0.1, 0.7])
    labels = np.array([0, 1, 0, 1, 0, 1])
    threshold, f1 = M.f1_optimal_threshold(scores, labels)
    assert (f1, threshold) == pytest.approx(brute_force_f1(scores, labels))
    assert threshold == 0.5
    assert f1 == pytest.approx(2 * 3 / (2 * 3 + 1))


# -- curves -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_curves_equal_sklearn_when_not_thinned(seed):
    maps, masks = random_case(seed, levels=None if seed == 2 else 6)
    y, s = masks.ravel(), maps.ravel()
    precision, recall, thresholds = M.precision_recall_curve(maps, masks, max_points=None)
    ref = skm.precision_recall_curve(y, s)
    for ours, theirs in zip((precision, recall, thresholds), ref, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    fpr, tpr, thresholds = M.roc_curve(maps, masks, max_points=None)
    ref = skm.roc_curve(y, s, drop_intermediate=False)
    for ours, theirs in zip((fpr, tpr, thresholds), ref, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_curves_are_thinned_to_max_points():
    maps, masks = random_case(9, shape=(4, 40, 40), levels=None)
    precision, recall, thresholds = M.precision_recall_curve(maps, masks, max_points=200)
    assert precision.size == recall.size == thresholds.size + 1 <= 200
    assert precision.size > 50
    assert np.all(np.diff(thresholds) > 0)
    assert (precision[-1], recall[-1], recall[0]) == (1.0, 0.0, 1.0)
    assert thresholds[0] == maps.min() and thresholds[-1] == maps.max()
    fpr, tpr, thresholds = M.roc_curve(maps, masks, max_points=200)
    assert fpr.size == tpr.size == thresholds.size <= 200
    assert fpr.size > 50
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1], thresholds[0]) == (0.0, 0.0, 1.0, 1.0, np.inf)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # Image scores work the same way; few points are never thinned.
    fpr, tpr, _ = M.roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]


# -- compute_all and undefined metrics --------------------------------------------------------


def test_compute_all_equals_the_single_functions():
    maps, masks = random_case(10)
    scores, labels = maps.max(axis=(1, 2)), masks.any(axis=(1, 2))
    result = M.compute_all(maps, masks, scores, labels, fpr_limit=0.2)
    assert tuple(result) == M.METRIC_KEYS
    f1, threshold = M.pixel_f1_max(maps, masks)
    image_threshold, image_f1 = M.f1_optimal_threshold(scores, labels)
    assert result == {
        "pixel_auprc": M.pixel_auprc(maps, masks),
        "pixel_auroc": M.pixel_auroc(maps, masks),
        "image_auroc": M.image_auroc(scores, labels),
        "aupro": M.aupro(maps, masks, fpr_limit=0.2),
        "pixel_f1_max": f1,
        "pixel_f1_threshold": threshold,
        "image_f1_max": image_f1,
        "image_f1_threshold": image_threshold,
    }
    assert all(type(value) is float for value in result.values())


def test_compute_all_reports_undefined_metrics_as_none():
    maps, masks = random_case(11)
    good = np.zeros_like(masks)
    result = M.compute_all(maps, good, maps.max(axis=(1, 2)), good.any(axis=(1, 2)))
    assert result == dict.fromkeys(M.METRIC_KEYS)

    everything_defective = np.ones_like(masks)
    result = M.compute_all(maps, everything_defective, [1.0] * len(maps), [1] * len(maps))
    assert result["pixel_auprc"] == 1.0 and result["pixel_f1_max"] == 1.0 and result["image_f1_max"] == 1.0
    assert result["pixel_auroc"] is None and result["aupro"] is None and result["image_auroc"] is None

    result = M.compute_all(None, None, [0.2, 0.4], [0, 1])
    assert result["image_auroc"] == 1.0
    assert all(result[key] is None for key in M.METRIC_KEYS if key.startswith(("pixel", "aupro")))
    result = M.compute_all(maps, masks, None, None)
    assert result["aupro"] is not None and result["image_auroc"] is None


@pytest.mark.parametrize(
    ("function", "args"),
    [
        (M.pixel_auprc, (np.ones((2, 3, 3)), np.zeros((2, 3, 3)))),
        (M.pixel_f1_max, (np.ones((2, 3, 3)), np.zeros((2, 3, 3)))),
        (M.pixel_auroc, (np.ones((2, 3, 3)), np.zeros((2, 3, 3)))),
        (M.pixel_auroc, (np.ones((2, 3, 3)), np.ones((2, 3, 3)))),
        (M.aupro, (np.ones((2, 3, 3)), np.zeros((2, 3, 3)))),
        (M.aupro, (np.ones((2, 3, 3)), np.ones((2, 3, 3)))),
        (M.pro_curve, (np.ones((2, 3, 3)), np.zeros((2, 3, 3)))),
        (M.image_auroc, ([0.1, 0.2], [1, 1])),
        (M.f1_optimal_threshold, ([0.1, 0.2], [0, 0])),
        (M.precision_recall_curve, ([0.1, 0.2], [0, 0])),
        (M.roc_curve, ([0.1, 0.2], [1, 1])),
    ],
)
def test_single_functions_raise_on_undefined_metrics(function, args):
    with pytest.raises(ConfigError, match="undefined"):
        function(*args)


# -- input validation -------------------------------------------------------------------------


PIXEL_FUNCTIONS = [M.pixel_auprc, M.pixel_auroc, M.aupro, M.pro_curve, M.pixel_f1_max]


@pytest.mark.parametrize("function", PIXEL_FUNCTIONS)
@pytest.mark.parametrize(
    ("maps", "masks", "message"),
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), "shape"),
        (np.zeros((2, 4, 4)), np.zeros((2, 16)), "shape"),
        (np.zeros((0, 4, 4)), np.zeros((0, 4, 4)), "empty"),
        (np.zeros((8,)), np.zeros((8,)), r"\(N, H, W\)"),
        (np.full((2, 4, 4), np.nan), np.zeros((2, 4, 4)), "NaN"),
        (np.where(np.eye(4, dtype=bool), np.inf, 0.0)[None], np.zeros((1, 4, 4)), "4 NaN or infinite"),
        (np.array([[["a", "b"]]]), np.zeros((1, 1, 2)), "dtype"),
        (np.zeros((1, 2, 2)), np.full((1, 2, 2), np.nan), "masks contains NaN"),
        (None, np.zeros((1, 2, 2)), "None"),
    ],
)
def test_pixel_input_validation(function, maps, masks, message):
    with pytest.raises(ConfigError, match=message):
        function(maps, masks)


def test_image_and_curve_input_validation():
    with pytest.raises(ConfigError, match="shape"):
        M.image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ConfigError, match="1-D"):
        M.image_auroc(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="empty"):
        M.f1_optimal_threshold([], [])
    with pytest.raises(ConfigError, match="NaN"):
        M.f1_optimal_threshold([0.1, float("nan")], [0, 1])
    with pytest.raises(ConfigError, match="shape"):
        M.roc_curve([0.1, 0.2], [[0, 1]])
    with pytest.raises(ConfigError, match="max_points"):
        M.precision_recall_curve([0.1, 0.2], [0, 1], max_points=1)
    with pytest.raises(ConfigError, match="numeric"):
        M.roc_curve([[0.1], [0.2, 0.3]], [0, 1])
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("limit", [0.0, -0.1, 1.5, float("nan"), "x"])
def test_fpr_limit_validation(limit):
    maps, masks = random_case(12)
    with pytest.raises(ConfigError, match="fpr_limit"):
        M.aupro(maps, masks, fpr_limit=limit)
    with pytest.raises(ConfigError, match="fpr_limit"):
        M.compute_all(maps, masks, None, None, fpr_limit=limit)


def test_compute_all_input_validation():
    maps, masks = random_case(13)
    with pytest.raises(ConfigError, match="same images"):
        M.compute_all(maps, masks, [0.1, 0.2], [0, 1])
    with pytest.raises(ConfigError, match="both maps and masks"):
        M.compute_all(maps, None, None, None)
    with pytest.raises(ConfigError, match="both scores and labels"):
        M.compute_all(None, None, [0.1], None)
    with pytest.raises(ConfigError, match="NaN"):
        M.compute_all(np.full(maps.shape, np.inf), masks, None, None)
