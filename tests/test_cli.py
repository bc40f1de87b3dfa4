import csv
import json

import numpy as np
from typer.testing import CliRunner

from patchknn import PatchKNN
from patchknn.cli import app

runner = CliRunner()
TINY_FLAGS = ["--backbone", "resnet50", "--weights", "random", "--image-size", "64", "--grid-size", "8", "-q"]


def test_fit_predict_info(synthetic_root, tmp_path):
    cat = synthetic_root / "synthetic"
    model_dir = tmp_path / "model"
    r = runner.invoke(app, ["fit", str(cat / "train" / "good"), "--output", str(model_dir), "--k", "2", *TINY_FLAGS])
    assert r.exit_code == 0, r.output
    assert PatchKNN.load(model_dir).config.k == 2

    r = runner.invoke(app, ["info", str(model_dir)])
    assert r.exit_code == 0 and '"backbone": "resnet50"' in r.output

    out = tmp_path / "pred"
    r = runner.invoke(app, ["predict", str(model_dir), str(cat / "test" / "good"), "--output", str(out),
                            "--threshold", "0.5", "-q"])
    assert r.exit_code == 0, r.output
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert {r["verdict"] for r in rows} <= {"OK", "NG"}
    first = rows[0]
    amap = np.load(out / first["map"])
    assert amap.shape == (64, 64)
    assert (out / first["overlay"]).is_file()
    assert json.loads((out / "scores.json").read_text())[0]["image"] == first["image"]


def test_info_lists_backbones_and_presets():
    r = runner.invoke(app, ["info"])
    assert r.exit_code == 0
    for name in ("resnet50", "resnet50-caffe", "wide_resnet50_2", "efficientnet-lite2", "paper"):
        assert name in r.output


def test_bad_option_is_one_clear_line(tmp_path):
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "patchknn.cli", "fit", str(tmp_path), "--output", str(tmp_path / "m"),
         "--pca-variance", "1.5"],
        capture_output=True, text=True,
    )
    assert p.returncode == 2
    assert "pca_variance must be in (0, 1]" in p.stderr
    assert "Traceback" not in p.stderr


def test_evaluate_needs_a_category(synthetic_root):
    r = runner.invoke(app, ["evaluate", "--data-root", str(synthetic_root), *TINY_FLAGS])
    assert r.exit_code != 0


def test_set_parses_typed_values():
    from patchknn.cli import method_options

    c = method_options("paper", settings=["k=3", "pca_variance=none", "tta=hflip,vflip", "threshold_method=none",
                                          "smoothing_sigma=0.5", "layer_norm=true"])
    assert c.k == 3 and c.pca_variance is None and c.tta == ("hflip", "vflip")
    assert c.threshold_method == "none" and c.smoothing_sigma == 0.5 and c.layer_norm is True
