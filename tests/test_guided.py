"""The guided filter (patchknn.guided) and the map it draws (guided_filter in scoring, predict,
the saved model and the exported runtime); the image score and the verdict never change with it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import uniform_filter

from patchknn import PatchKNN, scoring
from patchknn.config import PatchKNNConfig
from patchknn.errors import ConfigError
from patchknn.guided import guided_filter

RNG = np.random.default_rng(7)


def _reference(guide: np.ndarray, src: np.ndarray, r: int, eps: float) -> np.ndarray:
    """He et al.'s colour guided filter written out, one 3x3 solve per pixel."""
    img = guide.transpose(1, 2, 0).astype(np.float64) / 255.0
    p = src.astype(np.float64)

    def box(a: np.ndarray) -> np.ndarray:
        return uniform_filter(a, (2 * r + 1, 2 * r + 1) + (1,) * (a.ndim - 2), mode="reflect")

    mean_i, mean_p = box(img), box(p)
    cov_ip = box(img * p[..., None]) - mean_i * mean_p[..., None]
    sigma = box(img[..., :, None] * img[..., None, :]) - mean_i[..., :, None] * mean_i[..., None, :]
    a = np.linalg.solve(sigma + eps * np.eye(3), cov_ip[..., None])[..., 0]
    b = mean_p - (a * mean_i).sum(-1)
    return (box(a) * img).sum(-1) + box(b)


def test_the_colour_filter_equals_the_per_pixel_solution():
    guide = RNG.integers(0, 256, (3, 40, 36), dtype=np.uint8)
    src = RNG.random((40, 36)).astype(np.float32)
    for r, eps in ((1, 1e-4), (4, 1e-2)):
        np.testing.assert_allclose(guided_filter(guide, src, r, eps), _reference(guide, src, r, eps), atol=1e-5)


def test_a_grey_image_in_three_channels_is_the_grey_filter_with_a_third_of_eps():
    grey = RNG.integers(0, 256, (32, 32), dtype=np.uint8)
    src = RNG.random((32, 32)).astype(np.float32)
    np.testing.assert_allclose(
        guided_filter(np.stack([grey] * 3), src, 3, 3e-4), guided_filter(grey, src, 3, 1e-4), atol=1e-5
    )


def test_the_map_takes_the_image_edge_and_a_flat_image_only_smooths():
    guide = np.zeros((3, 48, 48), np.uint8)
    guide[:, :, 24:36] = 200  # a bright defect, columns 24-35
    src = np.zeros((48, 48), np.float32)
    src[:, 18:42] = 1.0  # the coarse map spills over it on both sides, with no step at its edges
    out = guided_filter(guide, src, 6, 1e-4)
    assert out[24, 24] - out[24, 23] > 0.15 and out[24, 35] - out[24, 36] > 0.15  # the map takes its edges
    assert out[24, 30] == pytest.approx(1.0, abs=1e-3) and out[24, 20] - out[24, 19] < 0.1
    flat = guided_filter(np.full((3, 48, 48), 90, np.uint8), src, 6, 1e-4)  # a = 0: b's box mean
    box = uniform_filter(uniform_filter(src.astype(np.float64), 13, mode="reflect"), 13, mode="reflect")
    np.testing.assert_allclose(flat, box, atol=1e-5)
    const = guided_filter(guide, np.full((48, 48), 2.5, np.float32), 6, 1e-4)
    np.testing.assert_allclose(const, 2.5, atol=1e-5)  # a constant map stays itself


def test_subsampled_coefficients_stay_close_to_the_full_filter():
    guide = np.repeat(np.linspace(0, 255, 64, dtype=np.float64)[None, None, :], 64, 1).astype(np.uint8)
    guide = np.repeat(guide, 3, 0)
    src = scoring.resize_bilinear(RNG.random((8, 8)), (64, 64))
    full, fast = guided_filter(guide, src, 8, 1e-3), guided_filter(guide, src, 8, 1e-3, subsample=4)
    assert fast.shape == full.shape and float(np.abs(fast - full).max()) < 0.1 * float(np.ptp(src))


@pytest.mark.parametrize(
    ("guide", "src", "radius", "eps", "match"),
    [
        (np.zeros((3, 8, 8), np.uint8), np.zeros((8, 9)), 1, 1e-4, "guide of shape"),
        (np.zeros((4, 8, 8), np.uint8), np.zeros((8, 8)), 1, 1e-4, "guide of shape"),
        (np.zeros((3, 8, 8), np.uint8), np.zeros((8, 8)), 0, 1e-4, "radius"),
        (np.zeros((3, 8, 8), np.uint8), np.zeros((8, 8)), 1, 0.0, "eps"),
    ],
)
def test_bad_arguments_are_refused(guide, src, radius, eps, match):
    with pytest.raises(ValueError, match=match):
        guided_filter(guide, src, radius, eps)


def test_options_are_validated_and_shared_by_ensemble_members():
    for bad in ({"guided_filter": -1}, {"guided_filter": 17}, {"guided_eps": 0}, {"guided_eps": 2.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            PatchKNNConfig(**bad)
    cfg = PatchKNNConfig(guided_filter=1.5, ensemble=("layer_norm=true",))
    assert all(m.guided_filter == 1.5 for m in cfg.ensemble_members())
    with pytest.raises(ConfigError, match="guided_filter"):
        PatchKNNConfig(ensemble=("guided_filter=2",)).ensemble_members()


def test_scoring_needs_the_images_and_keeps_the_score():
    cfg = PatchKNNConfig(image_size=64, grid_size=8, smoothing_sigma=0.5, border_cells=1, guided_filter=1.5)
    plain = cfg.replace(guided_filter=0.0)
    grids = RNG.random((2, 8, 8)).astype(np.float32)
    images = RNG.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    with pytest.raises(ValueError, match="guides"):
        scoring.predictions(grids, np.ones(2), cfg)
    with pytest.raises(ValueError, match="guide"):
        scoring.grid_to_map(grids[0], (64, 64), cfg)
    got = scoring.predictions(grids, np.ones(2), cfg, guides=images, threshold=0.5)
    want = scoring.predictions(grids, np.ones(2), plain, threshold=0.5)
    for g, w, grid, img in zip(got, want, grids, images):
        assert g.score == w.score and g.verdict == w.verdict  # the score's map is the smoothed one
        assert not np.allclose(g.anomaly_map, w.anomaly_map)
        np.testing.assert_array_equal(g.anomaly_map, scoring.grid_to_map(grid, (64, 64), cfg, guide=img))
    big = scoring.predictions(grids, np.ones(2), cfg, guides=images, output_size=(100, 90))
    for b, g in zip(big, got):  # another size: the guided map at the input size, resized
        assert b.score == g.score
        np.testing.assert_allclose(b.anomaly_map, scoring.resize_bilinear(g.anomaly_map, (100, 90)), atol=1e-6)


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = np.tile(np.linspace(40, 200, 64, dtype=np.float64)[None, :, None], (64, 1, 3))
    out = []
    for _ in range(n):
        img = base + rng.normal(0, 6, base.shape)
        y, x = rng.integers(10, 50, 2)
        img[y : y + 6, x : x + 6] = 250 if seed else img[y : y + 6, x : x + 6]  # test images get a bright square
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_predict_save_load_and_export_draw_the_same_guided_map(tmp_path):
    from patchknn.export import export_model
    from patchknn.runtime import ExportedModel

    opts = {"backbone": "resnet50", "weights": "random", "image_size": 64, "grid_size": 8, "smoothing_sigma": 0.5,
            "calibration_images": 2, "progress": False}
    train, test = _images(4, 0), _images(3, 1)
    guided = PatchKNN(guided_filter=1.5, **opts).fit(train)
    plain = PatchKNN(**opts).fit(train)
    assert guided.threshold_ == plain.threshold_  # the calibration does not see the map's outline
    got, want = guided.predict(test), plain.predict(test)
    assert [p.score for p in got] == [p.score for p in want] and [p.verdict for p in got] == [p.verdict for p in want]
    assert all(not np.allclose(a.anomaly_map, b.anomaly_map) for a, b in zip(got, want))
    guided.save(tmp_path / "m")
    loaded = PatchKNN.load(tmp_path / "m", progress=False)
    assert loaded.config.guided_filter == 1.5
    for a, b in zip(loaded.predict(test), got):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-5)
    runtime = ExportedModel(export_model(guided, tmp_path / "exp"), backend="onnxruntime")
    for a, b in zip(runtime.predict(test), got):
        assert a.score == pytest.approx(b.score, rel=1e-4)
        scale = float(np.abs(b.anomaly_map).max())
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-4 * scale)


def test_the_guided_map_peaks_at_the_score_so_its_region_agrees_with_the_verdict():
    cfg = PatchKNNConfig(image_size=64, grid_size=8, smoothing_sigma=0.5, guided_filter=1.5)
    grids = RNG.random((6, 8, 8)).astype(np.float32) * 3
    grids[3:, 3:5, 3:5] += 4  # three with a peak
    images = RNG.integers(0, 256, (6, 3, 64, 64), dtype=np.uint8)
    images[:, :, 24:40, 24:40] = 250  # an image feature there too
    preds = scoring.predictions(grids, np.ones(6), cfg, guides=images, threshold=4.0)
    assert {p.verdict for p in preds} == {"OK", "NG"}
    for p in preds:
        assert float(p.anomaly_map.max()) == pytest.approx(p.score, rel=1e-6)
        assert bool(p.mask.any()) == (p.verdict == "NG")
    flat = scoring.grid_to_map(np.ones((8, 8), np.float32), (64, 64), cfg, guide=images[0])
    np.testing.assert_allclose(flat, 1.0, rtol=1e-6)  # a flat grid's map is flat at its score
