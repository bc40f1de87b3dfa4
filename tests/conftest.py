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


# -- real data, found through environment variables --------------------------------------------------
REAL_DATA_FIXTURES = ("mvtec_root", "mtd_root", "caffe_weights")
"""Fixtures that need files outside the repository; a test using any of them is a real-data test."""
REQUIRE_REAL_DATA_ENV = "PATCHKNN_REQUIRE_REAL_DATA"
"""Set to 1 (CI does) to make a skipped real-data test a failure: CI must never pass by skipping."""
WEIGHTS_FILES = ("resnet50-caffe-msra-stem-layer3.safetensors", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
"""The paper's ResNet-50 weights, either file (the same weights; both backbones read both)."""


def _category_root(env: str, category: str, what: str) -> Path:
    value = os.environ.get(env)
    if not value:
        pytest.skip(f"{env} is not set (path to {what} holding {category}/)")
    root = Path(value)
    if not (root / category).is_dir():
        pytest.skip(f"{env}={value} has no {category}/ category")
    return root


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    """A folder holding the MVTec AD ``bottle/`` category (``$PATCHKNN_MVTEC_ROOT``)."""
    return _category_root("PATCHKNN_MVTEC_ROOT", "bottle", "an MVTec AD root")


@pytest.fixture(scope="session")
def mtd_root() -> Path:
    """A folder holding ``magnetic_tile/`` (Magnetic Tile Defect in MVTec layout, ``$PATCHKNN_MTD_ROOT``)."""
    return _category_root("PATCHKNN_MTD_ROOT", "magnetic_tile", "a folder")


@pytest.fixture(scope="session")
def caffe_weights() -> Path:
    """The paper's ResNet-50 weights file in ``$PATCHKNN_WEIGHTS_DIR``: the safetensors file, or Keras'
    h5 when only that is there (use with ``resnet50-keras`` or ``resnet50-caffe``)."""
    value = os.environ.get("PATCHKNN_WEIGHTS_DIR")
    if not value:
        pytest.skip(f"PATCHKNN_WEIGHTS_DIR is not set (folder with {' or '.join(WEIGHTS_FILES)})")
    for name in WEIGHTS_FILES:
        if (Path(value) / name).is_file():
            return Path(value) / name
    pytest.skip(f"PATCHKNN_WEIGHTS_DIR={value} holds neither {' nor '.join(WEIGHTS_FILES)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``PATCHKNN_REQUIRE_REAL_DATA=1``, a skipped test that uses real data fails instead."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or os.environ.get(REQUIRE_REAL_DATA_ENV) != "1":
        return
    used = [name for name in REAL_DATA_FIXTURES if name in getattr(item, "fixturenames", ())]
    if not used:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = (
        f"{item.nodeid} uses real data ({', '.join(used)}) but was skipped: {reason}. "
        f"{REQUIRE_REAL_DATA_ENV}=1 (set by .ci/run): real-data tests must run, never skip."
    )


@pytest.fixture(scope="module")
def ray_instance(request):
    """A private local Ray instance on 127.0.0.1 for one test module, stopped by
    :func:`patchknn.distributed._ray.shutdown` (garbage collected first, and pytest's fault handler
    enabled again: Ray leaves none, so a later crash would print nothing)."""
    from patchknn.distributed._ray import local_only, shutdown

    local_only()  # bind to 127.0.0.1 (must precede ray.init)
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # pragma: no cover - someone else's instance
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, logging_level="warning")
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield ray
    shutdown(ray, _pytest_fault_file(request.config))


def _pytest_fault_file(config: pytest.Config) -> int | None:
    """The descriptor pytest's fault handler writes to (a copy of the real stderr; fd 2 is
    captured), or ``None`` (then ``sys.stderr``) if this pytest keeps it elsewhere."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        return config.stash[fault_handler_stderr_fd_key]
    except (ImportError, KeyError):  # pragma: no cover - another pytest version
        return None


def fit_preset(name: str, train, weights_file: Path, folder: Path) -> tuple:
    """A preset fitted on ``train`` (the paper's weights file for a ResNet-50 backbone, the packaged
    weights otherwise) and saved in ``folder / "model"``: ``(model, saved folder)``."""
    from patchknn import PatchKNN
    from patchknn.presets import preset

    config = preset(name)
    weights = str(weights_file) if config.backbone.startswith("resnet50-") else None
    model = PatchKNN.from_config(config, weights=weights, progress=False)
    model.fit(train)
    return model, model.save(folder / "model")


@pytest.fixture(scope="session")
def bottle_models(mvtec_root, caffe_weights, tmp_path_factory):
    """``get(preset)``: that preset fitted on the whole real bottle training set and saved, made once
    per session when first asked for: ``(model, saved folder)``. Shared by ``bottle_evaluation``,
    ``tests/test_paths.py`` and ``tests/test_export.py`` (a fit of bottle costs one to three minutes
    of CI)."""
    made: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in made:
            train = mvtec_root / "bottle" / "train" / "good"
            made[name] = fit_preset(name, train, caffe_weights, tmp_path_factory.mktemp(f"{name}-bottle"))
        return made[name]

    return get


@pytest.fixture(scope="session")
def bottle_evaluation(mvtec_root, bottle_models, tmp_path_factory):
    """One `patchknn evaluate --model --report` of the paper's method (``bottle_models("paper")``) on the
    real bottle category, shared by every test that needs it. Returns ``results`` (the dict),
    ``results_path``, ``report_dir``, ``html`` (the page) and ``output`` (the command's output)."""
    import json
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from patchknn.cli import app

    base = tmp_path_factory.mktemp("bottle")
    results_path, report_dir = base / "results.json", base / "report"
    result = CliRunner().invoke(
        app,
        ["evaluate", "--data-root", str(mvtec_root), "--category", "bottle", "--model", str(bottle_models("paper")[1]),
         "--output", str(results_path), "--report", str(report_dir), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    return SimpleNamespace(
        results=json.loads(results_path.read_text()),
        results_path=results_path,
        report_dir=report_dir,
        html=report_dir / "index.html",
        output=result.output,
    )
