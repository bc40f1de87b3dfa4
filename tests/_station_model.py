"""The real bottle model of the station tests (test_hot_swap.py, test_station_browser.py): the paper's
method fitted once per test session on a few of bottle's training images, saved as version 1 of a
versioned model folder; each test serves its own copy (corrections add versions to it)."""

from __future__ import annotations

import shutil
from pathlib import Path

N_TRAIN = 20
"""Training images: enough for a calibrated threshold, few enough for the CI budget."""

_built: dict[tuple[str, str], tuple[Path, object]] = {}


def bottle_model(mvtec_root: Path, weights: Path, base: Path):
    """``(folder, model)``: the fitted model and its versioned folder (version 1), built once."""
    from patchknn import PatchKNN
    from patchknn.versions import save_version

    key = (str(mvtec_root), str(weights))
    if key not in _built:
        train = sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))[:N_TRAIN]
        model = PatchKNN.from_preset("paper", weights=weights, progress=False).fit(train)
        folder = base / "bottle-v1"
        save_version(model, folder, author="tests", note="fitted on the first training images")
        _built[key] = (folder, model)
    return _built[key]


def served_copy(mvtec_root: Path, weights: Path, base: Path, dst: Path):
    """A fresh copy of the version-1 folder at ``dst`` (hard links kept as copies) and the model."""
    folder, model = bottle_model(mvtec_root, weights, base)
    shutil.copytree(folder, dst)
    return dst, model


def bottle_test_images(mvtec_root: Path, kind: str = "good") -> list[Path]:
    return sorted((mvtec_root / "bottle" / "test" / kind).glob("*.png"))
