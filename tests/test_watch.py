"""The hot folder (issue 16): `patchknn watch` scores each image once, complete, and resumes after a restart.

The watcher runs in a thread (or in this process with ``once``); every wait is on an event with a
bound, never a sleep that hopes the other side is done. Scores are compared with ``predict``'s.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image

from patchknn.watch import HotFolder, WatchError
from patchknn.watch.ledger import RESULTS_FILE
from patchknn.watch.running import stop_on_signals

BOUND = 120.0  # seconds any wait may take before the test fails (a hung watcher, not a slow one)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny random-weight model with a threshold, fitted once, and saved (for the command line)."""
    rng = np.random.default_rng(1)
    model = tiny_model().fit([rng.integers(0, 255, (72, 80, 3), dtype=np.uint8) for _ in range(3)])
    path = model.save(tmp_path_factory.mktemp("watch-model") / "model")
    return model, path


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (70 + 3 * i, 64, 3), dtype=np.uint8) for i in range(n)]


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def _folders(tmp_path: Path, n: int, seed: int) -> tuple[Path, Path]:
    """``in/`` holding ``0.png`` .. ``{n-1}.png``, and the results folder ``out/`` (not made)."""
    inp = tmp_path / "in"
    inp.mkdir()
    for i, img in enumerate(_images(n, seed)):
        Image.fromarray(img).save(inp / f"{i}.png")
    return inp, tmp_path / "out"


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]


def _run_once(inp: Path, out: Path, model, **options) -> tuple[object, list]:
    events: list = []
    summary = HotFolder(inp, out, model, settle=0.05, on_event=events.append, **options).run(once=True)
    return summary, events


class Waiter:
    """Collects a watcher's events; ``wait_for`` blocks (bounded) until a condition on them holds."""

    def __init__(self) -> None:
        self.events: list = []
        self.cond = threading.Condition()

    def __call__(self, event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def wait_for(self, predicate, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.events), timeout=BOUND), f"timed out waiting for {what}"

    def names(self, kind: str) -> list[str]:
        with self.cond:
            return [e.name for e in self.events if e.kind == kind]


@pytest.mark.parametrize("poll", [None, 0.05], ids=["events", "polling"])
def test_files_written_slowly_in_chunks_are_scored_once_and_complete(fitted, tmp_path, poll):
    model, _ = fitted
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    files = {f"{i}.{fmt.lower()}": _encode(img, fmt) for i, (img, fmt) in
             enumerate(zip(_images(4, seed=2), ["PNG", "JPEG", "PNG", "PNG"]))}
    paused = {"1.jpeg", "2.png"}  # the writer stops halfway until the watcher has looked at them
    waiter = Waiter()
    hot = HotFolder(inp, out, model, settle=0.05, timeout=BOUND, poll=poll, batch_size=2, on_event=waiter)
    watcher = threading.Thread(target=hot.run, daemon=True)
    watcher.start()
    waiter.wait_for(lambda ev: any(e.kind == "started" for e in ev), "the watcher to start")

    def write() -> None:
        for name, data in files.items():
            with open(inp / name, "wb") as f:
                for k, chunk in enumerate(np.array_split(np.frombuffer(data, np.uint8), 6)):
                    f.write(chunk.tobytes())
                    f.flush()
                    if name in paused and k == 2:  # stable but truncated: must wait, not score
                        waiter.wait_for(lambda ev, n=name: any(e.kind == "waiting" and e.name == n for e in ev),
                                        f"the watcher to see {name} incomplete")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(BOUND)
    assert not writer.is_alive()
    waiter.wait_for(lambda ev: sum(e.kind in ("scored", "error") for e in ev) >= len(files), "every result")
    hot.stop()
    watcher.join(BOUND)
    assert not watcher.is_alive()

    assert set(waiter.names("waiting")) >= paused  # the half-written files were seen and not scored
    lines = _lines(out)
    assert sorted(r["image"] for r in lines) == sorted(files)  # each exactly once
    expected = {Path(p.source).name: p for p in model.predict([str(inp / n) for n in files])}
    for r in lines:
        assert r["error"] is None
        # the complete image: equal to float32 round-off (the backbone's last bits change with the batch
        # the file arrived in; a half-written image would score far off)
        assert r["score"] == pytest.approx(expected[r["image"]].score, rel=2e-5, abs=1e-6)
        assert r["verdict"] == expected[r["image"]].verdict and r["threshold"] == pytest.approx(model.threshold_)
        assert r["size"] == len(files[r["image"]]) and (out / r["overlay"]).is_file()
        assert r["latency_s"] >= 0 and r["score_ms"] > 0


def test_restart_scores_only_the_new_files(fitted, tmp_path):
    model, _ = fitted
    inp, out = _folders(tmp_path, 3, seed=3)
    summary, _ = _run_once(inp, out, model)
    assert summary.scored == 3 and len(_lines(out)) == 3

    # while no watcher runs: two new files, one old file touched (same content), one old file rewritten
    new_images = _images(2, seed=33)
    Image.fromarray(new_images[0]).save(inp / "b.png")
    Image.fromarray(new_images[1]).save(inp / "c.png")
    st = (inp / "0.png").stat()
    os.utime(inp / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    Image.fromarray(new_images[1]).save(inp / "1.png")
    summary, events = _run_once(inp, out, model)
    assert summary.already_done == 1  # 2.png: same name, size and time
    assert [e.name for e in events if e.kind == "duplicate"] == ["0.png"]
    new = _lines(out)[3:]
    assert sorted(r["image"] for r in new) == ["1.png", "b.png", "c.png"]  # 1.png: new content, a new image
    assert len({r["overlay"] for r in _lines(out)}) == 6  # the rewritten a1.png's overlay does not replace the first

    summary, _ = _run_once(inp, out, model)  # a third start: nothing left
    assert (summary.scored, summary.errors, len(_lines(out))) == (0, 0, 6)


def test_a_line_torn_by_a_crash_is_dropped_and_its_image_scored_again(fitted, tmp_path):
    model, _ = fitted
    inp, out = _folders(tmp_path, 2, seed=4)
    _run_once(inp, out, model)
    raw = (out / RESULTS_FILE).read_bytes()
    (out / RESULTS_FILE).write_bytes(raw[: raw.rindex(b"\n", 0, len(raw) - 1) + 20])  # the last line cut short
    summary, _ = _run_once(inp, out, model)
    assert summary.scored == 1 and [r["image"] for r in _lines(out)] == ["0.png", "1.png"]

    (out / RESULTS_FILE).write_bytes(b"not json\n" + (out / RESULTS_FILE).read_bytes())  # damage elsewhere
    with pytest.raises(WatchError, match="line 1"):
        _run_once(inp, out, model)


def test_a_corrupt_file_gives_one_error_line_not_a_crash(fitted, tmp_path):
    model, _ = fitted
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    good = _images(1, seed=5)[0]
    Image.fromarray(good).save(inp / "good.png")
    (inp / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    (inp / "cut.jpg").write_bytes(_encode(good, "JPEG")[:300])
    (inp / "empty.png").write_bytes(b"")
    (inp / "notes.txt").write_text("not an image suffix: not watched")
    (inp / ".hidden.png").write_bytes(b"hidden: not watched")
    summary, events = _run_once(inp, out, model, timeout=0.2, csv_copy=True)
    assert (summary.scored, summary.errors) == (1, 3)
    errors = {r["image"]: r["error"] for r in _lines(out) if r["error"]}
    assert sorted(errors) == ["cut.jpg", "empty.png", "garbage.png"]
    assert "truncated" in errors["cut.jpg"] and "0 bytes" in errors["empty.png"]
    assert all(r["score"] is None and r["overlay"] is None for r in _lines(out) if r["error"])
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("image,score,threshold,verdict,error") and len(csv_rows) == 5

    (out / "results.csv").write_text(csv_rows[0] + "\n")  # behind the JSONL (e.g. a crash): rewritten at start
    summary, _ = _run_once(inp, out, model, timeout=0.2, csv_copy=True)  # recorded: not retried
    assert (summary.scored, summary.errors, summary.already_done) == (0, 0, 4)
    assert (out / "results.csv").read_text().splitlines() == csv_rows
    Image.fromarray(good).save(inp / "garbage.png")  # repaired later: a new version, scored
    summary, _ = _run_once(inp, out, model, timeout=0.2)
    assert (summary.scored, summary.errors) == (1, 0)


def test_stop_finishes_the_current_batch_then_a_restart_does_the_rest(fitted, tmp_path):
    model, _ = fitted
    inp, out = _folders(tmp_path, 5, seed=6)

    def on_event(event) -> None:  # SIGTERM as the first result of the first batch is written
        if event.kind == "scored" and event.name == "0.png":
            os.kill(os.getpid(), signal.SIGTERM)

    hot = HotFolder(inp, out, model, settle=0.05, batch_size=2, on_event=on_event)
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(hot):
        summary = hot.run(once=True)
    assert signal.getsignal(signal.SIGTERM) is before
    assert summary.scored == 2 and [r["image"] for r in _lines(out)] == ["0.png", "1.png"]  # the whole batch
    summary, _ = _run_once(inp, out, model)
    assert summary.scored == 3 and len(_lines(out)) == 5


def test_one_watcher_per_results_folder_and_input(fitted, tmp_path):
    model, _ = fitted
    inp, other, out = tmp_path / "in", tmp_path / "other", tmp_path / "in" / "results"
    inp.mkdir()
    other.mkdir()
    Image.fromarray(_images(1, seed=7)[0]).save(inp / "x.png")
    hot = HotFolder(inp, out, model, settle=0.05, recursive=True)
    with hot.ledger, pytest.raises(WatchError, match="another `patchknn watch`"):
        HotFolder(inp, out, model).run(once=True)
    summary, _ = _run_once(inp, out, model, recursive=True)
    assert summary.scored == 1  # the overlay written under in/results/ is not taken for a new image
    summary, _ = _run_once(inp, out, model, recursive=True)
    assert summary.scored == 0
    with pytest.raises(WatchError, match="holds the results of"):
        HotFolder(other, out, model).run(once=True)


def test_command_line(fitted, tmp_path):
    from typer.testing import CliRunner

    from patchknn.cli import app

    _, model_path = fitted
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "line2").mkdir(parents=True)
    imgs = _images(3, seed=8)
    Image.fromarray(imgs[0]).save(inp / "a.png")
    Image.fromarray(imgs[1]).save(inp / "line2" / "a.png")
    Image.fromarray(imgs[2]).save(inp / "c.bmp")
    args = ["watch", str(inp), "--model", str(model_path), "-o", str(out), "--once", "--settle", "0.05",
            "--recursive", "--pattern", "*.png", "--csv", "--maps"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = _lines(out)
    assert sorted(r["image"] for r in lines) == ["a.png", "line2/a.png"]  # c.bmp does not match the pattern
    assert {r["overlay"] for r in lines} == {"overlays/a.png", "overlays/line2_a.png"}
    assert all((out / r["map"]).is_file() and (out / r["mask"]).is_file() for r in lines)
    assert len({r["model_version"] for r in lines}) == 1 and len(lines[0]["model_version"]) == 12
    assert "scored 2 image(s)" in result.output and (out / "results.csv").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "scored 0 image(s)" in again.output

    busy = CliRunner().invoke(app, ["watch", str(tmp_path / "missing"), "--model", str(model_path), "-o", str(out)])
    assert busy.exit_code != 0


@pytest.mark.mvtec
def test_the_watch_score_equals_predict_on_real_bottle_images(mvtec_root, caffe_weights, tmp_path):
    from patchknn import PatchKNN

    bottle = mvtec_root / "bottle"
    train = sorted((bottle / "train" / "good").glob("*.png"))[:6]
    test = [sorted((bottle / "test" / d).glob("*.png"))[0] for d in ("good", "broken_large", "contamination")]
    model = PatchKNN(weights=str(caffe_weights), image_size=160, grid_size=20, calibration_images=6,
                     progress=False).fit(train)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for src in test:
        (inp / f"{src.parent.name}_{src.name}").write_bytes(src.read_bytes())
    summary, _ = _run_once(inp, out, model)
    assert summary.scored == 3
    expected = {f"{Path(p.source).parent.name}_{Path(p.source).name}": p for p in model.predict(test)}
    for r in _lines(out):
        assert r["score"] == pytest.approx(expected[r["image"]].score, rel=2e-5)  # batch-size round-off
        assert r["verdict"] == expected[r["image"]].verdict
