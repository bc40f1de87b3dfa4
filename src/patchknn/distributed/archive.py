"""Score an archive of images with Ray Data, streaming results to Parquet; resumable.

Pipeline: ``ray.data.from_items`` of the image paths -> ``map_batches`` with :class:`ArchiveScorer`
(a callable class run by an actor pool of ``concurrency`` actors, each holding the loaded model on
CPU or a GPU) -> rows streamed back to this process, which writes them in *parts*.

Each actor scores its batch with :meth:`PatchKNN.predict_iter` (images decoded by
:func:`patchknn.data.load_image`, the same code as ``patchknn predict``), so every score and map
equals ``model.predict`` for that file (bit for bit when the torch thread count is the same: torch's
CPU kernels sum in an order that depends on it).

Output folder::

    <output>/score-archive.json          what is being scored: model (and its checksum), options
    <output>/parts/part-00000.parquet    rows: image, score, verdict, threshold, error, map
    <output>/maps/<path>.npy             optional maps, named after the image's path under the source
    <output>/summary.json                totals, written when a run completes

Resuming: a part file is written to a temporary name and renamed when complete (after its maps), so
a part either exists whole or not at all. On (re)start the ``image`` column of every part is read;
those files are not scored again. An interrupted run (Ctrl-C, a crash, a killed node) therefore loses
at most the rows not yet in a part (``part_rows``, default 1000, plus those in flight); re-running
the same command scores only the rest. Running with another model or other options into the same
folder is refused (``overwrite=True`` starts afresh).

Read the results with ``pyarrow.parquet.read_table("<output>/parts")`` or
``pandas.read_parquet("<output>/parts")``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchknn.distributed.parts import MAPS_DIR, PARTS_DIR, PartStore
from patchknn.errors import ConfigError, DatasetError

MANIFEST_FILE = "score-archive.json"
SUMMARY_FILE = "summary.json"
LIST_SUFFIXES = (".txt", ".lst")


# ---------------------------------------------------------------------------------- the inputs
def list_archive(sources: Sequence[str | os.PathLike[str]]) -> tuple[list[str], str]:
    """Absolute image paths to score, and their *base* folder (maps are named relative to it).

    Each source is a folder (every image in it and its sub-folders, see
    :func:`~patchknn.data.list_images`), an image file, or a ``.txt``/``.lst`` file listing image
    paths one per line (relative paths are relative to the list file's folder; blank lines and
    lines starting with ``#`` ignored). Duplicates are scored once.
    """
    from patchknn.data import list_images

    if not sources:
        raise DatasetError("no archive source given")
    paths: list[str] = []
    roots: list[str] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            paths.extend(os.path.abspath(x) for x in list_images(p, recursive=True))
            roots.append(os.path.abspath(p))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            listed = []
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    listed.append(os.path.abspath(q if q.is_absolute() else p.parent / q))
            paths.extend(listed)
            roots.extend(os.path.dirname(x) for x in listed)
        elif p.exists():
            paths.append(os.path.abspath(p))
            roots.append(os.path.dirname(os.path.abspath(p)))
        else:
            raise DatasetError(f"archive source not found: {p}")
    unique = list(dict.fromkeys(paths))
    if not unique:
        raise DatasetError("the archive sources hold no image")
    base = os.path.commonpath(roots) if roots else "/"
    return unique, base


# ---------------------------------------------------------------------------- the actor class
class ArchiveScorer:
    """Ray Data callable class: holds one loaded model; ``batch["image"]`` paths -> result rows."""

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        batch_size: int = 16,
        threshold: float | None = None,
        output_size: Any = None,
        maps: bool = False,
        threads: int | None = None,
        sharded_index: Any = None,
    ) -> None:
        import torch

        from patchknn.model import PatchKNN

        if threads:
            torch.set_num_threads(int(threads))
        runtime = {"device": device, "batch_size": batch_size, "on_error": "skip", "progress": False}
        if sharded_index is None:
            self.model = PatchKNN.load(model_path, **runtime)
        else:
            from patchknn.distributed.sharded import load_sharded

            n_shards = next(iter(sharded_index.values())).n_shards
            self.model = load_sharded(model_path, n_shards, indexes=sharded_index, **runtime)
        if threshold is not None:
            self.model.threshold_ = float(threshold)
        self.output_size = output_size
        self.maps = maps

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        paths = [str(p) for p in batch["image"]]
        results: dict[str, tuple[Any, ...]] = {}
        readable = []
        for p in paths:
            if os.path.isfile(p):
                readable.append(p)
            else:
                results[p] = (None, None, None, "file not found or not a regular file", None)
        if readable:
            try:
                for p, pred in zip(readable, self._predict(readable), strict=True):
                    results[p] = self._row(pred)
            except Exception:  # noqa: BLE001 - something broke the batch: score one by one
                for p in readable:
                    try:
                        results[p] = self._row(self._predict([p])[0])
                    except Exception as exc:  # noqa: BLE001 - reported in the row
                        results[p] = (None, None, None, f"{type(exc).__name__}: {exc}", None)
        rows = [results[p] for p in paths]
        columns = {
            "image": pa.array(paths, pa.string()),
            "score": pa.array([r[0] for r in rows], pa.float64()),
            "verdict": pa.array([r[1] for r in rows], pa.string()),
            "threshold": pa.array([r[2] for r in rows], pa.float64()),
            "error": pa.array([r[3] for r in rows], pa.string()),
        }
        if self.maps:
            columns["map_npy"] = pa.array([r[4] for r in rows], pa.binary())
        return pa.table(columns)

    def _predict(self, paths: list[str]) -> list[Any]:
        return list(self.model.predict_iter(paths, output_size=self.output_size))

    def _row(self, pred: Any) -> tuple[Any, ...]:
        blob = None
        if self.maps and pred.anomaly_map is not None:
            buf = io.BytesIO()
            np.save(buf, pred.anomaly_map, allow_pickle=False)
            blob = buf.getvalue()
        return (pred.score, pred.verdict, pred.threshold, pred.error, blob)


@contextlib.contextmanager
def _closing(iterator: Any) -> Any:
    try:
        yield iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """``doc`` as indented JSON at ``path``, atomically (:func:`patchknn.serialization.atomic_write`)."""
    from patchknn.serialization import atomic_write

    atomic_write(path, json.dumps(doc, indent=2, default=str).encode())


def model_checksum(model_path: str | os.PathLike[str]) -> str:
    """SHA-256 of a saved model's ``patchknn.json`` (which holds the checksums of its tensors)."""
    from patchknn.serialization import META_FILE, read_meta

    read_meta(model_path)
    return hashlib.sha256((Path(model_path) / META_FILE).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------- the driver
@dataclass
class ArchiveSummary:
    """Totals of a :func:`score_archive` run (also written to ``summary.json``)."""

    output: Path
    n_images: int  # in the archive
    n_done_before: int  # found in parts from earlier runs, not scored again
    n_scored: int  # scored by this run
    n_errors: int  # rows with an error (whole output)
    n_ng: int  # NG verdicts (whole output)
    seconds: float
    images_per_second: float
    n_parts: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _output_size_key(output_size: Any) -> Any:
    return list(output_size) if isinstance(output_size, tuple) else output_size


def score_archive(
    model_path: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    concurrency: int = 1,
    batch_size: int = 16,
    device: str = "cpu",
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    threads: int | None = None,
    threshold: float | None = None,
    output_size: Any = None,
    maps: bool = False,
    part_rows: int = 1000,
    shards: int = 0,
    shard_cpus: float = 0,
    overwrite: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    progress: bool = True,
    quiet: bool = False,
    _on_part: Callable[[int, Path], None] | None = None,
) -> ArchiveSummary:
    """Score every image of ``sources`` with the model at ``model_path``; see the module docstring.

    Args:
        concurrency: scoring actors (each loads the model once).
        batch_size: images per actor call (and per backbone call).
        device: ``cpu`` or ``cuda``; with ``cuda`` and no ``gpus_per_worker``, one GPU per actor.
        cpus_per_worker, gpus_per_worker: Ray resources of one actor (fractions allowed).
        threads: torch threads per actor (default ``cpus_per_worker``, at least 1).
        threshold: decision threshold instead of the model's.
        output_size: map size: ``None``/``"input"``, ``"original"``, an int or ``(H, W)``.
        maps: also write each anomaly map as ``.npy``.
        part_rows: rows per part file (the unit of resuming).
        shards: > 0: the memory bank is split over this many actors (:class:`ShardedIndex`); the
            scoring actors then do not hold the bank.
        shard_cpus: Ray CPUs reserved by each shard actor.
        overwrite: delete earlier results in ``output`` (otherwise they are resumed).
        address: Ray cluster to join; ``None`` starts a local instance (``num_cpus``, ``num_gpus``).
        progress: show a progress bar (stderr).
        _on_part: test hook, called with ``(index, path)`` after each part is written.
    """
    t0 = time.perf_counter()
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
    if part_rows < 1:
        raise ConfigError(f"part_rows must be at least 1, got {part_rows}")
    if shards < 0:
        raise ConfigError(f"shards must be >= 0, got {shards}")
    if device.startswith("cuda") and not gpus_per_worker:
        gpus_per_worker = 1
    model_path = os.path.abspath(model_path)
    store = PartStore(output)
    manifest_path = store.root / MANIFEST_FILE
    paths, base = list_archive(sources)
    wanted = {
        "model": model_path,
        "model_sha256": model_checksum(model_path),
        "threshold": threshold,
        "output_size": _output_size_key(output_size),
        "maps": bool(maps),
    }
    if overwrite:
        for name in (PARTS_DIR, MAPS_DIR):
            shutil.rmtree(store.root / name, ignore_errors=True)
        for name in (MANIFEST_FILE, SUMMARY_FILE):
            (store.root / name).unlink(missing_ok=True)
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        changed = [k for k in wanted if k != "model" and previous.get(k) != wanted[k]]
        if changed:
            raise ConfigError(
                f"{store.root} holds results of another model or other options ({', '.join(changed)} differ); "
                "use another --output, or --overwrite to start afresh"
            )
        base = previous.get("base", base)
    else:
        if store.part_files():
            raise ConfigError(
                f"{store.root} holds part files but no {MANIFEST_FILE}; use --overwrite or another --output"
            )
        store.root.mkdir(parents=True, exist_ok=True)
        write_json(manifest_path, {**wanted, "base": base, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    store.clean_temporaries()
    done = store.done()
    todo = [p for p in paths if p not in done]
    n_before = len(paths) - len(todo)
    n_scored = 0
    if todo:
        n_scored = _run(
            store, todo, base, model_path,
            concurrency=concurrency, batch_size=batch_size, device=device, cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker, threads=threads, threshold=threshold, output_size=output_size,
            maps=maps, part_rows=part_rows, shards=shards, shard_cpus=shard_cpus, address=address,
            num_cpus=num_cpus, num_gpus=num_gpus, progress=progress and not quiet, n_before=n_before,
            quiet=quiet, on_part=_on_part,
        )
    table = store.read_all(["image", "verdict", "error"])
    n_errors = n_ng = 0
    if table is not None:
        n_errors = int(table.column("error").is_valid().to_numpy(zero_copy_only=False).sum())
        n_ng = sum(v == "NG" for v in table.column("verdict").to_pylist())
    seconds = round(time.perf_counter() - t0, 3)
    summary = ArchiveSummary(
        output=store.root, n_images=len(paths), n_done_before=n_before, n_scored=n_scored, n_errors=n_errors,
        n_ng=n_ng, seconds=seconds, images_per_second=round(n_scored / seconds, 3) if seconds > 0 else 0.0,
        n_parts=len(store.part_files()),
    )
    write_json(store.root / SUMMARY_FILE, summary.to_dict())
    return summary


def _run(
    store: PartStore, todo: list[str], base: str, model_path: str, *, concurrency: int, batch_size: int,
    device: str, cpus_per_worker: float, gpus_per_worker: float, threads: int | None, threshold: float | None,
    output_size: Any, maps: bool, part_rows: int, shards: int, shard_cpus: float, address: str | None,
    num_cpus: int | None, num_gpus: int | None, progress: bool, n_before: int, quiet: bool,
    on_part: Callable[[int, Path], None] | None,
) -> int:
    """Score ``todo``; returns how many rows were written."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    from patchknn.distributed._ray import ray_session

    n_threads = int(threads or max(1, round(cpus_per_worker)))
    written = 0
    with ray_session(address, num_cpus=num_cpus, num_gpus=num_gpus, quiet=quiet) as ray:
        ctx = ray.data.DataContext.get_current()
        ray_bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # ours is shown instead
        index = None
        try:
            if shards:
                from patchknn.distributed.sharded import shard_model

                index = shard_model(model_path, shards, num_cpus=shard_cpus)
            n_blocks = max(1, min(len(todo) // batch_size + (len(todo) % batch_size > 0), 10_000))
            ds = ray.data.from_items([{"image": p} for p in todo], override_num_blocks=n_blocks)
            ds = ds.map_batches(
                ArchiveScorer,
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=concurrency),
                num_cpus=cpus_per_worker,
                num_gpus=gpus_per_worker,
                fn_constructor_kwargs={
                    "model_path": model_path, "device": device, "batch_size": batch_size,
                    "threshold": threshold, "output_size": output_size, "maps": maps,
                    "threads": n_threads, "sharded_index": index,
                },
            )
            part_index = store.next_index()
            pending: list[Any] = []
            n_pending = 0
            n_ng = n_err = 0
            bar = tqdm(total=len(todo) + n_before, initial=n_before, desc="score-archive", unit="img",
                       disable=not progress, file=sys.stderr, dynamic_ncols=True)
            blocks = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
            with bar, _closing(blocks):  # closing the iterator stops the actors at once on an error
                for block in blocks:
                    if block.num_rows == 0:
                        continue
                    pending.append(block)
                    n_pending += block.num_rows
                    n_ng += sum(v == "NG" for v in block.column("verdict").to_pylist())
                    n_err += block.num_rows - block.column("error").null_count
                    bar.update(block.num_rows)
                    bar.set_postfix(NG=n_ng, errors=n_err, refresh=False)
                    while n_pending >= part_rows:
                        table = pa.concat_tables(pending)
                        head, rest = table.slice(0, part_rows), table.slice(part_rows)
                        path = store.write_part(head, part_index, base)
                        written += head.num_rows
                        pending, n_pending = ([rest] if rest.num_rows else []), rest.num_rows
                        if on_part is not None:
                            on_part(part_index, path)
                        part_index += 1
                if n_pending:
                    path = store.write_part(pa.concat_tables(pending), part_index, base)
                    written += n_pending
                    if on_part is not None:
                        on_part(part_index, path)
        finally:
            ctx.enable_progress_bars = ray_bars
            for shard_index in (index or {}).values():
                shard_index.close()
    return written
