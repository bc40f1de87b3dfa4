"""Messy image input, end to end: the same rules in load_image, fit, predict, evaluate, the CLI and
the server, or an error that names the file and the reason (issue #7, "Image input").

The decoding rules themselves are tested in detail in test_data.py; this module checks that every
entry point applies them identically, the ``on_error`` policy (stop / skip and report), and the
``max_pixels`` decompression-bomb limit as a PatchKNN option and a CLI flag.
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from patchknn import ConfigError, ImageError, PatchKNN
from patchknn.data import DEFAULT_MAX_PIXELS, ImageDataset, load_image

FAST = {"layers": ["layer1"], "image_size": 32, "grid_size": 8, "threshold_method": "none"}
CLI_FAST = [
    "--backbone", "resnet50", "--weights", "random", "--layers", "layer1", "--image-size", "32",
    "--grid-size", "8", "--threshold-method", "none", "-q",
]  # fmt: skip
H, W = 40, 48
runner = CliRunner()


# -------------------------------------------------------------------------------------------------
# the image zoo: valid variants (with the array each must decode to) and bad files
# -------------------------------------------------------------------------------------------------
def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims ``width x height`` (CRC fixed): a tiny 'bomb'."""
    data = bytearray(_encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


BAD_REASONS = {
    "empty.png": "empty file",
    "text.jpg": "not a supported image format",
    "corrupt.png": "not a supported image format|corrupt",
    "truncated.png": "corrupt or truncated",
    "truncated.jpg": "corrupt or truncated",
    "bomb.png": r"over the limit of 64,000,000 \(max_pixels",
    "postscript.png": "not a supported image format",
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("zoo") / "dossier d'entrée ü 日本 x"
    good, variants, bad = root / "good", root / "variants", root / "bad"
    for folder in (good, variants, bad):
        folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good_paths = []
    for i in range(3):
        path = good / f"normal {i}.png"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
        good_paths.append(path)

    base = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    gray = base.mean(axis=2).astype(np.uint8)
    expected: dict[str, np.ndarray] = {}

    def add(name: str, data: bytes, array: np.ndarray) -> None:
        (variants / name).write_bytes(data)
        expected[name] = array

    add("rgb.png", _encode(Image.fromarray(base), "PNG"), base)
    add("ünïcödé näme 日本.png", _encode(Image.fromarray(base), "PNG"), base)
    add("UPPER CASE.PNG", _encode(Image.fromarray(base), "PNG"), base)
    add("gray.png", _encode(Image.fromarray(gray, "L"), "PNG"), np.repeat(gray[..., None], 3, 2))
    sixteen = (gray.astype(np.uint16) << 8) | rng.integers(0, 256, gray.shape, dtype=np.uint16)
    add("gray16.png", _encode(Image.fromarray(sixteen), "PNG"), np.repeat(gray[..., None], 3, 2))
    add("gray16.tiff", _encode(Image.fromarray(sixteen), "TIFF"), np.repeat(gray[..., None], 3, 2))
    palette = Image.fromarray(base).quantize(16)
    add("palette.png", _encode(palette, "PNG"), np.asarray(palette.convert("RGB")))
    add("palette.gif", _encode(palette, "GIF"), np.asarray(palette.convert("RGB")))
    cmyk = Image.fromarray(base).convert("CMYK")
    add("cmyk.tiff", _encode(cmyk, "TIFF"), np.asarray(cmyk.convert("RGB")))
    alpha = rng.integers(0, 256, (H, W, 1), dtype=np.uint8)
    add("rgba.png", _encode(Image.fromarray(np.concatenate([base, alpha], 2), "RGBA"), "PNG"), base)
    add(
        "rgba.webp",
        _encode(Image.fromarray(np.concatenate([base, alpha], 2), "RGBA"), "WEBP", lossless=True, exact=True),
        base,
    )
    plain_jpeg = _encode(Image.fromarray(base), "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored pixels must be turned 90 degrees clockwise for display
    add(
        "exif rotated.jpg",
        _encode(Image.fromarray(base), "JPEG", quality=95, exif=exif.tobytes()),
        np.ascontiguousarray(np.rot90(load_image(plain_jpeg), 3)),
    )

    png = _encode(Image.fromarray(base), "PNG")
    jpg = plain_jpeg
    bad_data = {
        "empty.png": b"",
        "text.jpg": b"this is a text file, not a JPEG\n",
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
        "truncated.png": png[: len(png) * 2 // 3],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "bomb.png": _png_claiming(20_000, 20_000),
        "postscript.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    }
    for name, data in bad_data.items():
        (bad / name).write_bytes(data)
    assert set(bad_data) == set(BAD_REASONS)
    return {
        "root": root,
        "good": good_paths,
        "good_dir": good,
        "variants_dir": variants,
        "variants": {name: variants / name for name in expected},
        "expected": expected,
        "bad_dir": bad,
        "bad": {name: bad / name for name in bad_data},
    }


@pytest.fixture(scope="module")
def model(zoo) -> PatchKNN:
    return tiny_model(**FAST).fit(zoo["good"])


def predict_with(model: PatchKNN, sources: list, **runtime: Any) -> list:
    """Predict with some runtime options changed for this call only (the fixture is shared)."""
    saved = {k: getattr(model, k) for k in runtime}
    try:
        for k, v in runtime.items():
            setattr(model, k, v)
        return model.predict(sources)
    finally:
        for k, v in saved.items():
            setattr(model, k, v)


# -------------------------------------------------------------------------------------------------
# valid variants: the same everywhere
# -------------------------------------------------------------------------------------------------
def test_variants_decode_as_documented(zoo):
    for name, path in zoo["variants"].items():
        np.testing.assert_array_equal(load_image(path), zoo["expected"][name], err_msg=name)
        np.testing.assert_array_equal(load_image(str(path)), zoo["expected"][name], err_msg=name)
        np.testing.assert_array_equal(load_image(path.read_bytes()), zoo["expected"][name], err_msg=name)


def test_variants_score_the_same_from_files_and_arrays(zoo, model):
    names = sorted(zoo["variants"])
    paths = [zoo["variants"][n] for n in names]
    arrays = [zoo["expected"][n] for n in names]
    by_path = model.predict(paths)
    by_array = model.predict(arrays)
    by_folder = model.predict(zoo["variants_dir"])
    by_name = {Path(p.source).name: p for p in by_folder}
    for name, a, b in zip(names, by_path, by_array):
        assert a.error is None and a.source == str(zoo["variants"][name])
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map, err_msg=name)
        np.testing.assert_array_equal(a.anomaly_map, by_name[name].anomaly_map, err_msg=name)
        assert np.isfinite(a.anomaly_map).all() and a.score == b.score
    # an alpha channel is dropped, whatever it holds: the RGBA file scores exactly like the RGB one
    np.testing.assert_array_equal(
        by_path[names.index("rgba.png")].anomaly_map, by_path[names.index("rgb.png")].anomaly_map
    )
    # maps at the original size follow the EXIF orientation
    rotated = model.predict([zoo["variants"]["exif rotated.jpg"]], output_size="original")[0]
    assert rotated.anomaly_map.shape == (W, H)


def test_fit_from_files_equals_fit_from_arrays(zoo):
    names = sorted(zoo["variants"])
    m = tiny_model(**FAST)
    m.fit([zoo["variants"][n] for n in names])
    bank_files = m.index_.bank.copy()
    m.fit([zoo["expected"][n] for n in names])
    np.testing.assert_array_equal(bank_files, m.index_.bank)
    assert m.fit_info_["n_train_images"] == len(names)


def test_server_decodes_like_the_estimator(zoo, model):
    pytest.importorskip("fastapi")
    server_app = pytest.importorskip("patchknn.server.app")
    prepare = getattr(server_app, "_prepare", None)
    if prepare is None:
        pytest.skip("the server has no _prepare(bytes, image_size, max_pixels) step any more")
    for name, path in zoo["variants"].items():
        tensor, size = prepare(path.read_bytes(), 32, DEFAULT_MAX_PIXELS)
        record = ImageDataset([path], 32)[0]
        assert record.error is None
        assert tuple(size) == record.size, name
        np.testing.assert_array_equal(np.asarray(tensor).reshape(record.image.shape), record.image.numpy())
    with pytest.raises(ImageError, match="over the limit"):
        prepare(zoo["variants"]["rgb.png"].read_bytes(), 32, 100)


# -------------------------------------------------------------------------------------------------
# bad files: an error naming the file and the reason, or skipped and reported
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BAD_REASONS))
def test_bad_file_named_with_reason_everywhere(zoo, model, name):
    path = zoo["bad"][name]
    reason = BAD_REASONS[name]
    with pytest.raises(ImageError, match=reason) as info:
        load_image(path)
    assert info.value.source == str(path) and str(path) in str(info.value)
    with pytest.raises(ImageError, match=reason) as info:
        model.predict([zoo["good"][0], path])
    assert info.value.source == str(path)
    fitter = tiny_model(**FAST)
    fitter._extractor = model.extractor  # share the backbone: no need to build it again
    with pytest.raises(ImageError, match=reason) as info:
        fitter.fit([*zoo["good"], path])
    assert info.value.source == str(path)
    assert not fitter.is_fitted


def test_skip_policy_fit_and_predict(zoo, model):
    bad = [zoo["bad"][n] for n in sorted(zoo["bad"])]
    fitter = tiny_model(on_error="skip", **FAST)
    fitter._extractor = model.extractor
    fitter.fit([bad[0], *zoo["good"], *bad[1:]])
    assert [src for src, _ in fitter.skipped_] == [str(p) for p in bad]
    for (_, reason), p in zip(fitter.skipped_, bad):
        assert reason and str(p) not in reason  # the reason alone; the source is beside it
    assert fitter.fit_info_["n_skipped"] == len(bad)
    assert fitter.fit_info_["n_train_images"] == len(zoo["good"])
    np.testing.assert_array_equal(fitter.index_.bank, model.index_.bank)  # as if the bad files were absent

    good = zoo["variants"]["rgb.png"]
    sources = [bad[0], good, *bad[1:3], good, bad[3]]
    preds = predict_with(model, sources, on_error="skip")
    assert [p.source for p in preds] == [str(s) for s in sources]
    for p, s in zip(preds, sources):
        if s == good:
            assert p.error is None and np.isfinite(p.anomaly_map).all() and np.isfinite(p.score)
        else:
            assert p.anomaly_map is None and p.score is None and p.verdict is None
            assert p.error and len(p.error) > 5


def test_all_training_images_bad(zoo, model):
    fitter = tiny_model(on_error="skip", **FAST)
    fitter._extractor = model.extractor
    with pytest.raises(ConfigError, match="no usable image"):
        fitter.fit(sorted(zoo["bad"].values()))


# -------------------------------------------------------------------------------------------------
# max_pixels: a PatchKNN option
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "big", [10]])
def test_max_pixels_validated(bad):
    with pytest.raises(ConfigError, match="max_pixels"):
        PatchKNN(max_pixels=bad)


def test_max_pixels_option(zoo, model, tmp_path):
    assert model.max_pixels == DEFAULT_MAX_PIXELS
    good = zoo["variants"]["rgb.png"]
    assert predict_with(model, [good], max_pixels=H * W)[0].error is None  # the limit is inclusive
    with pytest.raises(ImageError, match=f"over the limit of {H * W - 1:,}") as info:
        predict_with(model, [good], max_pixels=H * W - 1)
    assert info.value.source == str(good)
    skipped = predict_with(model, [good], max_pixels=H * W - 1, on_error="skip")[0]
    assert "max_pixels" in skipped.error
    # arrays are held to the same limit
    with pytest.raises(ImageError, match="over the limit"):
        predict_with(model, [zoo["expected"]["rgb.png"]], max_pixels=100)
    # without our limit, Pillow's own guard still refuses the 400-megapixel header
    with pytest.raises(ImageError, match="decompression-bomb"):
        predict_with(model, [zoo["bad"]["bomb.png"]], max_pixels=None)
    # fit uses it too
    fitter = tiny_model(max_pixels=100, **FAST)
    fitter._extractor = model.extractor
    with pytest.raises(ImageError, match="over the limit of 100"):
        fitter.fit(zoo["good"])
    # a runtime option: not saved with the model, given again at load
    path = model.save(tmp_path / "m")
    assert "max_pixels" not in (path / "patchknn.json").read_text()
    assert PatchKNN.load(path, max_pixels=123).max_pixels == 123
    assert PatchKNN.load(path).max_pixels == DEFAULT_MAX_PIXELS


# -------------------------------------------------------------------------------------------------
# the command line
# -------------------------------------------------------------------------------------------------
def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "scores.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_cli_fit_and_predict_skip_report_bad_files(zoo, tmp_path):
    from patchknn.cli import app

    out = tmp_path / "modèle ü"
    r = runner.invoke(
        app, ["fit", str(zoo["good_dir"]), str(zoo["bad_dir"]), "-o", str(out), "--on-error", "skip", *CLI_FAST]
    )
    assert r.exit_code == 0, r.output
    for name, path in zoo["bad"].items():
        assert f"skipped {path}: " in r.stderr, name
    assert PatchKNN.load(out).fit_info_["n_skipped"] == len(zoo["bad"])

    pred_dir = tmp_path / "prédictions"
    r = runner.invoke(
        app, ["predict", str(out), str(zoo["variants_dir"]), str(zoo["bad_dir"]), "-o", str(pred_dir),
              "--on-error", "skip", "-q"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = {Path(row["image"]).name: row for row in _rows(pred_dir)}
    assert len(rows) == len(zoo["variants"]) + len(zoo["bad"])
    for name in zoo["bad"]:
        assert rows[name]["error"] and rows[name]["score"] == "" and rows[name]["map"] == ""
        assert f"skipped {zoo['bad'][name]}: {rows[name]['error']}" in r.stderr
    for name in zoo["variants"]:
        row = rows[name]
        assert row["error"] == "" and np.isfinite(float(row["score"]))
        amap = np.load(pred_dir / row["map"], allow_pickle=False)
        assert amap.shape == (32, 32) and np.isfinite(amap).all()
        assert (pred_dir / row["overlay"]).is_file()
    assert json.loads((pred_dir / "scores.json").read_text(encoding="utf-8"))


def test_cli_stop_is_one_clear_line(zoo, tmp_path, monkeypatch, capsys):
    """``patchknn`` (through main()): exit code 2 and ``error: <file>: <reason>``, no traceback."""
    from patchknn import cli

    out = tmp_path / "m"
    bad = zoo["bad"]["truncated.png"]
    monkeypatch.setattr(sys, "argv", ["patchknn", "fit", str(zoo["good_dir"]), str(bad), "-o", str(out), *CLI_FAST])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: corrupt or truncated") and "\n" not in err
    assert not out.exists()


def test_cli_max_pixels_flag(zoo, tmp_path):
    from patchknn.cli import app

    model_dir = tmp_path / "m"
    r = runner.invoke(app, ["fit", str(zoo["good_dir"]), "-o", str(model_dir), "--max-pixels", "100", *CLI_FAST])
    assert isinstance(r.exception, ImageError) and "over the limit of 100" in str(r.exception)
    r = runner.invoke(app, ["fit", str(zoo["good_dir"]), "-o", str(model_dir), "--max-pixels", "0", *CLI_FAST])
    assert r.exit_code == 0, r.output

    good = zoo["variants"]["rgb.png"]
    r = runner.invoke(app, ["predict", str(model_dir), str(good), "-o", str(tmp_path / "p1"), "--max-pixels", "100"])
    assert isinstance(r.exception, ImageError) and str(good) in str(r.exception)
    bomb = zoo["bad"]["bomb.png"]
    r = runner.invoke(app, ["predict", str(model_dir), str(bomb), "-o", str(tmp_path / "p2"), "--max-pixels", "0"])
    assert isinstance(r.exception, ImageError) and "decompression-bomb" in str(r.exception)
    r = runner.invoke(app, ["predict", str(model_dir), str(bomb), "-o", str(tmp_path / "p3")])
    assert isinstance(r.exception, ImageError) and "64,000,000" in str(r.exception)
    r = runner.invoke(app, ["predict", str(model_dir), str(good), "-o", str(tmp_path / "p4"), "--max-pixels", "-5"])
    assert r.exit_code == 2 and "max-pixels" in r.output
    r = runner.invoke(
        app, ["predict", str(model_dir), str(good), "-o", str(tmp_path / "p5"), "--max-pixels", str(H * W), "-q"]
    )
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def mvtec_like(zoo, tmp_path_factory) -> Path:
    """A tiny MVTec-layout dataset under a non-ASCII path, with variant images in every split."""
    root = tmp_path_factory.mktemp("mvtec") / "données é"
    cat = root / "catégorie 1"
    (cat / "train" / "good").mkdir(parents=True)
    (cat / "test" / "good").mkdir(parents=True)
    (cat / "test" / "défaut").mkdir(parents=True)
    (cat / "ground_truth" / "défaut").mkdir(parents=True)
    names = sorted(zoo["variants"])
    for i, name in enumerate(names[:5]):
        (cat / "train" / "good" / f"{i} {name}").write_bytes(zoo["variants"][name].read_bytes())
    for name in names[5:8]:
        (cat / "test" / "good" / name).write_bytes(zoo["variants"][name].read_bytes())
    for name in names[8:11]:
        (cat / "test" / "défaut" / name).write_bytes(zoo["variants"][name].read_bytes())
        h, w = zoo["expected"][name].shape[:2]
        mask = np.zeros((h, w), np.uint8)
        mask[5:15, 5:20] = 255
        Image.fromarray(mask).save(cat / "ground_truth" / "défaut" / f"{Path(name).stem}_mask.png")
    return root


def test_cli_evaluate_with_messy_images(mvtec_like, tmp_path):
    from patchknn.cli import app

    results = tmp_path / "résultats.json"
    args = ["evaluate", "--data-root", str(mvtec_like), "-c", "catégorie 1", *CLI_FAST]
    r = runner.invoke(app, [*args, "-o", str(results)])
    assert r.exit_code == 0, r.output
    row = json.loads(results.read_text())["categories"]["catégorie 1"]
    assert row["n_train"] == 5 and row["n_test"] == 6
    # the command's metrics are scikit-learn's on the maps and masks of the same evaluation (API)
    from sklearn.metrics import average_precision_score, roc_auc_score

    from patchknn.config import PatchKNNConfig
    from patchknn.evaluation import evaluate_category

    ev = evaluate_category(mvtec_like, "catégorie 1", PatchKNNConfig(backbone="resnet50", **FAST),
                           weights="random", progress=False)
    assert ev.maps.shape == ev.masks.shape == (6, 32, 32) and ev.labels.tolist().count(1) == 3
    y, s = ev.masks.ravel(), ev.maps.ravel().astype(np.float64)
    assert row["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert row["pixel_auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert row["image_auroc"] == pytest.approx(roc_auc_score(ev.labels, ev.scores), abs=1e-9)

    r = runner.invoke(app, [*args, "--max-pixels", "100"])
    assert isinstance(r.exception, ImageError) and "over the limit of 100" in str(r.exception)
    assert str(mvtec_like) in str(r.exception)


def test_evaluate_names_a_broken_test_image(mvtec_like, tmp_path):
    from patchknn.config import PatchKNNConfig
    from patchknn.evaluation import evaluate_category

    root = tmp_path / "copy"
    shutil.copytree(mvtec_like, root)
    victim = sorted((root / "catégorie 1" / "test" / "good").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    config = PatchKNNConfig(backbone="resnet50", **FAST)
    runtime = {"weights": "random", "progress": False}
    with pytest.raises(ImageError, match="corrupt") as info:
        evaluate_category(root, "catégorie 1", config, **runtime)
    assert info.value.source == str(victim)
    with pytest.raises(ImageError, match="cannot be skipped") as info:
        evaluate_category(root, "catégorie 1", config, on_error="skip", **runtime)
    assert info.value.source == str(victim)


# -------------------------------------------------------------------------------------------------
# property-based: random files, random arrays, through load_image and PatchKNN.predict(skip)
# -------------------------------------------------------------------------------------------------
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "I;16", "F"]
FORMATS = ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "TGA", "ICO"]
SUFFIXES = [".png", ".jpg", ".JPEG", ".tif", ".bmp", ".webp", ".gif", ".txt", ""]
_TMP = tempfile.mkdtemp(prefix="patchknn robust ü ")
atexit.register(shutil.rmtree, _TMP, True)


@st.composite
def image_files(draw: st.DrawFn) -> Path:
    """A file with a random image (mode, size, format), maybe damaged, under a random name."""
    kind = draw(st.sampled_from(["image", "image", "image", "bytes"]))
    if kind == "bytes":
        data = draw(st.binary(max_size=600))
    else:
        mode = draw(st.sampled_from(MODES))
        w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        n = len(Image.new(mode, (w, h)).tobytes())
        raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, n, dtype=np.uint8)
        img = Image.frombytes(mode, (w, h), raw.tobytes())
        try:
            data = _encode(img, draw(st.sampled_from(FORMATS)))
        except Exception:  # this mode cannot be written in this format
            data = _encode(img.convert("RGB"), "PNG")
        damage = draw(st.sampled_from(["none", "none", "cut", "flip"]))
        if damage == "cut":
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif damage == "flip":
            pos = draw(st.integers(0, len(data) - 1))
            data = data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1 :]
    name = draw(st.text(st.characters(codec="utf-8", exclude_characters="/\\\x00"), min_size=1, max_size=12))
    name = name.strip(". ") or "x"
    folder = Path(tempfile.mkdtemp(dir=_TMP))
    path = folder / f"{name[:40]}{draw(st.sampled_from(SUFFIXES))}"
    try:
        path.write_bytes(data)
    except OSError:  # a name the file system refuses
        path = folder / "fallback.png"
        path.write_bytes(data)
    return path


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int16, np.float32, np.float64, np.bool_]))
    shape = draw(st.sampled_from([(0, 5), (1, 1), (3, 70), (9, 9, 1), (12, 7, 3), (6, 6, 4), (5, 5, 2), (4, 4, 4, 3)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arr = rng.random(shape) * draw(st.sampled_from([1.0, 300.0, 1e30]))
    if draw(st.booleans()) and arr.size:
        arr.flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -1.0]))
    with np.errstate(invalid="ignore", over="ignore"):
        return arr.astype(dtype)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_files(), st.sampled_from([None, 1, 100, DEFAULT_MAX_PIXELS]))
def test_property_files_load_or_raise_image_error(path, max_pixels):
    try:
        out = load_image(path, max_pixels=max_pixels)
    except ImageError as e:
        assert e.source == str(path) and e.reason
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.size > 0
    assert out.flags.c_contiguous


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(image_files() | arrays(), min_size=1, max_size=4))
def test_property_predict_skip_never_raises(model_for_property, sources):
    preds = model_for_property.predict(sources)
    assert len(preds) == len(sources)
    for p, s in zip(preds, sources):
        if isinstance(s, Path):
            assert p.source == str(s)
        if p.error is not None:
            assert p.anomaly_map is None and p.score is None
        else:
            assert p.anomaly_map.shape == (32, 32) and p.anomaly_map.dtype == np.float32
            assert np.isfinite(p.anomaly_map).all() and np.isfinite(p.score)


@pytest.fixture(scope="module")
def model_for_property(zoo, model) -> PatchKNN:
    m = PatchKNN.__new__(PatchKNN)
    m.__dict__.update(model.__dict__)  # the same fitted state, its own runtime options
    m.on_error = "skip"
    return m
