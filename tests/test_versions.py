"""Versioned model folders (issue 16): save_version / list / rollback / load, crash safety,
concurrent writers, the plain folder as version 1, and the CLI's partial-fit / history / rollback."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image
from typer.testing import CliRunner

from patchknn import PatchKNN
from patchknn.errors import NotFittedError
from patchknn.serialization import META_FILE
from patchknn.versions import (
    VersionError,
    current_version,
    history,
    list_versions,
    load_version,
    rollback,
    save_version,
    version_path,
)
from patchknn.versions import store as versions

SMALL = {"layers": ("layer1", "layer2"), "calibration_images": 4, "num_workers": 0}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[PatchKNN, Path]:
    """A small fitted model and its plain saved folder."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8) for _ in range(5)]
    model = tiny_model(**SMALL).fit(images)
    return model, model.save(tmp_path_factory.mktemp("plain") / "model")


@pytest.fixture
def plain(fitted, tmp_path) -> Path:
    """A fresh copy of the plain model folder."""
    return Path(shutil.copytree(fitted[1], tmp_path / "model"))


def with_threshold(model: PatchKNN, value: float) -> PatchKNN:
    """The same model with another threshold (a version that differs, cheaply)."""
    model.threshold_ = value
    return model


def test_plain_folder_is_version_1_and_stays_loadable(fitted, plain):
    model, _ = fitted
    (v1,) = list_versions(plain)
    assert (v1.number, v1.current, v1.path, v1.parent) == (1, True, plain, None)
    assert v1.threshold == pytest.approx(model.fit_info_["calibration"]["threshold"])
    assert v1.bank_rows == model.index_.bank.shape[0]
    assert version_path(plain, 1) == plain
    info = save_version(with_threshold(model, 11.0), plain, author="ana", note="first correction", added=["a.png"])
    assert (info.number, info.parent, info.author, info.note, info.added, info.n_added) == (
        2, 1, "ana", "first correction", ["a.png"], 1
    )
    listed = list_versions(plain)
    assert [(v.number, v.current) for v in listed] == [(1, False), (2, True)]
    assert listed[0].threshold == pytest.approx(fitted[0].fit_info_["calibration"]["threshold"])
    # every existing path reads the folder as before: the current version
    assert PatchKNN.load(plain).threshold_ == 11.0
    assert load_version(plain).threshold_ == 11.0
    assert load_version(plain, 1).threshold_ == pytest.approx(listed[0].threshold)
    assert PatchKNN.load(version_path(plain, 1)).threshold_ == pytest.approx(listed[0].threshold)
    assert [e["event"] for e in history(plain)] == ["adopt", "save"]


def test_rollback_moves_the_pointer_keeps_everything_and_is_recorded(fitted, plain):
    model, _ = fitted
    for t in (11.0, 12.0, 13.0):
        save_version(with_threshold(model, t), plain, author="ana")
    assert current_version(plain).number == 4
    back = rollback(plain, 2, author="bo")
    assert back.number == 2 and back.current and current_version(plain).number == 2
    assert PatchKNN.load(plain).threshold_ == 11.0
    assert [v.number for v in list_versions(plain)] == [1, 2, 3, 4]  # nothing removed
    assert history(plain)[-1] == {**history(plain)[-1], "event": "rollback", "version": 2, "from": 4, "author": "bo"}
    # the next save continues the numbering; its parent is the version current when saved
    info = save_version(with_threshold(model, 14.0), plain)
    assert (info.number, info.parent) == (5, 2) and PatchKNN.load(plain).threshold_ == 14.0
    assert rollback(plain, 4).number == 4 and PatchKNN.load(plain).threshold_ == 13.0
    with pytest.raises(VersionError, match="no version 9"):
        rollback(plain, 9)
    # versions share the files they have in common (the backbone's weights) instead of copying them
    (w3,) = version_path(plain, 3).glob("backbone-*.safetensors")
    (w2,) = version_path(plain, 2).glob("backbone-*.safetensors")
    assert w3.name == w2.name and w3.stat().st_ino == w2.stat().st_ino
    # the root holds only the current version's files (plus the versions)
    doc = json.loads((plain / META_FILE).read_text())
    wanted = {e["file"] for e in doc["files"].values()}
    assert {p.name for p in plain.glob("*.safetensors")} == wanted


def test_first_save_into_an_empty_folder(fitted, tmp_path):
    model, _ = fitted
    info = save_version(with_threshold(model, 5.0), tmp_path / "new", note="initial")
    assert (info.number, info.parent) == (1, None)
    assert PatchKNN.load(tmp_path / "new").threshold_ == 5.0
    with pytest.raises(NotFittedError):
        save_version(tiny_model(**SMALL), tmp_path / "other")
    with pytest.raises(VersionError, match="not a model folder"):
        list_versions(tmp_path / "nothing")


def test_a_crash_before_the_switch_leaves_the_previous_version_current(fitted, plain, monkeypatch):
    model, _ = fitted
    save_version(with_threshold(model, 21.0), plain)  # version 2, current
    real = versions.atomic_write

    def crash_on_switch(path, data):
        if Path(path) == plain / META_FILE:
            raise OSError("disk died")
        real(path, data)

    monkeypatch.setattr(versions, "atomic_write", crash_on_switch)
    with pytest.raises(OSError, match="disk died"):
        save_version(with_threshold(model, 22.0), plain)
    monkeypatch.undo()
    assert current_version(plain).number == 2 and PatchKNN.load(plain).threshold_ == 21.0

    # a crash while the version itself is written: nothing new is listed, nothing is left over
    def broken_save(path):
        Path(path).mkdir(parents=True)
        (Path(path) / "tensors-0123456789abcdef.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_version(with_threshold(model, 23.0), plain)
    monkeypatch.undo()
    assert current_version(plain).number == 2 and PatchKNN.load(plain).threshold_ == 21.0
    assert not any(p.name.startswith(".") for p in (plain / "versions").iterdir())
    # the next save works and takes a fresh number (3 was written completely, never current)
    info = save_version(with_threshold(model, 24.0), plain)
    assert info.number == 4 and PatchKNN.load(plain).threshold_ == 24.0
    assert [v.number for v in list_versions(plain)] == [1, 2, 3, 4]


def test_concurrent_writers_get_distinct_numbers(fitted, plain):
    model, _ = fitted
    copies = [PatchKNN.load(plain, progress=False) for _ in range(2)]
    numbers: list[int] = []
    errors: list[BaseException] = []

    def writer(m: PatchKNN, base: float) -> None:
        try:
            for i in range(3):
                numbers.append(save_version(with_threshold(m, base + i), plain).number)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(m, 100.0 * (j + 1))) for j, m in enumerate(copies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(numbers) == [2, 3, 4, 5, 6, 7]
    assert [v.number for v in list_versions(plain)] == [1, 2, 3, 4, 5, 6, 7]
    last = max(numbers)
    assert current_version(plain).number == last
    for v in list_versions(plain)[1:]:
        assert load_version(plain, v.number).threshold_ in (100.0, 101.0, 102.0, 200.0, 201.0, 202.0)


def test_a_model_saved_over_the_folder_is_adopted(fitted, plain):
    model, _ = fitted
    save_version(with_threshold(model, 31.0), plain)
    model.fit_info_.pop("version", None)
    with_threshold(model, 32.0).save(plain)  # a plain save over the versioned folder
    with pytest.raises(VersionError, match="not one of its versions"):
        current_version(plain)
    rollback(plain, 1)  # the saved-over model is kept first, as version 3
    assert [v.number for v in list_versions(plain)] == [1, 2, 3]
    assert load_version(plain, 3).threshold_ == 32.0 and current_version(plain).number == 1


def test_cli_partial_fit_history_rollback(plain, tmp_path):
    from patchknn.cli import app

    folder = tmp_path / "normal"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)).save(folder / f"ok{i}.png")
    runner = CliRunner()
    result = runner.invoke(app, ["partial-fit", str(plain), str(folder), "--author", "ana", "--note", "glare"])
    assert result.exit_code == 0, result.output
    assert "version 2" in result.output and "2 image(s) added" in result.output
    loaded = PatchKNN.load(plain)
    assert loaded.fit_info_["n_train_images"] == 7 and "added" not in loaded.fit_info_
    assert loaded.fit_info_["version"]["added"] == [str(folder / "ok0.png"), str(folder / "ok1.png")]
    assert save_version(loaded, tmp_path / "copy").n_added == 0  # not repeated by a later save

    result = runner.invoke(app, ["history", str(plain)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["version", "created", "author", "images", "added", "bank", "rows", "threshold", "note"]
    assert lines[2].startswith("*") and lines[2].split()[1:5:3] == ["2", "2"] and "ana" in lines[2]

    assert runner.invoke(app, ["rollback", str(plain), "1", "--author", "bo"]).exit_code == 0
    result = runner.invoke(app, ["history", str(plain), "--json"])
    doc = json.loads(result.output)
    assert [(v["number"], v["current"]) for v in doc["versions"]] == [(1, True), (2, False)]
    assert doc["events"][-1]["event"] == "rollback" and doc["events"][-1]["author"] == "bo"
    assert PatchKNN.load(plain).fit_info_["n_train_images"] == 5
    assert "rollback" in runner.invoke(app, ["history", str(plain)]).output

    result = runner.invoke(app, ["rollback", str(plain), "7"])
    assert result.exit_code != 0 and isinstance(result.exception, VersionError)
    # `patchknn predict` on the folder answers with the current version (1 after the rollback)
    out = tmp_path / "scores"
    result = runner.invoke(app, ["predict", str(plain), str(folder / "ok0.png"), "-o", str(out), "--no-maps"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "scores.json").read_text())
    assert row["threshold"] == pytest.approx(list_versions(plain)[0].threshold)


WRITER = """
import json, shutil, sys
from pathlib import Path
from patchknn.versions import save_version

src, root = Path(sys.argv[1]), Path(sys.argv[2])

class Copy:  # a fitted model as far as save_version is concerned: save() writes a model folder
    is_fitted = True

    def __init__(self):
        self.fit_info_ = {}

    def save(self, path):
        shutil.copytree(src, path)
        doc = json.loads((src / "patchknn.json").read_text())
        doc["fit_info"] = {**doc.get("fit_info", {}), **self.fit_info_}
        (Path(path) / "patchknn.json").write_text(json.dumps(doc))

for _ in range(3):
    print(save_version(Copy(), root).number, flush=True)
"""


def test_concurrent_processes_get_distinct_numbers(fitted, plain):
    """Two processes (the fcntl lock, not the thread lock) saving into one folder at once."""
    import subprocess
    import sys

    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(fitted[1]), str(plain)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    numbers = sorted(int(n) for out in outs for n in out.split())
    assert numbers == [2, 3, 4, 5, 6, 7]
    assert [v.number for v in list_versions(plain)] == [1, 2, 3, 4, 5, 6, 7]
    assert current_version(plain).number in numbers
    assert PatchKNN.load(plain).fit_info_["version"]["number"] == current_version(plain).number
