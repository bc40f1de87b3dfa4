"""Model files are safe to move around: atomic saves, verified loads, clear errors, no pickle.

Covers issue #7, "Model files": a save killed at any moment leaves the previous model loadable and
unchanged; truncated, tampered, hand-edited (wrong JSON types, absurd sizes, negative counts,
inconsistent tensors) or unknown-backbone models fail with ModelFileError and nothing else; the
package never unpickles (checked on its source).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

import patchknn
from patchknn import ModelFileError, PatchKNN, PatchKNNError
from patchknn.serialization import LOCK_FILE, META_FILE, load_model, read_meta, save_model

FAST = {"layers": ["layer1"], "image_size": 32, "grid_size": 8, "threshold_method": "none"}
SRC = Path(patchknn.__file__).resolve().parent


def images(seed: int, n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Any]:
    """Two different fitted models saved: ``a`` (k=2, threshold 1.5) and ``b``."""
    root = tmp_path_factory.mktemp("models")
    a = tiny_model(k=2, **FAST).fit(images(0))
    a.threshold_ = 1.5
    b = tiny_model(k=1, weights="random:1", **FAST).fit(images(1, 4))  # other backbone weights too
    b.threshold_ = 7.25
    probe = images(2, 1)
    return {
        "a": a.save(root / "a"),
        "b": b.save(root / "b"),
        "probe": probe,
        "a_map": a.predict(probe)[0].anomaly_map,
    }


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, bytes]]]:
    """Everything a model directory says, comparable with ==."""
    doc, groups = load_model(path)
    return doc, {
        g: {k: v.tobytes() + str((v.dtype, v.shape)).encode() for k, v in t.items()} for g, t in groups.items()
    }


def edit_json(path: Path, change) -> None:
    doc = json.loads((path / META_FILE).read_text())
    change(doc)
    (path / META_FILE).write_text(json.dumps(doc))


def rewrite_group(path: Path, group: str, change) -> None:
    """Replace a tensor group *consistently* (new file, checksum and size updated in the JSON), i.e.
    a file that passes the integrity checks but holds something wrong."""
    doc = json.loads((path / META_FILE).read_text())
    entry = doc["files"][group]
    tensors = {k: v.copy() for k, v in st_load((path / entry["file"]).read_bytes()).items()}
    change(tensors)
    blob = st_save(tensors)
    (path / entry["file"]).write_bytes(blob)
    entry["sha256"] = hashlib.sha256(blob).hexdigest()
    entry["bytes"] = str(len(blob))
    (path / META_FILE).write_text(json.dumps(doc))


def assert_load_fails(path: Path, match: str | None = None) -> ModelFileError:
    with pytest.raises(ModelFileError, match=match) as info:
        PatchKNN.load(path, progress=False)
    assert str(path) in str(info.value)
    return info.value


# -------------------------------------------------------------------------------------------------
# atomic saves
# -------------------------------------------------------------------------------------------------
def test_saved_layout_and_round_trip(saved, tmp_path):
    path = copy_model(saved["a"], tmp_path / "m")
    names = sorted(p.name for p in path.iterdir())
    doc = read_meta(path)
    referenced = sorted(e["file"] for e in doc["files"].values())
    assert names == sorted([META_FILE, LOCK_FILE, *referenced]), "no temporary or stray files"
    for entry in doc["files"].values():
        blob = (path / entry["file"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
        assert int(entry["bytes"]) == len(blob)
    model = PatchKNN.load(path, progress=False)
    assert model.threshold_ == 1.5 and model.config.k == 2
    np.testing.assert_array_equal(model.predict(saved["probe"])[0].anomaly_map, saved["a_map"])


KILL_PROGRAM = textwrap.dedent(
    r"""
    import os, sys, tempfile, time
    from patchknn import PatchKNN

    target, source, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    model = PatchKNN.load(source, progress=False)
    real_mkstemp, real_fdopen, real_replace = tempfile.mkstemp, os.fdopen, os.replace
    names = {}

    def say(*words):
        print(*words, flush=True)

    class SlowFile:  # writes in 16 KiB chunks, announcing each: the parent kills at a chosen one
        def __init__(self, f, name):
            self.f, self.name = f, name
        def write(self, data):
            for i in range(0, len(data), 1 << 14):
                say("WRITE", self.name, i)
                self.f.write(data[i : i + (1 << 14)])
                self.f.flush()
                time.sleep(pause)
            return len(data)
        def __getattr__(self, item):
            return getattr(self.f, item)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        names[fd] = os.path.basename(path)
        return fd, path

    def slow_fdopen(fd, *args, **kwargs):
        return SlowFile(real_fdopen(fd, *args, **kwargs), names.get(fd, "?"))

    def loud_replace(src, dst):
        say("REPLACE", os.path.basename(dst))
        time.sleep(pause * 4)
        real_replace(src, dst)
        say("REPLACED", os.path.basename(dst))
        time.sleep(pause * 4)

    tempfile.mkstemp, os.fdopen, os.replace = mkstemp, slow_fdopen, loud_replace
    say("START")
    model.save(target)
    say("DONE")
    """
)


def start_save(target: Path, source: Path, pause: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", KILL_PROGRAM, str(target), str(source), str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def kill_when(proc: subprocess.Popen, predicate, timeout: float = 120.0) -> list[str]:
    """Read the child's announcements; SIGKILL it as soon as ``predicate(line)`` holds."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line.strip())
        if predicate(line.strip()):
            proc.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "the saving process is too slow"
    proc.wait(timeout=30)
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"child was not killed (rc={proc.returncode}): {seen[-5:]} {proc.stderr.read()[-2000:]}")
    return seen


@pytest.mark.parametrize(
    "moment",
    [
        "mid-tensor-file",  # first tensor file half written (temporary name)
        "before-json",  # new tensor files in place, patchknn.json not yet replaced
        "json-written",  # new patchknn.json fully written under its temporary name, not renamed
    ],
)
def test_killed_save_leaves_the_previous_model(saved, tmp_path, moment):
    target = copy_model(saved["a"], tmp_path / "model")
    before = snapshot(target)

    def predicate(line: str) -> bool:
        if moment == "mid-tensor-file":
            return line.startswith("WRITE .backbone-") and not line.endswith(" 0")
        if moment == "before-json":
            return line.startswith("WRITE .patchknn.json")
        return line == "REPLACE patchknn.json"

    seen = kill_when(start_save(target, saved["b"], 0.02), predicate)
    assert "DONE" not in seen
    leftovers = sorted(p.name for p in target.iterdir())
    if moment == "mid-tensor-file":
        assert any(n.startswith(".backbone-") and n.endswith(".tmp") for n in leftovers), leftovers
    elif moment == "json-written":
        assert any(n.startswith(".patchknn.json.") for n in leftovers), leftovers
    assert len([n for n in leftovers if n.endswith(".safetensors")]) >= 3, "new tensor files were written"
    assert snapshot(target) == before, "the previous model must be untouched"
    model = PatchKNN.load(target, progress=False)
    assert model.threshold_ == 1.5
    np.testing.assert_array_equal(model.predict(saved["probe"])[0].anomaly_map, saved["a_map"])
    # the next save cleans the leftovers of the killed one
    model.save(target)
    doc = read_meta(target)
    expected = sorted([META_FILE, LOCK_FILE, *(e["file"] for e in doc["files"].values())])
    assert sorted(p.name for p in target.iterdir()) == expected
    assert snapshot(target) == before


def test_killed_after_json_replace_gives_the_new_model(saved, tmp_path):
    target = copy_model(saved["a"], tmp_path / "model")
    new = snapshot(saved["b"])
    kill_when(start_save(target, saved["b"], 0.02), lambda line: line == "REPLACED patchknn.json")
    doc, groups = snapshot(target)
    assert (doc["threshold"], groups) == (new[0]["threshold"], new[1])
    assert PatchKNN.load(target, progress=False).threshold_ == 7.25


def test_killed_at_random_moments(saved, tmp_path):
    """SIGKILLs at random times during a (slowed) save: the directory always holds exactly the old
    or exactly the new model, and it loads. The first save runs to the end to time it."""
    old, new = snapshot(saved["a"]), snapshot(saved["b"])

    def run(target: Path, kill_after: float | None) -> None:
        proc = start_save(target, saved["b"], 0.01)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "START":
                break
        t0 = time.monotonic()
        if kill_after is None:
            assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
            durations.append(time.monotonic() - t0)
            return
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    durations: list[float] = []
    run(copy_model(saved["a"], tmp_path / "timed"), None)
    assert snapshot(tmp_path / "timed") == new
    rng = random.Random(7)
    outcomes = []
    for attempt in range(3):
        target = copy_model(saved["a"], tmp_path / f"model{attempt}")
        run(target, rng.uniform(0.0, 1.1) * durations[0])
        state = snapshot(target)
        assert state in (old, new)
        outcomes.append("old" if state == old else "new")
        assert PatchKNN.load(target, progress=False).threshold_ in (1.5, 7.25)
    print(f"save took {durations[0]:.2f} s; after the kills:", outcomes)


def test_save_never_deletes_files_it_did_not_write(saved, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    keep = {
        "notes.txt": b"mine",
        "weights.safetensors": b"not ours",
        "tensors-0123.safetensors": b"not our name pattern",
        ".hidden.tmp": b"x",
    }
    for name, data in keep.items():
        (folder / name).write_bytes(data)
    model = PatchKNN.load(saved["a"], progress=False)
    model.save(folder)
    PatchKNN.load(saved["b"], progress=False).save(folder)  # replaces the model, cleans only its own files
    for name, data in keep.items():
        assert (folder / name).read_bytes() == data
    assert PatchKNN.load(folder, progress=False).threshold_ == 7.25
    assert len(list(folder.glob("*-????????????????.safetensors"))) == 2


def test_concurrent_saves_into_one_directory_take_turns(tmp_path):
    """Two threads saving different models into the same directory: the result is one of them,
    complete (the directory lock stops one save from deleting the other's files)."""
    target = tmp_path / "m"
    rng = np.random.default_rng(0)
    models = {i: {"t": {f"x{j}": rng.normal(size=(200, 50)).astype(np.float32) for j in range(4)}} for i in range(2)}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(5):
                save_model(target, {"who": i}, models[i])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    doc, groups = load_model(target)
    for name, value in models[doc["who"]]["t"].items():
        np.testing.assert_array_equal(groups["t"][name], value)


def test_failed_write_is_a_clear_error_and_keeps_the_old_model(saved, tmp_path, monkeypatch):
    """Disk full (simulated: fsync fails) while saving over a model: ModelFileError, the previous
    model unchanged, no temporary file left behind."""
    import errno

    import patchknn.serialization as ser

    target = copy_model(saved["a"], tmp_path / "m")
    before = snapshot(target)
    new_model = PatchKNN.load(saved["b"], progress=False)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ser.os, "fsync", no_space)
    with pytest.raises(ModelFileError, match="could not be written .*No space left") as info:
        new_model.save(target)
    monkeypatch.undo()
    assert "unchanged" in str(info.value)
    assert snapshot(target) == before
    assert not [p.name for p in target.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFileError, match="could not be written"):
        new_model.save(tmp_path / "file" / "sub")


def test_save_refuses_what_cannot_be_stored(saved, tmp_path):
    model = PatchKNN.load(saved["a"], progress=False)
    model.threshold_ = float("nan")
    with pytest.raises(ModelFileError, match="threshold"):
        model.save(tmp_path / "nan")
    assert not (tmp_path / "nan" / META_FILE).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFileError, match="not a model directory"):
        save_model(tmp_path / "file", {}, {"t": {"a": np.zeros(2)}})
    with pytest.raises(ModelFileError, match="group names"):
        save_model(tmp_path / "g", {}, {"../evil": {"a": np.zeros(2)}})
    with pytest.raises(ModelFileError, match="reserved"):
        save_model(tmp_path / "r", {"files": {}}, {"t": {"a": np.zeros(2)}})
    # numpy scalars and non-finite diagnostics are stored as plain JSON (null for NaN)
    save_model(tmp_path / "ok", {"info": {"a": np.float32(1.5), "b": float("inf"), "c": (1, 2)}}, {})
    assert read_meta(tmp_path / "ok")["info"] == {"a": 1.5, "b": None, "c": [1, 2]}


# -------------------------------------------------------------------------------------------------
# damaged files
# -------------------------------------------------------------------------------------------------
def test_bit_flip_truncation_and_missing_files(saved, tmp_path):
    for group in ("tensors", "backbone"):
        path = copy_model(saved["a"], tmp_path / f"flip-{group}")
        f = path / read_meta(path)["files"][group]["file"]
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
        assert_load_fails(path, "checksum")

        path = copy_model(saved["a"], tmp_path / f"cut-{group}")
        f = path / read_meta(path)["files"][group]["file"]
        f.write_bytes(f.read_bytes()[:-100])
        assert_load_fails(path, "truncated")

        path = copy_model(saved["a"], tmp_path / f"gone-{group}")
        (path / read_meta(path)["files"][group]["file"]).unlink()
        assert_load_fails(path, "missing")

    path = copy_model(saved["a"], tmp_path / "json-cut")
    raw = (path / META_FILE).read_bytes()
    (path / META_FILE).write_bytes(raw[: len(raw) // 2])
    assert_load_fails(path, "JSON")
    (path / META_FILE).write_bytes(b"")
    assert_load_fails(path, "JSON")


def test_valid_checksum_but_not_safetensors(saved, tmp_path):
    path = copy_model(saved["a"], tmp_path / "m")
    blob = b"\xff" * 8 + b"{not a header"

    def change(doc):
        doc["files"]["tensors"].update(sha256=hashlib.sha256(blob).hexdigest(), bytes=str(len(blob)))

    (path / read_meta(path)["files"]["tensors"]["file"]).write_bytes(blob)
    edit_json(path, change)
    assert_load_fails(path, "safetensors")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(format_version=99), "format version"),
        (lambda d: d.update(format_version="1"), "format version"),
        (lambda d: d.update(format_version=True), "format version"),
        (lambda d: d.pop("format_version"), "format version"),
        (lambda d: d.update(patchknn_version="999.0"), "newer"),
        (lambda d: d.update(format="something-else"), "not a patchknn model"),
        (lambda d: d["config"].update(backbone="mystery-net"), "mystery-net"),
        (lambda d: d["config"].update(backbone="wide_resnet50_2"), "do not fit"),
        (lambda d: d["config"].update(layers=["layer1", "layer2"]), "PCA components"),
    ],
)
def test_format_version_and_backbone(saved, tmp_path, change, match):
    path = copy_model(saved["a"], tmp_path / "m")
    edit_json(path, change)
    assert_load_fails(path, match)


def _set(path: str, value: Any):
    keys = path.split(".")

    def change(doc):
        node = doc
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return change


WRONG_JSON = [
    ("config", []),
    ("config", "abc"),
    ("config", None),
    ("config.k", [2]),
    ("config.k", "2"),
    ("config.k", -1),
    ("config.k", 2.5),
    ("config.k", True),
    ("config.k", 5000),  # more than the bank holds
    ("config.image_size", 10**12),
    ("config.image_size", -32),
    ("config.grid_size", [8]),
    ("config.grid_size", 10**6),
    ("config.layers", 5),
    ("config.layers", "layer1"),
    ("config.layers", [["layer1"]]),
    ("config.pca_variance", [0.5]),
    ("config.pca_variance", "0.5"),
    ("config.pca_variance", 1e308 * 10),  # inf
    ("config.tta", 3),
    ("config.seed", -5),
    ("config.surprise", 1),
    ("threshold", "abc"),
    ("threshold", [1.0]),
    ("threshold", True),
    ("threshold", float("nan")),
    ("threshold", float("inf")),
    ("fit_info", "abc"),
    ("fit_info", [1, 2]),
    ("fit_info.n_train_images", -3),
    ("fit_info.bank_size", "many"),
    ("fit_info.n_components", 1.5),
    ("files", []),
    ("files", None),
    ("files.tensors", "x"),
    ("files.tensors.file", ["a"]),
    ("files.tensors.file", "../a/tensors.safetensors"),
    ("files.tensors.file", "/etc/passwd"),
    ("files.tensors.file", ""),
    ("files.tensors.sha256", 5),
    ("files.tensors.bytes", "-5"),
    ("files.tensors.bytes", "abc"),
    ("files.tensors.bytes", "12"),
    ("files.tensors.bytes", 10**30),
    ("files.tensors.bytes", [1]),
]


@pytest.mark.parametrize("where, value", WRONG_JSON, ids=[f"{w}={v!r}"[:40] for w, v in WRONG_JSON])
def test_wrong_json_types_and_values(saved, tmp_path, where, value):
    path = copy_model(saved["a"], tmp_path / "m")
    edit_json(path, _set(where, value))
    assert_load_fails(path)


def test_top_level_not_an_object(saved, tmp_path):
    path = copy_model(saved["a"], tmp_path / "m")
    for text in ("[]", "null", "3", '"patchknn-model"', "[" * 100000 + "]" * 100000):
        (path / META_FILE).write_text(text)
        assert_load_fails(path)


WRONG_TENSORS = [
    ("tensors", "bank-nan", lambda t: t["bank"].__setitem__((0, 0), np.nan), "NaN"),
    ("tensors", "bank-inf", lambda t: t["bank"].__setitem__((1, 1), np.inf), "NaN or infinite"),
    ("tensors", "bank-1d", lambda t: t.update(bank=t["bank"].ravel()), "memory bank"),
    ("tensors", "bank-empty", lambda t: t.update(bank=t["bank"][:0]), "memory bank"),
    ("tensors", "bank-int", lambda t: t.update(bank=t["bank"].astype(np.int32)), "memory bank"),
    ("tensors", "bank-dims", lambda t: t.update(bank=t["bank"][:, :-1].copy()), "disagree"),
    ("tensors", "bank-missing", lambda t: t.pop("bank"), "missing"),
    ("tensors", "bank-too-small-for-k", lambda t: t.update(bank=t["bank"][:1].copy()), "larger than the memory bank"),
    ("tensors", "pca-mean-length", lambda t: t.update(pca_mean=t["pca_mean"][:-1].copy()), "PCA mean"),
    ("tensors", "pca-mean-missing", lambda t: t.pop("pca_mean"), "incomplete PCA"),
    ("tensors", "pca-ratio-shape", lambda t: t.update(pca_explained_variance_ratio=np.zeros((1, 1))), "variance"),
    ("tensors", "pca-components-3d", lambda t: t.update(pca_components=t["pca_components"][None]), "components"),
    ("tensors", "pca-nan", lambda t: t["pca_components"].__setitem__((0, 0), np.nan), "NaN"),
    ("backbone", "weight-nan", lambda t: next(v for v in t.values() if v.ndim == 4).__setitem__(0, np.nan), "NaN"),
    ("backbone", "weight-shape", lambda t: t.update({k: v[:1].copy() for k, v in t.items() if v.ndim == 4}), "fit"),
    ("backbone", "weight-missing", lambda t: t.pop(sorted(t)[0]), "fit"),
    ("backbone", "weight-extra", lambda t: t.update(surprise=np.zeros(3, np.float32)), "fit"),
    ("backbone", "weight-dtype", lambda t: t.update({k: v.astype(np.float64) for k, v in t.items()}), None),
]


@pytest.mark.parametrize("group, label, change, match", WRONG_TENSORS, ids=[w[1] for w in WRONG_TENSORS])
def test_consistent_but_wrong_tensors(saved, tmp_path, group, label, change, match):
    path = copy_model(saved["a"], tmp_path / "m")
    rewrite_group(path, group, change)
    if match is None:  # harmless: float64 weights are converted on load
        model = PatchKNN.load(path, progress=False)
        np.testing.assert_allclose(model.predict(saved["probe"])[0].anomaly_map, saved["a_map"], rtol=1e-5)
        return
    assert_load_fails(path, match)


def test_missing_tensor_group(saved, tmp_path):
    path = copy_model(saved["a"], tmp_path / "m")
    edit_json(path, lambda d: d["files"].pop("backbone"))
    assert_load_fails(path, "missing")


def test_unknown_extra_tensors_are_ignored(saved, tmp_path):
    path = copy_model(saved["a"], tmp_path / "m")
    rewrite_group(path, "tensors", lambda t: t.update(extra=np.arange(3.0)))
    model = PatchKNN.load(path, progress=False)
    np.testing.assert_array_equal(model.predict(saved["probe"])[0].anomaly_map, saved["a_map"])


# -------------------------------------------------------------------------------------------------
# property-based: any edit of the JSON or any damage to a file
# -------------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["resnet50", "layer1", "layer2", "flat", "max", "hflip", "quantile"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


def _load_and_use(path: Path, probe: list[np.ndarray]) -> None:
    """Loading either fails with ModelFileError or gives a model that predicts finite maps (or
    raises one of the package's own errors, e.g. an option that only fails at prediction)."""
    try:
        model = PatchKNN.load(path, progress=False)
    except ModelFileError:
        return
    if model.config.image_size > 256:  # a valid but huge input size: loading is what is tested
        return
    try:
        pred = model.predict(probe)[0]
    except PatchKNNError:
        return
    assert pred.anomaly_map is not None and np.isfinite(pred.anomaly_map).all()
    assert pred.score is not None and math.isfinite(pred.score)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_any_json_edit(saved, tmp_path_factory, data):
    path = copy_model(saved["a"], tmp_path_factory.mktemp("prop") / "m")
    doc = json.loads((path / META_FILE).read_text())
    where = data.draw(st.sampled_from(_paths(doc)))
    node = doc
    for key in where[:-1]:
        node = node[key]
    action = data.draw(st.sampled_from(["replace", "delete"]))
    if action == "delete":
        del node[where[-1]]
    else:
        node[where[-1]] = data.draw(json_values)
    (path / META_FILE).write_text(json.dumps(doc))
    _load_and_use(path, saved["probe"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_any_byte_damage(saved, tmp_path_factory, data):
    path = copy_model(saved["a"], tmp_path_factory.mktemp("prop") / "m")
    files = sorted(p for p in path.iterdir() if p.name != LOCK_FILE)
    target = data.draw(st.sampled_from(files))
    raw = bytearray(target.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "cut", "append"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=16))
    target.write_bytes(bytes(raw))
    if target.name != META_FILE:  # tensor files: the size or checksum always catches it
        assert_load_fails(path)
    else:  # the JSON may still parse (e.g. a changed digit of the threshold)
        _load_and_use(path, saved["probe"])


# -------------------------------------------------------------------------------------------------
# no pickle anywhere
# -------------------------------------------------------------------------------------------------
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
# The one documented exception: backbone weights files the *user* names (and the packaged
# EfficientNet weights) may be torch.save files; they are read with torch.load(weights_only=True),
# which refuses anything but tensors and plain containers. Model files never use it.
TORCH_LOAD_ALLOWED = {"backbones/base.py"}  # read_state_dict_file, used by every backbone family


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _kw(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<not a constant>"
    return "<missing>"


def test_no_pickle_in_the_package():
    problems: list[str] = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    for file in files:
        rel = file.relative_to(SRC).as_posix()
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            bad = PICKLE_MODULES.intersection(names)
            if bad:
                problems.append(f"{rel}:{node.lineno} imports {sorted(bad)}")
        for call, func in _calls(tree):
            where = f"{rel}:{call.lineno} {func}(...)"
            last = func.rsplit(".", 1)[-1]
            if func == "torch.load":
                if rel not in TORCH_LOAD_ALLOWED:
                    problems.append(f"{where}: torch.load outside the documented weights loaders")
                elif _kw(call, "weights_only") is not True:
                    problems.append(f"{where}: torch.load without weights_only=True")
            if func in ("np.load", "numpy.load") and _kw(call, "allow_pickle") is not False:
                problems.append(f"{where}: np.load without allow_pickle=False")
            if last in ("read_pickle", "loads") and func.split(".")[0] in PICKLE_MODULES | {"pd", "pandas"}:
                problems.append(f"{where}: unpickling")
            if last in ("get_state_dict", "load_state_dict_from_url") and _kw(call, "weights_only") is not True:
                problems.append(f"{where}: downloads must be read with weights_only=True")
            if func in ("eval", "exec"):
                problems.append(f"{where}: eval/exec")
    assert not problems, "\n".join(problems)


def test_model_loading_reads_only_json_and_safetensors(saved, tmp_path, monkeypatch):
    """PatchKNN.load never reaches torch.load / np.load / pickle, whatever the files hold."""
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("a model file must never be unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    path = copy_model(saved["a"], tmp_path / "m")
    # a pickle planted where a tensor file should be is refused by the checksum, never parsed
    evil = pickle.dumps({"bank": "boom"})
    name = read_meta(path)["files"]["tensors"]["file"]
    (path / name).write_bytes(evil)
    assert_load_fails(path)
    shutil.rmtree(path)
    PatchKNN.load(copy_model(saved["a"], path), progress=False)
