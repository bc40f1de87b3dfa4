"""The hot folder: score every image that appears in a folder, once, when it is complete.

:class:`HotFolder` finds files (file-system events through ``watchdog``, or a listing every ``poll``
seconds), waits until each is complete, scores the complete ones in batches through the model's
own ``predict_iter`` (the one scoring path, so a score equals ``patchknn predict``'s), writes what
``patchknn predict`` writes for each (:func:`patchknn.visualize.save_prediction_files`) and appends
one line per image to the :class:`~patchknn.watch.ledger.Ledger`.

A file is *complete* when its size and modification time have not changed for ``settle`` seconds
**and** its bytes decode as an image. A file that is stable but does not decode (a writer that
paused mid-file, or a broken file: they look the same) is tried again every ``settle`` seconds; once
it has been unchanged for ``timeout`` seconds and still does not decode, it gets one error line with
the decoder's reason. If it changes later (the writer resumes), it is a new version and is scored.

The bytes are read once: hashed (the ledger's content key), decoded, and the decoded image is what
the model scores and the overlay shows, so the result belongs to exactly the bytes hashed even if
the file changes meanwhile.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from patchknn.data import is_image_name
from patchknn.errors import ImageError, PatchKNNError
from patchknn.watch.ledger import Fingerprint, Ledger


@dataclass
class WatchEvent:
    """What the hot folder reports to ``on_event``.

    Attributes:
        kind: ``"started"``, ``"scored"``, ``"error"`` (an error line was written), ``"waiting"`` (a
            stable file does not decode yet), ``"duplicate"`` (content already scored under this
            name), ``"vanished"`` (deleted before it was complete), ``"fallback"`` (file-system events
            unavailable: polling) or ``"stopped"``.
        name: the image's path relative to the watched folder (``""`` for the others).
        detail: a reason, or the mode and counts.
        record: the line written, for ``scored`` and ``error``.
    """

    kind: str
    name: str = ""
    detail: str = ""
    record: dict[str, Any] | None = None


@dataclass
class WatchSummary:
    """What one :meth:`HotFolder.run` did: lines written, and files found already done at start."""

    scored: int = 0
    ng: int = 0
    errors: int = 0
    already_done: int = 0


@dataclass
class _Pending:
    path: Path
    first_seen: float
    stat: tuple[int, int]
    changed_at: float
    next_try: float = 0.0
    failure: str | None = None


@dataclass
class _Ready:
    name: str
    path: Path
    first_seen: float
    fingerprint: Fingerprint
    image: Any = field(repr=False)


class HotFolder:
    """Watch ``input_dir`` and score what appears with ``model``; results in ``output``.

    Args:
        input_dir: the folder the camera (or anything) writes into.
        output: the results folder (``results.jsonl``, ``overlays/``, ...); may lie inside ``input_dir``
            (it is never watched).
        model: a fitted :class:`~patchknn.model.PatchKNN`, or an exported model (:mod:`patchknn.runtime`):
            anything with ``predict_iter``, ``threshold_`` and ``max_pixels``.
        model_version: written on every line (e.g. :func:`patchknn.server.settings.model_version`).
        recursive: also watch subfolders (names are paths relative to ``input_dir``).
        patterns: shell patterns a file name must match (``*.png``); default: the image suffixes
            patchknn reads. Hidden files (``.name``) are never taken.
        settle: seconds a file's size and time must stay unchanged before it is read.
        timeout: seconds a stable file may fail to decode before it gets an error line.
        poll: list the folder every ``poll`` seconds instead of using file-system events (``None``:
            events through ``watchdog`` when installed and working, else polling every second).
        rescan: with events, seconds between safety listings (events can be lost when the kernel's
            queue overflows).
        batch_size: images per model call (default: the model's ``batch_size``).
        resolution: map size, as ``patchknn predict --resolution`` (``"input"`` or ``"original"``).
        overlays: write ``overlays/NAME.png``.
        maps: write ``maps/NAME.npy`` and (with a threshold) ``masks/NAME.png``.
        csv_copy: also keep ``results.csv``.
        on_event: called with each :class:`WatchEvent` (from the thread that runs :meth:`run`).
    """

    def __init__(
        self,
        input_dir: str | os.PathLike[str],
        output: str | os.PathLike[str],
        model: Any,
        *,
        model_version: str | None = None,
        recursive: bool = False,
        patterns: Sequence[str] = (),
        settle: float = 1.0,
        timeout: float = 60.0,
        poll: float | None = None,
        rescan: float = 60.0,
        batch_size: int | None = None,
        resolution: str = "input",
        overlays: bool = True,
        maps: bool = False,
        csv_copy: bool = False,
        on_event: Callable[[WatchEvent], None] | None = None,
    ) -> None:
        from patchknn.errors import ConfigError

        self.input_dir = Path(input_dir)
        if not self.input_dir.is_dir():
            raise ConfigError(f"not a folder: {self.input_dir}")
        for what, value in (("settle", settle), ("timeout", timeout), ("rescan", rescan), ("poll", poll or 1.0)):
            if not value > 0:
                raise ConfigError(f"{what} must be a positive number of seconds, got {value}")
        if resolution not in ("input", "original"):
            raise ConfigError(f"resolution must be 'input' or 'original', got {resolution!r}")
        self.output = Path(output)
        self.model = model
        self.model_version = model_version
        self.recursive = recursive
        self.patterns = tuple(patterns)
        self.settle, self.timeout, self.poll, self.rescan = float(settle), float(timeout), poll, float(rescan)
        self.batch_size = int(batch_size or getattr(model, "batch_size", 16))
        self.resolution = resolution
        self.overlays, self.maps = overlays, maps
        self.ledger = Ledger(self.output, self.input_dir, csv_copy=csv_copy)
        self.on_event = on_event
        self.stop_event = threading.Event()
        self._pending: dict[str, _Pending] = {}
        self._events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.summary = WatchSummary()
        self._scale: tuple[float, float] | None = None
        out, watched = self.output.resolve(), self.input_dir.resolve()
        self._inner_output = out if out.is_relative_to(watched) else None  # results inside: never watched

    # ------------------------------------------------------------------------------ running
    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch it is scoring (safe from any thread or a signal handler)."""
        self.stop_event.set()

    def run(self, *, once: bool = False) -> WatchSummary:
        """Watch until :meth:`stop` (or, with ``once``, until every file present at start is done).

        Files that appeared while no watcher ran are found by the first listing. With ``once``,
        files still being written are waited for (up to ``timeout`` when they do not decode).
        """
        from patchknn.visualize import model_scale

        self._scale = model_scale(self.model)
        self.summary = WatchSummary()
        with self.ledger:
            self._list_folder(count_done=True)
            observer, mode = (None, "scoring what is there, then stopping") if once else self._start_observer()
            self._emit("started", detail=f"{mode}; {self.summary.already_done} already done, "
                                         f"{len(self._pending)} to look at")
            # with events, a listing now and then catches any lost event; without, it is how files are found
            interval = self.rescan if observer is not None else (self.poll or 1.0)
            next_listing = time.monotonic() + interval
            tick = max(0.01, min(0.25, self.settle / 2, self.poll or 0.25))
            try:
                while not self.stop_event.is_set():
                    now = time.monotonic()
                    if not once and now >= next_listing:
                        self._list_folder()
                        next_listing = now + interval
                    self._drain_events()
                    ready = self._check_pending(now)
                    for start in range(0, len(ready), self.batch_size):
                        if self.stop_event.is_set():
                            break  # the files left are still new: the next start scores them
                        self._score(ready[start : start + self.batch_size])
                    if once and not self._pending:
                        break
                    self.stop_event.wait(tick)
            finally:
                if observer is not None:
                    observer.stop()
                    observer.join(timeout=5)
        self._emit("stopped", detail=f"{self.summary.scored} scored, {self.summary.errors} errors")
        return self.summary

    # ------------------------------------------------------------------------------ finding files
    def _name(self, path: Path) -> str | None:
        """The image's name (relative path, ``/``-separated), or ``None`` when it is not watched."""
        try:
            rel = path.relative_to(self.input_dir)
        except ValueError:
            return None
        parts = rel.parts
        if not parts or any(p.startswith(".") for p in parts) or (len(parts) > 1 and not self.recursive):
            return None
        if self._inner_output is not None and path.resolve().is_relative_to(self._inner_output):
            return None
        base = parts[-1]
        if self.patterns:
            if not any(fnmatch.fnmatch(base, p) for p in self.patterns):
                return None
        elif not is_image_name(base):
            return None
        return "/".join(parts)

    def _list_folder(self, *, count_done: bool = False) -> None:
        if self.recursive:
            for dirpath, dirnames, filenames in os.walk(self.input_dir):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    self._consider(Path(dirpath) / f, count_done=count_done)
        else:
            with os.scandir(self.input_dir) as entries:
                for e in sorted(entries, key=lambda e: e.name):
                    self._consider(Path(e.path), count_done=count_done)

    def _consider(self, path: Path, *, count_done: bool = False) -> None:
        name = self._name(path)
        if name is None or name in self._pending:
            return
        try:
            st = path.stat()
        except OSError:
            return
        if not path.is_file():
            return
        if self.ledger.has_stat(name, st.st_size, st.st_mtime_ns):
            self.summary.already_done += count_done
            return
        now = time.monotonic()
        self._pending[name] = _Pending(path, now, (st.st_size, st.st_mtime_ns), now)

    def _start_observer(self) -> tuple[Any, str]:
        if self.poll is not None:
            return None, f"polling every {self.poll:g} s"
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            self._emit("fallback", detail="watchdog is not installed (pip install 'patchknn[watch]'): polling")
            return None, "polling every 1 s"
        events = self._events

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if not event.is_directory:
                    events.put(os.fsdecode(getattr(event, "dest_path", "") or event.src_path))

        observer = Observer()
        observer.schedule(Handler(), str(self.input_dir), recursive=self.recursive)
        try:
            observer.start()
        except OSError as e:  # e.g. the inotify watch limit is reached
            self._emit("fallback", detail=f"file-system events unavailable ({e}): polling every 1 s")
            return None, "polling every 1 s"
        return observer, "file-system events (watchdog)"

    def _drain_events(self) -> None:
        while True:
            try:
                path = self._events.get_nowait()
            except queue.Empty:
                return
            name = self._name(Path(path))
            if name is not None and name not in self._pending:
                self._consider(Path(path))

    # ------------------------------------------------------------------------------ completeness
    def _check_pending(self, now: float) -> list[_Ready]:
        """Files complete now (stable for ``settle`` and decoding), in name order; error lines for
        those that timed out; forget the deleted ones."""
        ready: list[_Ready] = []
        for name in sorted(self._pending):
            p = self._pending[name]
            try:
                st = p.path.stat()
            except OSError:
                del self._pending[name]
                self._emit("vanished", name, "deleted before it was complete")
                continue
            if (st.st_size, st.st_mtime_ns) != p.stat:
                p.stat, p.changed_at, p.next_try = (st.st_size, st.st_mtime_ns), now, 0.0
                continue
            if now - p.changed_at < self.settle or now < p.next_try:
                continue
            item = self._read(name, p, now)
            if item is not None:
                del self._pending[name]
                ready.append(item)
        return ready

    def _read(self, name: str, p: _Pending, now: float) -> _Ready | None:
        """Read, hash and decode a stable file; ``None`` when it is not (yet) usable."""
        from patchknn.data import load_image

        try:
            data = p.path.read_bytes()
            st = p.path.stat()
        except OSError as e:
            data, reason = b"", f"cannot read the file ({e.strerror or e})"
        else:
            if (st.st_size, st.st_mtime_ns) != p.stat:
                p.stat, p.changed_at, p.next_try = (st.st_size, st.st_mtime_ns), now, 0.0
                return None  # it changed while being read: wait again
        fp = Fingerprint(p.stat[0], p.stat[1], hashlib.sha256(data).hexdigest())
        if data:
            if self.ledger.has_content(name, fp.sha256):
                self.ledger.note_stat(name, fp.size, fp.mtime_ns)
                del self._pending[name]
                self._emit("duplicate", name, "the same content was already scored under this name")
                return None
            try:
                image = load_image(data, max_pixels=getattr(self.model, "max_pixels", None))
                return _Ready(name, p.path, p.first_seen, fp, image)
            except ImageError as e:
                reason = e.reason
        elif p.stat[0] == 0:
            reason = "empty file (0 bytes)"
        if p.failure is None:
            self._emit("waiting", name, reason)
        p.failure, p.next_try = reason, now + self.settle
        if now - p.changed_at >= self.timeout:
            del self._pending[name]
            self._write(name, p.first_seen, fp, None, error=f"incomplete or unreadable after {self.timeout:g} s "
                                                             f"unchanged: {reason}")
        return None

    # ------------------------------------------------------------------------------ scoring
    def _score(self, batch: list[_Ready]) -> None:
        t0 = time.perf_counter()
        images = [item.image for item in batch]
        try:
            preds: list[Any] = list(self.model.predict_iter(images, output_size=self.resolution))
        except PatchKNNError:  # e.g. a non-finite map with on_error="stop": find which image, keep the rest
            preds = []
            for image in images:
                try:
                    preds.extend(self.model.predict_iter([image], output_size=self.resolution))
                except PatchKNNError as e:
                    preds.append(str(e).split(": ", 1)[-1])
        ms = (time.perf_counter() - t0) * 1000 / len(batch)
        for item, pred in zip(batch, preds, strict=True):
            if isinstance(pred, str) or pred.error is not None:
                self._write(item.name, item.first_seen, item.fingerprint, None,
                            error=pred if isinstance(pred, str) else pred.error, score_ms=ms)
            else:
                self._write(item.name, item.first_seen, item.fingerprint, pred, image=item.image, score_ms=ms)

    def _write(self, name: str, first_seen: float, fp: Fingerprint, pred: Any, *, image: Any = None,
               error: str | None = None, score_ms: float | None = None) -> None:
        files: dict[str, str | None] = {"overlay": None, "map": None, "mask": None}
        if pred is not None and (self.overlays or self.maps):
            from patchknn.visualize import save_prediction_files

            stem = self._stem(name)
            files = save_prediction_files(self.output, stem, pred, image, scale=self._scale, maps=self.maps,
                                          overlays=self.overlays)
        threshold = getattr(self.model, "threshold_", None)
        record = {
            "image": name,
            "score": None if pred is None else float(pred.score),
            "threshold": None if threshold is None else float(threshold),
            "verdict": None if pred is None else pred.verdict,
            "error": error,
            "model_version": self.model_version,
            "scored_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),  # noqa: UP017
            "latency_s": round(time.monotonic() - first_seen, 3),
            "score_ms": None if score_ms is None else round(score_ms, 1),
            **files,
            "size": fp.size,
            "mtime_ns": fp.mtime_ns,
            "sha256": fp.sha256,
        }
        self.ledger.append(record)
        if error is None:
            self.summary.scored += 1
            self.summary.ng += record["verdict"] == "NG"
            self._emit("scored", name, record=record)
        else:
            self.summary.errors += 1
            self._emit("error", name, error, record=record)

    def _stem(self, name: str) -> str:
        base = os.path.splitext(name)[0].replace("/", "_")
        stem, n = base, 1
        while stem in self.ledger.stems:
            n += 1
            stem = f"{base}_{n}"
        self.ledger.stems.add(stem)
        return stem

    def _emit(self, kind: str, name: str = "", detail: str = "", record: dict[str, Any] | None = None) -> None:
        if self.on_event is not None:
            self.on_event(WatchEvent(kind, name, detail, record))


__all__ = ["HotFolder", "WatchEvent", "WatchSummary"]
