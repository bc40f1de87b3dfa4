import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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
    p = subprocess.run(
        [sys.executable, "-m", "patchknn.cli", "fit", str(tmp_path), "--output", str(tmp_path / "m"),
         "--pca-variance", "1.5"],
        capture_output=True, text=True,
    )
    assert p.returncode == 2
    assert "pca_variance must be in (0, 1]" in p.stderr
    assert "Traceback" not in p.stderr


def test_evaluate_needs_a_category(synthetic_root):
    p = subprocess.run(
        [sys.executable, "-m", "patchknn.cli", "evaluate", "--data-root", str(synthetic_root), *TINY_FLAGS],
        capture_output=True, text=True,
    )
    assert p.returncode == 2
    assert p.stderr == "error: give --category NAME (repeatable) or --all\n"


def test_predict_skip_does_not_count_skipped_files_as_scored(synthetic_root, tmp_path):
    good = sorted((synthetic_root / "synthetic" / "test" / "good").glob("*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(good[0].read_bytes()[:60])  # a truncated PNG
    model_dir = tmp_path / "model"
    r = runner.invoke(app, ["fit", str(synthetic_root / "synthetic" / "train" / "good"), "-o", str(model_dir),
                            *TINY_FLAGS])
    assert r.exit_code == 0, r.output
    out = tmp_path / "pred"
    r = runner.invoke(app, ["predict", str(model_dir), *map(str, good), str(broken), "-o", str(out),
                            "--on-error", "skip", "--threshold", "1e9"])
    assert r.exit_code == 0, r.output
    assert f"scored 3 images (0 NG), 1 skipped (unreadable, see above) -> {out / 'scores.csv'}" in r.output
    assert f"skipped {broken}: " in r.output
    rows = json.loads((out / "scores.json").read_text())
    assert [row["error"] is None for row in rows] == [True, True, True, False]
    assert rows[3]["image"] == str(broken) and rows[3]["score"] is None and rows[3]["overlay"] is None


def test_fit_on_one_image_says_so_in_two_clean_lines(synthetic_root, tmp_path):
    """One training image: "fitted on 1 image" (singular) and the CalibrationWarning as one line
    ``warning: ...`` (no file name, line number or source line, as Python shows warnings)."""
    one = sorted((synthetic_root / "synthetic" / "train" / "good").glob("*.png"))[0]
    flags = [f for f in TINY_FLAGS if f != "-q"]
    p = subprocess.run(
        [sys.executable, "-m", "patchknn.cli", "fit", str(one), "--output", str(tmp_path / "m"), *flags],
        capture_output=True, text=True,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("fitted on 1 image in "), p.stdout
    warning_lines = [line for line in p.stderr.splitlines() if "warn" in line.lower()]
    assert warning_lines == [
        "warning: no decision threshold: only 1 training image (the threshold needs images the bank has not "
        "seen); set one with model.threshold_ = ... or --threshold"
    ], p.stderr
    assert "CalibrationWarning" not in p.stderr and ".py:" not in p.stderr


def test_warnings_keep_their_default_display_outside_the_cli():
    """The one-line display is the command line's own: importing the CLI changes nothing."""
    import warnings

    import patchknn.cli  # noqa: F401

    assert warnings.showwarning is not patchknn.cli._show_warning


def test_set_parses_typed_values():
    from patchknn.options import method_choice

    c = method_choice("paper", settings=["k=3", "pca_variance=none", "tta=hflip,vflip", "threshold_method=none",
                                         "smoothing_sigma=0.5", "layer_norm=true"]).config()
    assert c.k == 3 and c.pca_variance is None and c.tta == ("hflip", "vflip")
    assert c.threshold_method == "none" and c.smoothing_sigma == 0.5 and c.layer_norm is True


def test_demo_writes_report_overlays_and_says_what_to_open(tmp_path, monkeypatch):
    """`patchknn demo` (a smaller synthetic set here): numbers, and the HTML report, the overlays of
    the test images and the paths to open next."""
    from functools import partial

    from PIL import Image

    import patchknn.synthetic

    monkeypatch.setattr(patchknn.synthetic, "make_synthetic_dataset",
                        partial(patchknn.synthetic.make_synthetic_dataset, n_train=6, n_test_good=2,
                                n_test_defective=3, image_size=64))
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "-o", str(out), "--backbone", "efficientnet-lite2"])
    assert r.exit_code == 0, r.output
    page = out / "report" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert "synthetic" in html and "<table" in html
    overlays = sorted((out / "predictions" / "overlays").iterdir())
    assert len(overlays) == 5
    for path in overlays:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 0
    rows = json.loads((out / "predictions" / "scores.json").read_text())
    assert sorted(Path(row["overlay"]).name for row in rows) == [p.name for p in overlays]
    kinds = {p.name.rsplit("_", 1)[0] for p in overlays}  # named after the test folder and the file
    assert "good" in kinds and len(kinds) >= 2
    assert json.loads((out / "results.json").read_text())["categories"]["synthetic"]["n_test"] == 5
    assert PatchKNN.load(out / "model").threshold_ is not None
    assert "open next:" in r.output
    for path in (page, out / "predictions" / "overlays", out / "model", out / "results.json"):
        assert str(path) in r.output


_HEAVY = ("torch", "faiss", "scipy", "matplotlib")
_PROBE = (
    "import atexit, sys; "
    f"atexit.register(lambda: print('heavy:', sorted(m for m in {_HEAVY!r} if m in sys.modules), file=sys.stderr)); "
    "from patchknn.cli import main; main()"
)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """``patchknn ARGS`` through main() in a fresh interpreter, reporting the heavy modules it imported."""
    return subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120)


def test_help_and_usage_errors_are_light_and_one_line():
    """`patchknn --help` answers without torch; a typo is one line naming the likely command, exit 2."""
    p = _run_cli("--help")
    assert p.returncode == 0, p.stderr
    assert all(name in p.stdout for name in ("fit", "predict", "evaluate", "fit-many", "score-archive"))
    assert p.stderr.strip() == "heavy: []"

    p = _run_cli("fitt")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == ["patchknn: no such command 'fitt' (did you mean 'fit'?)", "heavy: []"]

    p = _run_cli("fit", "--kk", "3", "images", "-o", "model")
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        "patchknn fit: no such option: --kk (did you mean --k?); see 'patchknn fit --help'", "heavy: []"
    ]
    p = _run_cli("fit", "images")
    assert p.returncode == 2 and p.stderr.splitlines()[0] == (
        "patchknn fit: missing option '--output' / '-o'; see 'patchknn fit --help'"
    )


def test_method_flags_are_one_definition_shared_by_the_commands():
    """fit, evaluate, fit-many and tune offer the same method flags (one per PatchKNNConfig field
    named in options.METHOD_FLAG_HELP, named after it, with its help text) and --set; fit and
    evaluate take --preset auto, fit-many the named presets only, tune no --preset (its flags are
    fixed in every candidate). partial-fit and tune take fit's run flags, from options.RunOptions."""
    import typer

    from patchknn.options import METHOD_FLAG_HELP

    group = typer.main.get_command(app)
    shown, presets = {}, {}
    for name in ("fit", "evaluate", "fit-many", "tune"):
        params = {p.name: p for p in group.commands[name].params}
        shown[name] = {n: (tuple(params[n].opts), tuple(params[n].secondary_opts), params[n].help)
                       for n in (*METHOD_FLAG_HELP, "settings")}
        presets[name] = params["preset_name"].help if "preset_name" in params else None
    assert shown["fit"] == shown["evaluate"] == shown["fit-many"] == shown["tune"]
    assert shown["fit"]["image_size"] == (("--image-size",), (), "Input resize (pixels).")
    assert shown["fit"]["layer_norm"][:2] == (("--layer-norm",), ("--no-layer-norm",))
    assert set(shown["fit"]["k"][0]) == {"--k", "-k"}
    assert presets["fit"] == presets["evaluate"] and "paper, best, fast or auto" in presets["fit"]
    assert "auto" not in presets["fit-many"] and "paper, best, fast" in presets["fit-many"]
    assert presets["tune"] is None
    r = CliRunner().invoke(app, ["fit", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "auto" in r.output
    for field, (_, help_text) in METHOD_FLAG_HELP.items():
        assert "--" + field.replace("_", "-") in r.output and help_text in r.output, field

    def run_flags(command: str) -> dict:
        return {p.name: (tuple(p.opts), p.help, p.default) for p in group.commands[command].params
                if p.name in ("weights", "device", "batch_size", "workers", "on_error", "quiet", "max_pixels")}

    fit_flags = run_flags("fit")
    assert run_flags("partial-fit") == {n: v for n, v in fit_flags.items() if n != "weights"}  # the model's own
    assert run_flags("tune") == {n: v for n, v in fit_flags.items() if n != "on_error"}
    assert run_flags("rollback")["quiet"] == fit_flags["quiet"]


def test_tune_fixes_its_method_flags_in_every_candidate(monkeypatch, tmp_path):
    """`patchknn tune --k 3 --seed 4 --set ...`: the flags are the options fixed in every candidate, as
    with `fit --preset auto`, and --seed seeds the split and the defects too."""
    from patchknn.errors import PatchKNNError
    from patchknn.tune import search

    seen = {}

    def spy(sources, **kwargs):
        seen.update(kwargs, sources=sources)
        raise PatchKNNError("stop here")

    monkeypatch.setattr(search, "tune", spy)
    r = runner.invoke(app, ["tune", str(tmp_path), "--k", "3", "--seed", "4", "--set", "image_size=64",
                            "--batch-size", "2", "--budget", "0.5", "-q"])
    assert isinstance(r.exception, PatchKNNError), r.output
    assert seen["fixed"] == {"k": 3, "seed": 4, "image_size": 64} and seen["seed"] == 4
    assert seen["budget_minutes"] == 0.5 and seen["batch_size"] == 2 and seen["progress"] is False
    assert seen["sources"] == [str(tmp_path)] and seen["on_error"] == "stop"
    r = runner.invoke(app, ["fit-many", str(tmp_path), "-o", str(tmp_path / "out"), "--preset", "auto"])
    assert r.exit_code != 0 and "--preset auto is chosen by `patchknn tune`" in str(r.exception)


def test_method_flags_parse_like_set():
    """A flag's value goes through config.parse_option, as --set NAME=VALUE does; 0 turns PCA off."""
    from patchknn.options import method_choice

    by_flags = method_choice("fast", layers="layer2,layer3", tta="hflip", pca_variance=0, layer_norm=True, k=2).config()
    by_set = method_choice("fast", settings=["layers=layer2,layer3", "tta=hflip", "pca_variance=none",
                                             "layer_norm=true", "k=2"]).config()
    assert by_flags == by_set
    assert by_flags.layers == ("layer2", "layer3") and by_flags.pca_variance is None and by_flags.index == "ivf"
    choice = method_choice("paper", image_size=None, seed=3)
    assert choice.preset == "paper" and dict(choice.overrides) == {"seed": 3}


def test_fit_compact_leaves_out_the_training_bank_and_partial_fit_says_why(synthetic_root, tmp_path):
    """A coreset model keeps its full training bank (for partial-fit) unless fitted with --compact,
    which writes a smaller file that partial-fit refuses with one line."""
    train = synthetic_root / "synthetic" / "train" / "good"
    sizes = {}
    for name, extra in (("full", []), ("compact", ["--compact"])):
        r = runner.invoke(app, ["fit", str(train), "-o", str(tmp_path / name), "--coreset-ratio", "0.2",
                                *TINY_FLAGS, *extra])
        assert r.exit_code == 0, r.output
        sizes[name] = sum(f.stat().st_size for f in (tmp_path / name).rglob("*") if f.is_file())
    assert list((tmp_path / "full").glob("training-*")) and not list((tmp_path / "compact").glob("training-*"))
    assert sizes["compact"] < sizes["full"]
    normal = sorted(train.glob("*.png"))[0]
    p = subprocess.run([sys.executable, "-m", "patchknn.cli", "partial-fit", str(tmp_path / "compact"), str(normal),
                        "-q"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "no training bank" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1  # one line, no traceback
    r = runner.invoke(app, ["partial-fit", str(tmp_path / "full"), str(normal), "-q"])
    assert r.exit_code == 0, r.output
    # fit's run flags: --on-error skip reports an unreadable image and adds the others
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    r = runner.invoke(app, ["partial-fit", str(tmp_path / "full"), str(normal), str(tmp_path / "broken.png"),
                            "--on-error", "skip", "--batch-size", "1", "--workers", "0", "--max-pixels", "100000"])
    assert r.exit_code == 0, r.output
    assert f"skipped {tmp_path / 'broken.png'}: " in r.output and "version 3" in r.output
    assert "1 image(s) added" in r.output
    r = runner.invoke(app, ["partial-fit", str(tmp_path / "full"), str(tmp_path / "broken.png"), "-q"])
    assert r.exit_code != 0 and "broken.png" in str(r.exception)  # --on-error stop (the default)


def test_evaluate_a_saved_model(synthetic_root, tmp_path):
    """`evaluate --model DIR` scores a saved model (no fit) with its own threshold: the same metrics
    as scoring the loaded model through the API, and the document names the model's training."""
    from patchknn import PatchKNN
    from patchknn.data import MVTecCategory
    from patchknn.evaluation import score_category

    model_dir = tmp_path / "model"
    r = runner.invoke(app, ["fit", str(synthetic_root / "synthetic" / "train" / "good"), "-o", str(model_dir),
                            *TINY_FLAGS, "--set", "threshold_method=quantile"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "results.json"
    r = runner.invoke(app, ["evaluate", "--model", str(model_dir), "--data-root", str(synthetic_root),
                            "-c", "synthetic", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    row = doc["categories"]["synthetic"]
    model = PatchKNN.load(model_dir, progress=False)
    want = score_category(model, MVTecCategory(synthetic_root, "synthetic")).metrics
    assert row["threshold"] == model.threshold_ and "fit_seconds" not in row
    for key in ("pixel_auprc", "image_auroc", "threshold_image_f1"):
        assert row[key] == pytest.approx(want[key], abs=1e-12)
    assert doc["model_fit_info"]["n_train_images"] == 8 and doc["config"]["image_size"] == 64


def test_evaluate_preset_auto_passes_max_fit_images(synthetic_root, monkeypatch):
    """`evaluate --preset auto --max-fit-images N` hands N to tune's candidate fits (as `tune` does)."""
    import patchknn.evaluation as evaluation

    got = {}

    def fake(root, names, config, **kwargs):
        got["config"] = config
        return {"config": config.to_dict(), "categories": {}, "mean": {}}

    monkeypatch.setattr(evaluation, "evaluate", fake)
    monkeypatch.setattr(evaluation, "markdown_table", lambda results: "")
    r = runner.invoke(app, ["evaluate", "--data-root", str(synthetic_root), "-c", "synthetic", "--preset", "auto",
                            "--budget", "0.5", "--max-fit-images", "5", "-q"])
    assert r.exit_code == 0, r.output
    assert isinstance(got["config"], evaluation.AutoPreset)
    assert got["config"].max_fit_images == 5 and got["config"].budget_minutes == 0.5


def test_evaluate_rejects_flags_that_would_be_ignored(synthetic_root, tmp_path):
    """--model with method flags, or --max-fit-images without --preset auto: a usage error (a
    ConfigError, which the CLI prints in one line with exit code 2) instead of ignoring them."""
    from patchknn.errors import ConfigError

    for extra, message in ((["--model", str(tmp_path), "--preset", "fast"], "--model evaluates a saved model"),
                           (["--max-fit-images", "5"], "--max-fit-images applies to --preset auto")):
        r = runner.invoke(app, ["evaluate", "--data-root", str(synthetic_root), "-c", "synthetic", *extra, "-q"])
        assert isinstance(r.exception, ConfigError) and message in str(r.exception), r.output
