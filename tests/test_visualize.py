"""Heat-map overlays, ground-truth panels and the model's fixed colour scale."""

import numpy as np
import pytest

from patchknn.visualize import (
    colorize,
    comparison,
    contour,
    mask_image,
    model_scale,
    overlay,
    side_by_side,
    truth_overlay,
)


def _map() -> np.ndarray:
    amap = np.zeros((40, 40), np.float32)
    amap[10:20, 10:20] = 3.0
    return amap


def test_colorize_fixed_scale_is_the_same_across_images():
    a = colorize(np.full((4, 4), 1.0), vmin=0.0, vmax=2.0)
    b = colorize(np.full((4, 4), 1.0), vmin=0.0, vmax=2.0)
    c = colorize(np.full((4, 4), 1.0))  # relative: own max -> top colour
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert colorize(np.full((2, 2), 9.0), vmax=2.0).tolist() == colorize(np.full((2, 2), 2.0), vmax=2.0).tolist()


def test_overlay_contour_and_alpha():
    img = np.full((40, 40, 3), 128, np.uint8)
    out = overlay(img, _map(), vmin=0.0, vmax=3.0, threshold=1.5)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    ring = contour(_map() >= 1.5)
    assert (out[ring] == (0, 255, 255)).all()
    # cold regions keep most of the image (weight alpha_min), hot ones take the colour map
    assert out[35, 35].tolist() == [128, 128, 128]  # coldest: the image itself (alpha_min=0)
    assert out[15, 15, 0] > 180  # hottest: mostly the bright end of inferno
    flat = overlay(img, _map(), vmax=3.0, alpha=0.5, alpha_min=None)
    assert flat.shape == out.shape


def test_overlay_resizes_image_and_accepts_gray():
    gray = np.full((80, 60), 200, np.uint8)
    assert overlay(gray, _map(), vmax=3.0).shape == (40, 40, 3)


def test_truth_overlay_and_mask_image():
    img = np.zeros((40, 40, 3), np.uint8)
    mask = _map() > 0
    out = truth_overlay(img, mask)
    assert out[15, 15, 1] > 0 and out[30, 30].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(truth_overlay(img, np.zeros((40, 40), bool)), img)
    m = mask_image(mask)
    assert m.dtype == np.uint8 and set(np.unique(m).tolist()) == {0, 255}


def test_side_by_side_and_comparison():
    a, b = np.zeros((10, 5, 3), np.uint8), np.zeros((20, 8), np.uint8)
    out = side_by_side([a, b], gap=2)
    assert out.shape == (20, 10 + 2 + 8, 3)
    img = np.zeros((80, 80, 3), np.uint8)
    three = comparison(img, _map(), mask=_map() > 0, vmax=3.0, threshold=1.0)
    two = comparison(img, _map(), vmax=3.0)
    assert three.shape == (40, 3 * 40 + 2 * 4, 3) and two.shape == (40, 2 * 40 + 4, 3)


def test_model_scale_uses_calibration():
    class M:
        threshold_ = 4.0
        fit_info_ = {"calibration": {"threshold": 4.0, "patch": {"q50": 1.0}, "image": {"q99": 3.5}}}

    vmin, vmax = model_scale(M())
    assert vmin == 1.0 and vmax == pytest.approx(5.5)
    assert model_scale(M(), threshold=7.0) == (1.0, pytest.approx(10.0))

    class Bare:
        threshold_ = None
        fit_info_: dict = {}

    assert model_scale(Bare()) is None
