"""Tests for patchknn.synthetic: layout, determinism, masks, speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchknn.data import MVTecCategory, list_categories, load_image, load_mask
from patchknn.errors import ConfigError, DatasetError
from patchknn.synthetic import DEFECT_TYPES, make_synthetic_dataset

SMALL = {"n_train": 4, "n_test_good": 2, "n_test_defective": 6, "image_size": 64}


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_layout_is_valid_mvtec(tmp_path: Path) -> None:
    path = make_synthetic_dataset(tmp_path, category="widgets", **SMALL)
    assert path == tmp_path / "widgets"
    assert list_categories(tmp_path) == ["widgets"]
    cat = MVTecCategory(tmp_path, "widgets")
    cat.validate()
    assert len(cat.train_paths()) == 4
    samples = cat.test_samples()
    assert len(samples) == 8
    assert cat.defects() == sorted(DEFECT_TYPES)
    counts = {d: sum(s.defect == d for s in samples) for d in ("good", *DEFECT_TYPES)}
    assert counts == {"good": 2, "scratch": 2, "spot": 2, "hole": 2}
    for p in [*cat.train_paths(), *(s.path for s in samples)]:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)


def test_masks_binary_and_non_empty(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, **SMALL)
    cat = MVTecCategory(tmp_path, "synthetic")
    for s in cat.test_samples():
        if s.label == 0:
            assert s.mask_path is None
            continue
        assert s.mask_path is not None and s.mask_path.name == f"{s.path.stem}_mask.png"
        with Image.open(s.mask_path) as im:
            assert im.mode == "L"
            values = set(np.unique(np.asarray(im)).tolist())
        assert values == {0, 255}
        mask = load_mask(s.mask_path, expected_size=(64, 64), image_path=s.path)
        assert 0 < mask.mean() < 0.1


def test_defects_are_clearly_visible(tmp_path: Path) -> None:
    """Pixels under a mask differ strongly from the surface just around the defect."""
    make_synthetic_dataset(tmp_path, n_train=1, n_test_good=0, n_test_defective=9, image_size=256)
    cat = MVTecCategory(tmp_path, "synthetic")
    for s in cat.test_samples():
        img = load_image(s.path).astype(np.float32)
        mask = load_mask(s.mask_path)  # type: ignore[arg-type]
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        ring = np.zeros_like(mask)
        ring[max(0, y0 - 6) : y1 + 6, max(0, x0 - 6) : x1 + 6] = True
        ring &= ~mask
        inside = img[mask].mean(axis=0)
        around = np.median(img[ring], axis=0)
        assert np.abs(inside - around).max() > 25, (s.path, inside, around)


def test_deterministic(tmp_path: Path) -> None:
    a = make_synthetic_dataset(tmp_path / "a", seed=7, **SMALL)
    b = make_synthetic_dataset(tmp_path / "b", seed=7, **SMALL)
    c = make_synthetic_dataset(tmp_path / "c", seed=8, **SMALL)
    ta, tb, tc = tree(a), tree(b), tree(c)
    assert ta == tb
    assert ta.keys() == tc.keys()
    assert ta["train/good/000.png"] != tc["train/good/000.png"]


def test_normal_images_vary_a_little(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, n_train=3, n_test_good=1, n_test_defective=0, image_size=64)
    imgs = [load_image(p).astype(np.float32) for p in MVTecCategory(tmp_path, "synthetic").train_paths()]
    diffs = [np.abs(imgs[0] - other).mean() for other in imgs[1:]]
    assert all(0.5 < d < 40 for d in diffs)


def test_rerun_replaces_own_output(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, n_train=5, n_test_good=2, n_test_defective=3, image_size=64)
    path = make_synthetic_dataset(tmp_path, n_train=2, n_test_good=1, n_test_defective=0, image_size=64)
    cat = MVTecCategory(tmp_path, "synthetic")
    cat.validate()
    assert len(cat.train_paths()) == 2 and len(cat.test_samples()) == 1
    assert not (path / "ground_truth").exists()


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "precious.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not written by make_synthetic_dataset"):
        make_synthetic_dataset(tmp_path, **SMALL)
    assert (tmp_path / "synthetic" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_train": 0},
        {"n_test_good": -1},
        {"n_test_good": 0, "n_test_defective": 0},
        {"image_size": 16},
        {"seed": -1},
        {"n_train": 2.5},
        {"category": ""},
        {"category": "a/b"},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        make_synthetic_dataset(tmp_path, **{**SMALL, **kwargs})  # type: ignore[arg-type]


def test_default_size_layout(tmp_path: Path) -> None:
    path = make_synthetic_dataset(tmp_path)  # 40 + 10 + 20 images at 256 px
    assert len(list(path.rglob("*.png"))) == 70 + 20
