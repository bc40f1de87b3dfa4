"""Shared fixtures: small data the tests make, and the optional real data found through env vars."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

# A small, fast configuration on a randomly initialised backbone (no download).
TINY = {"backbone": "resnet50", "image_size": 64, "grid_size": 8, "weights": "random", "progress": False}


def tiny_model(**overrides):
    from patchknn import PatchKNN

    return PatchKNN(**{**TINY, **overrides})


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small MVTec-layout category ``synthetic`` made by the package's own generator."""
    from patchknn.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, category="synthetic", n_train=8, n_test_good=3, n_test_defective=5,
                           image_size=96, seed=0)
    return root


@pytest.fixture(scope="session")
def rng_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, size=(80, 72, 3), dtype=np.uint8) for _ in range(4)]


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    value = os.environ.get("PATCHKNN_MVTEC_ROOT")
    if not value:
        pytest.skip("PATCHKNN_MVTEC_ROOT is not set (path to an MVTec AD root holding bottle/)")
    root = Path(value)
    if not (root / "bottle").is_dir():
        pytest.skip(f"PATCHKNN_MVTEC_ROOT={value} has no bottle/ category")
    return root


@pytest.fixture(scope="session")
def caffe_weights() -> Path:
    value = os.environ.get("PATCHKNN_WEIGHTS_DIR")
    if not value:
        pytest.skip("PATCHKNN_WEIGHTS_DIR is not set (folder with resnet50-caffe-msra-stem-layer3.safetensors)")
    path = Path(value) / "resnet50-caffe-msra-stem-layer3.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def bottle_evaluation(mvtec_root, caffe_weights, tmp_path_factory):
    """One `patchknn evaluate --report` of the paper's method on the real bottle category, shared
    by every test that needs it. Returns ``results`` (the dict), ``results_path``, ``report_dir``,
    ``html`` (the page) and ``output`` (the command's output)."""
    import json
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from patchknn.cli import app

    base = tmp_path_factory.mktemp("bottle")
    results_path, report_dir = base / "results.json", base / "report"
    result = CliRunner().invoke(
        app,
        ["evaluate", "--data-root", str(mvtec_root), "--category", "bottle", "--backbone", "resnet50-caffe",
         "--weights", str(caffe_weights), "--output", str(results_path), "--report", str(report_dir), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    return SimpleNamespace(
        results=json.loads(results_path.read_text()),
        results_path=results_path,
        report_dir=report_dir,
        html=report_dir / "index.html",
        output=result.output,
    )
