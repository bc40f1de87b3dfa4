"""``train_flips``: flipped copies of each training image join the memory bank (issue 17).

The bank holds each image's grid and then its flipped copies' grids; the threshold's held-out
scoring leaves an image's whole block out with it (else an image of a symmetric product would
find itself in its own flipped copy, and the threshold would sit at the noise of a perfect match).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY, tiny_model
from typer.testing import CliRunner

from patchknn import PatchKNN
from patchknn.bank import with_train_flips
from patchknn.errors import ConfigError
from patchknn.heldout import fold_groups
from patchknn.presets import preset
from patchknn.threshold import held_out_grids

RUN = {"num_workers": 0}
CELLS = TINY["grid_size"] ** 2


def _images(n: int, seed: int = 0, symmetric: bool = False) -> list[np.ndarray]:
    """``n`` random 64 x 64 RGB images (the tiny model's size: no resize); ``symmetric``: each
    its own mirror image (left half mirrored onto the right)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
        if symmetric:
            im[:, 32:] = im[:, :32][:, ::-1]
        out.append(np.ascontiguousarray(im))
    return out


def _flipped(im: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray({"hflip": im[:, ::-1], "vflip": im[::-1], "rot180": im[::-1, ::-1]}[kind])


def test_bank_holds_each_image_then_its_flipped_copies():
    """A fit with train_flips has the bank of a fit on the images and their flips, given in that
    order (same PCA: the same rows in the same order); it counts the images, not the copies."""
    images, flips = _images(4), ("hflip", "vflip", "rot180")
    a = tiny_model(train_flips=flips, batch_size=1, threshold_method="none", **RUN).fit(images)
    expanded = [v for im in images for v in (im, *(_flipped(im, k) for k in flips))]
    b = tiny_model(batch_size=4, threshold_method="none", **RUN).fit(expanded)  # same backbone batches
    np.testing.assert_allclose(a.index_.bank, b.index_.bank, rtol=1e-5, atol=1e-4)
    assert a.index_.bank.shape[0] == 4 * 4 * CELLS
    assert a.fit_info_["n_train_images"] == 4 and b.fit_info_["n_train_images"] == 16


def test_with_train_flips_orders_each_image_then_its_copies():
    import torch

    x = torch.arange(2 * 1 * 2 * 3).reshape(2, 1, 2, 3)
    out = with_train_flips(x, ("hflip", "vflip", "rot180"))
    assert out.shape == (8, 1, 2, 3)
    for i in range(2):
        assert torch.equal(out[4 * i], x[i])
        assert torch.equal(out[4 * i + 1], x[i].flip(2))
        assert torch.equal(out[4 * i + 2], x[i].flip(1))
        assert torch.equal(out[4 * i + 3], x[i].flip(1).flip(2))
    assert with_train_flips(x, ()) is x


def test_held_out_scoring_leaves_an_images_flipped_copies_out():
    """Each calibration image's held-out grid is its own grid's nearest distances to the bank rows
    of the images outside its cross-validation group, copies included (brute force). The images
    are mirror-symmetric, so an image's hflip copy is the image itself: had the copy stayed in,
    every distance would be ~0."""
    images = _images(6, symmetric=True)
    model = tiny_model(train_flips=("hflip",), threshold_method="quantile", **RUN).fit(images)
    bank = model.index_.bank
    held = held_out_grids(model, bank, 6)
    assert held.images == list(range(6))
    block = 2 * CELLS
    group_of = {i: g for g in fold_groups(6, model.config.calibration_images, model.config.seed) for i in g}
    for grid, i in zip(held.grids, held.images):
        own = bank[i * block : i * block + CELLS].astype(np.float64)
        copy = bank[i * block + CELLS : (i + 1) * block].astype(np.float64)
        np.testing.assert_allclose(own, copy, rtol=1e-4, atol=1e-4)  # symmetric: the copy is the image
        out = np.concatenate([np.arange(j * block, (j + 1) * block) for j in group_of[i]])
        others = np.delete(bank, out, axis=0).astype(np.float64)
        d2 = (own**2).sum(1)[:, None] - 2 * own @ others.T + (others**2).sum(1)[None]
        expected = np.sqrt(np.maximum(d2.min(axis=1), 0))
        np.testing.assert_allclose(grid.ravel(), expected, rtol=1e-3, atol=1e-3)
        assert expected.min() > 1.0


@pytest.mark.parametrize("method", ["quantile", "defects"])
def test_the_threshold_of_a_symmetric_product_does_not_change(method):
    """Mirror-symmetric images: their hflip copies add nothing new, so the calibrated threshold
    equals the one fitted without flips (each held-out image scored against the others' rows)."""
    images = _images(6, symmetric=True)
    plain = tiny_model(threshold_method=method, batch_size=2, **RUN).fit(images)
    flipped = tiny_model(threshold_method=method, train_flips=("hflip",), batch_size=2, **RUN).fit(images)
    assert flipped.threshold_ == pytest.approx(plain.threshold_, rel=1e-4)
    assert flipped.fit_info_["calibration"]["n_images"] == plain.fit_info_["calibration"]["n_images"] == 6


def test_coreset_partial_fit_save_load_and_prediction(tmp_path):
    """With a coreset: partial_fit adds the new images with their copies, calibrates on the images
    (not the copies), and a saved model loads with train_flips and predicts the same."""
    images, test = _images(6), _images(2, seed=3)
    model = tiny_model(train_flips=("vflip", "rot180"), coreset_ratio=0.3, **RUN).fit(images[:4])
    assert model.training_.full.shape[0] == 4 * 3 * CELLS
    model.partial_fit(images[4:])
    assert model.training_.full.shape[0] == 6 * 3 * CELLS
    assert model.fit_info_["n_train_images"] == 6 and model.fit_info_["added"]["count"] == 2
    assert model.fit_info_["calibration"]["n_images"] == 6
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "patchknn.json").read_text())["config"]["train_flips"] == ["vflip", "rot180"]
    loaded = PatchKNN.load(tmp_path / "m", **RUN)
    assert loaded.config.train_flips == ("vflip", "rot180")
    assert [p.score for p in loaded.predict(test)] == pytest.approx([p.score for p in model.predict(test)], rel=1e-6)
    loaded.partial_fit(images[:1])  # the saved training bank is read back with its copies
    assert loaded.training_.full.shape[0] == 7 * 3 * CELLS


def test_ensemble_members_share_train_flips():
    images = _images(4)
    cfg = preset("paper", **{k: v for k, v in TINY.items() if k not in ("weights", "progress")},
                 ensemble=("layer_norm=true",), train_flips=("hflip",))
    model = PatchKNN.from_config(cfg, weights="random", progress=False, **RUN).fit(images)
    assert all(m.config.train_flips == ("hflip",) for m in model.members)
    assert all(m.index_.bank.shape[0] == 4 * 2 * CELLS for m in model.members)
    assert model.fit_info_["n_train_images"] == 4
    model.partial_fit(_images(1, seed=5))
    assert all(m.index_.bank.shape[0] == 5 * 2 * CELLS for m in model.members)
    assert model.fit_info_["n_train_images"] == 5 and model.fit_info_["calibration"]["n_images"] == 5
    with pytest.raises(ConfigError, match="train_flips"):  # a member may not set it
        PatchKNN.from_config(preset("paper", ensemble=("train_flips=vflip",)), weights="random")


@pytest.mark.parametrize("bad", [("flip",), ("hflip", "hflip"), "hflip", ("hflip", 3)])
def test_bad_train_flips_are_refused(bad):
    with pytest.raises(ConfigError, match="train_flips"):
        PatchKNN(train_flips=bad)


def test_cli_fit_takes_train_flips(synthetic_root, tmp_path):
    from patchknn.cli import app

    flags = ["--backbone", "resnet50", "--weights", "random", "--image-size", "64", "--grid-size", "8", "-q"]
    r = CliRunner().invoke(app, ["fit", str(synthetic_root / "synthetic" / "train" / "good"), "-o",
                                 str(tmp_path / "m"), "--train-flips", "hflip,rot180", "--workers", "0", *flags])
    assert r.exit_code == 0, r.output
    model = PatchKNN.load(tmp_path / "m")
    assert model.config.train_flips == ("hflip", "rot180")
    assert model.index_.bank.shape[0] == 8 * 3 * CELLS
