"""Patch features: the layer-by-layer projection, the compact training store, bfloat16, decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from patchknn import PatchKNN
from patchknn.backbones import build_backbone
from patchknn.data import load_image, load_resized, resize_image
from patchknn.features import PatchFeatureExtractor
from patchknn.reduction import MomentAccumulator


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize(
    ("backbone", "size", "grid", "aggregation"),
    [("resnet50", 64, 8, 1), ("resnet50", 64, 16, 3), ("efficientnet-lite2", 64, 8, 1)],
)
def test_project_equals_features_then_pca(backbone, size, grid, aggregation):
    ext = PatchFeatureExtractor(build_backbone(backbone, weights="random"), grid, aggregation).eval()
    x = _images(3, size)
    g = torch.Generator().manual_seed(1)
    comps = torch.randn(20, ext.dim, generator=g) / ext.dim**0.5
    mean = torch.randn(ext.dim, generator=g)
    with torch.inference_mode():
        full = ext(x)
        want = (full - mean) @ comps.T
        got = ext.project(x, mean, comps)
        assert torch.equal(ext.assemble(ext.compact_maps(x)), full)
    assert got.shape == want.shape == (3, grid * grid, 20)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_project_refuses_layer_norm():
    ext = PatchFeatureExtractor(build_backbone("resnet50", weights="random"), 8, layer_norm=True)
    assert not ext.can_project
    with pytest.raises(ValueError, match="layer_norm"):
        ext.project(_images(1, 64), torch.zeros(ext.dim), torch.zeros(4, ext.dim))


def test_compact_store_gives_the_same_model_as_full_vectors(monkeypatch):
    """The compact path (fit from stored per-layer maps, predict through ``project()``) gives the
    model and the maps of the plain path (full patch vectors, then PCA), and really is taken."""
    images = [img.permute(1, 2, 0).numpy() for img in _images(6, 64, seed=3)]
    kwargs = {"backbone": "resnet50", "weights": "random", "image_size": 64, "grid_size": 8, "progress": False}
    calls: dict[str, list] = {"project": [], "project_compact": []}
    real_project, real_compact = PatchFeatureExtractor.project, PatchFeatureExtractor.project_compact

    def spy_project(self, images, mean, components):  # project() == PCA applied to forward()
        got = real_project(self, images, mean, components)
        calls["project"].append((got, (self.forward(images) - mean) @ components.T, mean, components))
        return got

    def spy_compact(self, parts, mean, components):
        calls["project_compact"].append(len(parts))
        return real_compact(self, parts, mean, components)

    monkeypatch.setattr(PatchFeatureExtractor, "project", spy_project)
    monkeypatch.setattr(PatchFeatureExtractor, "project_compact", spy_compact)
    compact = PatchKNN(**kwargs).fit(images[:5])
    assert compact.extractor.can_project and calls["project_compact"]  # fitted from the compact store
    calls["project"].clear()  # the calibration's synthetic defects went through project() too
    a = compact.predict(images[5:])[0]
    assert calls["project"], "predict did not go through project()"
    pca = compact.pca_
    for got, want, mean, components in calls["project"]:
        assert got.shape == want.shape == (1, 64, pca.n_components)
        torch.testing.assert_close(mean.cpu(), pca.mean_tensor)  # the model's own PCA
        torch.testing.assert_close(components.cpu(), pca.components_tensor)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))

    calls["project"].clear()
    calls["project_compact"].clear()
    monkeypatch.setattr(PatchFeatureExtractor, "can_project", property(lambda self: False))
    full = PatchKNN(**kwargs).fit(images[:5])
    b = full.predict(images[5:])[0]
    assert not calls["project"] and not calls["project_compact"]  # the plain path: full vectors, then PCA
    assert compact.pca_.n_components == full.pca_.n_components
    np.testing.assert_allclose(compact.index_.bank, full.index_.bank, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-3, atol=1e-3)
    assert a.score == pytest.approx(b.score, rel=1e-3)


def test_bfloat16_features_close_to_float32():
    net = build_backbone("resnet50", weights="random")
    x = _images(2, 64)
    with torch.inference_mode():
        f32 = PatchFeatureExtractor(net, 8).eval()(x)
        b16 = PatchFeatureExtractor(net, 8, precision="bfloat16").eval()(x)
    assert b16.dtype == torch.float32 and b16.shape == f32.shape
    rel = float((b16 - f32).norm() / f32.norm())
    assert 0 < rel < 0.05  # rounded, but close


def test_precision_is_a_saved_option(tmp_path):
    images = [img.permute(1, 2, 0).numpy() for img in _images(4, 64, seed=5)]
    model = PatchKNN(
        backbone="resnet50", weights="random", image_size=64, grid_size=8, precision="bfloat16", progress=False
    ).fit(images[:3])
    model.save(tmp_path / "m")
    loaded = PatchKNN.load(tmp_path / "m", progress=False)
    assert loaded.config.precision == "bfloat16"
    np.testing.assert_array_equal(loaded.predict(images[3:])[0].anomaly_map, model.predict(images[3:])[0].anomaly_map)


def test_moments_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(700, 12)).astype(np.float32)
    acc = MomentAccumulator(12)
    for chunk in np.array_split(x, 3):
        acc.update(chunk)
    mean, cov = acc.mean_and_covariance()
    np.testing.assert_allclose(mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.astype(np.float64), rowvar=False, bias=True), atol=1e-4)
    assert torch.equal(acc.scatter_matrix, acc.scatter_matrix.T)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_load_resized_equals_load_then_resize(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "P" else rgb.quantize(64)
    path = tmp_path / f"x-{mode}.png"
    img.save(path)
    got, original = load_resized(path, 32)
    want = resize_image(load_image(path), 32)
    assert original == (90, 70) and got.dtype == np.uint8 and got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, want)


def test_load_resized_applies_exif_orientation(tmp_path):
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    got, original = load_resized(path, (30, 20))
    assert original == (60, 40)  # the displayed orientation
    np.testing.assert_array_equal(got, resize_image(load_image(path), (30, 20)))
