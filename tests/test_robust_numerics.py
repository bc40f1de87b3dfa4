"""Numerical corner cases: handled or refused clearly, never a silent NaN score (issue #7,
"Numerical safety"): constant images, a single training image, fewer patches than PCA dimensions,
NaN/Inf inputs, non-finite features (the final guard in predict).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from patchknn import ConfigError, ImageError, PatchKNN, PatchKNNError
from patchknn.reduction import PCA, MomentAccumulator

FAST = {"layers": ["layer1"], "image_size": 32, "grid_size": 8, "threshold_method": "none"}


def noise(seed: int, shape=(40, 36, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def assert_finite_predictions(preds) -> None:
    for p in preds:
        assert p.error is None, p.error
        assert p.anomaly_map.dtype == np.float32 and np.isfinite(p.anomaly_map).all()
        assert math.isfinite(p.score) and p.score >= 0.0


@pytest.fixture(scope="module")
def fast() -> PatchKNN:
    """A fitted FAST model whose backbone the other tests borrow (building it takes seconds)."""
    return tiny_model(**FAST).fit([noise(i) for i in range(3)])


def borrow(fast: PatchKNN, **options) -> PatchKNN:
    model = tiny_model(**{**FAST, **options})
    if model.config.resolved_layers == fast.config.resolved_layers:
        model._extractor = model._make_extractor(fast.extractor.backbone)  # its own grid, same network
    return model


# -------------------------------------------------------------------------------------------------
# constant images, tiny training sets
# -------------------------------------------------------------------------------------------------
def test_pca_of_identical_patches():
    acc = MomentAccumulator(5)
    acc.update(np.ones((10, 5), np.float32) * 3)
    pca = PCA.from_moments(acc, 0.95)
    assert pca.n_components == 1 and np.isfinite(pca.components).all()
    assert np.all(pca.explained_variance_ratio == 0)
    np.testing.assert_array_equal(pca.transform(np.ones((2, 5)) * 3).numpy(), np.zeros((2, 1)))


def test_pca_of_a_single_patch():
    acc = MomentAccumulator(4)
    acc.update(np.arange(4, dtype=np.float32)[None])
    pca = PCA.from_moments(acc, 0.95)
    assert pca.n_components == 1 and np.isfinite(pca.components).all()


@pytest.mark.parametrize("value", [0, 128, 255])
def test_constant_images(fast, value):
    const = np.full((40, 36, 3), value, np.uint8)
    model = borrow(fast).fit([const, const.copy()])
    preds = model.predict([const, noise(5), np.full((40, 36, 3), 255 - value, np.uint8)])
    assert_finite_predictions(preds)
    assert preds[0].score < 1e-2  # the training image itself: its patches are in the bank
    assert preds[1].score > preds[0].score


def test_all_identical_patches_bank_of_one(fast, tmp_path):
    """grid_size 1 and one constant image: a bank of one patch, zero variance, one PCA component."""
    model = borrow(fast, grid_size=1).fit([np.full((32, 32, 3), 7, np.uint8)])
    assert model.index_.size == 1 and model.fit_info_["n_components"] == 1
    preds = model.predict([np.full((32, 32, 3), 7, np.uint8), noise(1)])
    assert_finite_predictions(preds)
    assert preds[0].score < 1e-6
    loaded = PatchKNN.load(model.save(tmp_path / "m"), progress=False)
    again = loaded.predict([np.full((32, 32, 3), 7, np.uint8), noise(1)])
    np.testing.assert_array_equal(again[1].anomaly_map, preds[1].anomaly_map)
    with pytest.raises(ConfigError, match="larger than the memory bank"):
        borrow(fast, grid_size=1, k=2).fit([np.full((32, 32, 3), 7, np.uint8)])


def test_single_training_image_fewer_patches_than_dimensions(tmp_path):
    """Layers 1-3: 1792-dim patches, but one image gives only 64 of them: PCA keeps < 64 components."""
    model = tiny_model(threshold_method="none").fit([noise(0, (64, 64, 3))])
    info = model.fit_info_
    assert info["n_train_images"] == 1 and info["bank_size"] == 64 and info["feature_dim"] == 1792
    assert 1 <= info["n_components"] <= 63
    assert np.isfinite(model.pca_.components).all() and np.isfinite(model.index_.bank).all()
    preds = model.predict([noise(0, (64, 64, 3)), noise(9, (64, 64, 3))])
    assert_finite_predictions(preds)
    assert preds[0].score < 1e-2 < preds[1].score
    loaded = PatchKNN.load(model.save(tmp_path / "m"), progress=False)
    again = loaded.predict([noise(0, (64, 64, 3)), noise(9, (64, 64, 3))])  # same batch: same bits
    np.testing.assert_array_equal(again[1].anomaly_map, preds[1].anomaly_map)


def test_pca_variance_one_and_none(fast):
    imgs = [noise(i) for i in range(2)]
    full = borrow(fast, pca_variance=1.0).fit(imgs)
    assert full.fit_info_["n_components"] <= 127  # at most rank = patches - 1
    off = borrow(fast, pca_variance=None).fit(imgs)
    assert off.pca_ is None and off.index_.bank.shape == (128, 256)
    assert_finite_predictions(full.predict([noise(7)]) + off.predict([noise(7)]))


# -------------------------------------------------------------------------------------------------
# NaN / Inf inputs
# -------------------------------------------------------------------------------------------------
BAD_FLOATS = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("bad", BAD_FLOATS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_float_arrays_refused(fast, bad, dtype):
    img = np.random.default_rng(0).random((20, 20, 3)).astype(dtype)
    img[3, 4, 1] = bad
    with pytest.raises(ImageError, match="NaN or infinite"):
        fast.predict([img])
    fast.on_error = "skip"
    try:
        pred = fast.predict([img, noise(1)])
    finally:
        fast.on_error = "stop"
    assert "NaN or infinite" in pred[0].error and pred[0].score is None
    assert_finite_predictions(pred[1:])


def test_non_finite_inputs_in_fit(fast):
    img = np.random.default_rng(0).random((20, 20, 3))
    img[0, 0, 0] = np.nan
    with pytest.raises(ImageError, match="NaN or infinite"):
        borrow(fast).fit([noise(0), img])
    model = borrow(fast, on_error="skip").fit([noise(0), img, noise(1)])
    assert model.fit_info_["n_train_images"] == 2
    assert [reason for _, reason in model.skipped_] == ["image contains NaN or infinite values"]


def test_extreme_float_values_are_clipped(fast):
    extreme = [np.full((20, 20, 3), 1e300), np.full((20, 20, 3), -1e300)]
    preds = fast.predict(extreme)
    assert_finite_predictions(preds)
    same = fast.predict([np.full((20, 20, 3), 255, np.uint8), np.zeros((20, 20, 3), np.uint8)])
    for a, b in zip(preds, same):  # clipped to [0, 1], i.e. white and black
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    with np.errstate(over="ignore"), pytest.raises(ImageError, match="NaN or infinite"):
        fast.predict([extreme[0].astype(np.float32)])  # 1e300 overflows float32 to inf


# -------------------------------------------------------------------------------------------------
# non-finite features: the final guard
# -------------------------------------------------------------------------------------------------
def _poison(model: PatchKNN, value: float, which: slice = slice(None)):
    """Make the backbone return ``value`` in every feature map for the images ``which`` of a batch."""

    def hook(module, inputs, output):
        out = {}
        for name, f in output.items():
            f = f.clone()
            f[which] = value
            out[name] = f
        return out

    return model.extractor.backbone.register_forward_hook(hook)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_features_never_give_a_score(fast, value):
    handle = _poison(fast, value, slice(0, 1))  # only the first image of each batch
    try:
        with pytest.raises(PatchKNNError, match="NaN or infinite") as info:
            fast.predict([noise(1), noise(2)])
        assert "<array #0>" in str(info.value)
        fast.on_error = "skip"
        preds = fast.predict([noise(1), noise(2)])
    finally:
        fast.on_error = "stop"
        handle.remove()
    assert preds[0].error and "NaN or infinite" in preds[0].error
    assert preds[0].score is None and preds[0].anomaly_map is None and preds[0].verdict is None
    assert_finite_predictions(preds[1:])
    assert_finite_predictions(fast.predict([noise(1)]))  # the guard left nothing behind


@pytest.mark.parametrize("image_score", ["topk_mean", "reweighted"])
def test_guard_covers_other_image_scores(fast, image_score):
    model = borrow(fast, image_score=image_score, image_score_topk=3)
    model.__dict__.update({k: fast.__dict__[k] for k in ("pca_", "index_")})
    handle = _poison(model, math.nan)
    try:
        with pytest.raises(PatchKNNError, match="NaN or infinite"):
            model.predict([noise(1)])
    finally:
        handle.remove()


def test_non_finite_features_refused_at_fit(fast):
    model = borrow(fast)
    handle = _poison(model, math.inf, slice(1, 2))
    try:
        with pytest.raises(ConfigError, match="NaN/Inf"):
            model.fit([noise(0), noise(1)])
    finally:
        handle.remove()
    assert not model.is_fitted


# -------------------------------------------------------------------------------------------------
# property: any image size, any content -> a finite map of the requested size
# -------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 300),
    st.sampled_from(["noise", "constant", "stripes"]),
    st.integers(0, 2**16),
)
def test_property_any_size_gives_a_finite_map(fast, h, w, content, seed):
    rng = np.random.default_rng(seed)
    if content == "noise":
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif content == "constant":
        img = np.full((h, w, 3), rng.integers(0, 256), np.uint8)
    else:
        img = np.zeros((h, w, 3), np.uint8)
        img[::2] = 255
    pred = fast.predict([img], output_size="original")[0]
    assert pred.anomaly_map.shape == (h, w)
    assert_finite_predictions([pred])


def test_torch_threads_untouched(fast):
    """Predicting does not change global torch state that would affect other code."""
    threads = torch.get_num_threads()
    fast.predict([noise(0)])
    assert torch.get_num_threads() == threads
