"""CI never passes by skipping: `.ci/run` refuses to start without the real data, and with
``PATCHKNN_REQUIRE_REAL_DATA=1`` a skipped real-data test fails (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "resnet50-caffe-msra-stem-layer3.safetensors"

_PROBE = '''
def test_uses_mvtec(mvtec_root):
    assert mvtec_root.is_dir()


def test_uses_weights(caffe_weights):
    assert caffe_weights.is_file()
    assert caffe_weights.name == "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"  # the only one there


def test_uses_mtd(mtd_root):
    assert (mtd_root / "magnetic_tile").is_dir()


def test_plain():
    assert True
'''


def _run_probe(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(_PROBE)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PATCHKNN_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_probe.py"],
        cwd=tmp_path, env={**clean, **env}, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def fake_real_data(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("fake_shared")
    (base / "mvtec" / "bottle").mkdir(parents=True)
    (base / "mtd" / "magnetic_tile").mkdir(parents=True)
    (base / "weights").mkdir()
    (base / "weights" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    return {
        "PATCHKNN_MVTEC_ROOT": str(base / "mvtec"),
        "PATCHKNN_MTD_ROOT": str(base / "mtd"),
        "PATCHKNN_WEIGHTS_DIR": str(base / "weights"),
    }


def test_real_data_tests_skip_without_the_requirement(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, {})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 3 skipped" in result.stdout
    for reason in ("PATCHKNN_MVTEC_ROOT is not set", "PATCHKNN_MTD_ROOT is not set", "PATCHKNN_WEIGHTS_DIR is not set"):
        assert reason in result.stdout


def test_required_real_data_turns_skips_into_failures(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, {"PATCHKNN_REQUIRE_REAL_DATA": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 3 errors" in result.stdout
    assert "real-data tests must run, never skip" in result.stdout
    expected = "test_uses_mvtec uses real data (mvtec_root) but was skipped: PATCHKNN_MVTEC_ROOT is not set"
    assert expected in result.stdout


def test_required_real_data_present_passes_h5_alone(tmp_path: Path, fake_real_data: dict[str, str]) -> None:
    result = _run_probe(tmp_path, {**fake_real_data, "PATCHKNN_REQUIRE_REAL_DATA": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


def _ci_copy(tmp_path: Path) -> Path:
    """A clone-like folder ``repo/`` holding only .ci/run and a setup script that must never run."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / "scripts" / "setup.sh").write_text("echo SETUP-RAN; exit 0\n")
    return repo


def test_ci_fails_without_shared(tmp_path: Path) -> None:
    repo = _ci_copy(tmp_path)
    result = subprocess.run(["bash", ".ci/run"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "FAILED: the real data CI needs is missing" in result.stderr
    assert "../shared" in result.stderr and "never passes by skipping" in result.stderr
    assert "SETUP-RAN" not in result.stdout


def test_ci_names_each_missing_part(tmp_path: Path) -> None:
    repo = _ci_copy(tmp_path)
    (tmp_path / "shared" / "mvtec" / "bottle").mkdir(parents=True)
    (tmp_path / "shared" / "weights").mkdir()
    result = subprocess.run(["bash", ".ci/run"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "mtd/magnetic_tile" in result.stderr and WEIGHTS in result.stderr
    assert "mvtec/bottle" not in result.stderr
    assert "SETUP-RAN" not in result.stdout


def test_ci_exports_the_paths_when_shared_is_there(tmp_path: Path) -> None:
    repo = _ci_copy(tmp_path)
    shared = tmp_path / "shared"
    for folder in ("mvtec/bottle", "mtd/magnetic_tile", "weights"):
        (shared / folder).mkdir(parents=True)
    (shared / "weights" / WEIGHTS).write_bytes(b"")
    # stop right after setup: print what the tests would see
    (repo / "scripts" / "setup.sh").write_text("env | grep ^PATCHKNN_ | sort; exit 3\n")
    result = subprocess.run(["bash", ".ci/run"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert f"PATCHKNN_MVTEC_ROOT={shared / 'mvtec'}" in result.stdout
    assert f"PATCHKNN_MTD_ROOT={shared / 'mtd'}" in result.stdout
    assert f"PATCHKNN_WEIGHTS_DIR={shared / 'weights'}" in result.stdout
    assert "PATCHKNN_REQUIRE_REAL_DATA=1" in result.stdout
