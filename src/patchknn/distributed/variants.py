"""Fit one model per product variant (category) as parallel Ray tasks.

Each variant's model is written to ``<output>/<name>`` by the task that fitted it (the output folder
must be reachable from every Ray node: a shared or network file system on a cluster; any folder on
one machine). A variant that fails is reported and does not stop the others. A report of every
variant is written to ``<output>/fit-many-report.json``.

Up-to-date check: every model fitted here stores a *training fingerprint* in its ``fit_info``
(``fit_info["training_fingerprint"]``, saved inside ``patchknn.json``, so it is written atomically
with the model). It is the SHA-256 of: the method configuration, the backbone weights' identity
(for a weights file: its absolute path, size and mtime), the ``on_error`` policy, and the list of
training files (absolute path, size in bytes, mtime in ns). A re-run skips a variant whose saved
model has the same fingerprint; anything else (new/removed/touched files, other options, a damaged
or missing model) fits it again. Runtime options that do not change the method (device, batch size,
threads) are not part of it.

Example:
    >>> from patchknn.presets import preset
    >>> from patchknn.distributed import discover_variants, fit_many
    >>> variants = discover_variants(["/data/mvtec"])                          # doctest: +SKIP
    >>> report = fit_many(variants, "models/", preset("paper"))                # doctest: +SKIP
    >>> [(r["name"], r["status"]) for r in report.results]                     # doctest: +SKIP
    [('bottle', 'fitted'), ('cable', 'fitted')]
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchknn.config import PatchKNNConfig
from patchknn.distributed.archive import write_json
from patchknn.errors import ConfigError, DatasetError, PatchKNNError

FINGERPRINT_KEY = "training_fingerprint"
REPORT_FILE = "fit-many-report.json"
FINGERPRINT_SCHEME = 1

# status values of a variant in the report
FITTED, UP_TO_DATE, FAILED, INTERRUPTED = "fitted", "up-to-date", "failed", "interrupted"


@dataclass
class Variant:
    """One model to fit: its name (the output sub-folder) and its defect-free training images.

    ``error`` is set when the variant's training set could not even be listed (it is then reported
    as failed without running a task).
    """

    name: str
    sources: list[Path] = field(default_factory=list)
    error: str | None = None


# ------------------------------------------------------------------------------------ discovery
def discover_variants(
    inputs: Sequence[str | os.PathLike[str]], categories: Sequence[str] | None = None
) -> list[Variant]:
    """The variants to fit from command-line inputs.

    * One input that is an MVTec-style root (sub-folders with ``train/good``, see
      :func:`~patchknn.data.list_categories`): one variant per category, trained on its
      ``train/good`` images; ``categories`` keeps only those named.
    * Otherwise every input is one variant: a category folder (``<x>/train/good`` is used, name
      ``x``), a ``.../<x>/train/good`` folder (name ``x``) or a plain folder of images (its name).

    A variant whose images cannot be listed (empty ``train/good``, ...) is returned with ``error``
    set, so it is reported like any other failure.

    Raises:
        DatasetError: an input does not exist, a named category is absent, or two variants would
            get the same name.
    """
    from patchknn.data import MVTecCategory, list_categories, list_images

    paths = [Path(p) for p in inputs]
    if not paths:
        raise DatasetError("no input folders given")
    for p in paths:
        if not p.is_dir():
            raise DatasetError(f"not a folder: {p}")
    variants: list[Variant] = []
    found = list_categories(paths[0]) if len(paths) == 1 else []
    if found:
        root = paths[0]
        wanted = list(categories) if categories else found
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise DatasetError(f"categories not found under {root}: {missing}; available: {found}")
        for name in wanted:
            try:
                variants.append(Variant(name, MVTecCategory(root, name).train_paths()))
            except PatchKNNError as exc:
                variants.append(Variant(name, [], str(exc)))
        return variants
    if categories:
        raise DatasetError("--category only applies to an MVTec-style root (folders with train/good)")
    for p in paths:
        if (p / "train" / "good").is_dir():
            name, folder = p.name, p / "train" / "good"
        elif p.name == "good" and p.parent.name == "train":
            name, folder = p.parent.parent.resolve().name, p
        else:
            name, folder = p.resolve().name, p
        try:
            variants.append(Variant(name, list_images(folder)))
        except PatchKNNError as exc:
            variants.append(Variant(name, [], str(exc)))
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(f"several inputs would be saved under the same name: {dupes}; rename the folders")
    return variants


# ---------------------------------------------------------------------------------- fingerprint
def _is_weights_file(weights: Any) -> bool:
    if weights is None:
        return False
    return not (isinstance(weights, str) and (weights == "random" or weights.startswith("random:")))


def _weights_identity(weights: Any) -> Any:
    if not _is_weights_file(weights):
        return weights
    path = Path(weights)
    try:
        st = path.stat()
    except OSError:
        return [os.path.abspath(path), None, None]
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def training_fingerprint(
    config: PatchKNNConfig, sources: Sequence[str | os.PathLike[str]], *, weights: Any = None, on_error: str = "stop"
) -> dict[str, Any]:
    """The fingerprint stored in a model's ``fit_info`` (see the module docstring).

    Returns:
        ``{"scheme": 1, "sha256": ..., "n_files": ...}``.
    """
    files = []
    for src in sources:
        path = os.path.abspath(src)
        try:
            st = os.stat(path)
            files.append([path, st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([path, None, None])
    doc = {
        "scheme": FINGERPRINT_SCHEME,
        "config": config.to_dict(),
        "weights": _weights_identity(weights),
        "on_error": on_error,
        "files": files,
    }
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return {"scheme": FINGERPRINT_SCHEME, "sha256": digest, "n_files": len(files)}


def saved_fingerprint(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The fingerprint of a saved model, or ``None`` (no model, damaged, missing files, none stored)."""
    from patchknn.serialization import read_meta

    root = Path(model_dir)
    try:
        doc = read_meta(root)
    except PatchKNNError:
        return None
    for entry in doc.get("files", {}).values():
        if not isinstance(entry, dict) or not (root / str(entry.get("file", ""))).is_file():
            return None
    value = (doc.get("fit_info") or {}).get(FINGERPRINT_KEY)
    return value if isinstance(value, dict) else None


def is_up_to_date(model_dir: str | os.PathLike[str], fingerprint: dict[str, Any]) -> bool:
    saved = saved_fingerprint(model_dir)
    return saved is not None and saved.get("sha256") == fingerprint["sha256"]


# ------------------------------------------------------------------------------------- the task
def fit_variant(
    name: str,
    sources: Sequence[str],
    config: dict[str, Any],
    runtime: dict[str, Any],
    model_dir: str,
    fingerprint: dict[str, Any],
    threads: int | None = None,
) -> dict[str, Any]:
    """Fit and save one variant; runs inside a Ray task (or anywhere). Never raises for a bad
    variant: returns a result dict with ``status`` ``"fitted"`` or ``"failed"`` (and ``error``)."""
    import torch

    from patchknn.model import PatchKNN

    t0 = time.perf_counter()
    result: dict[str, Any] = {"name": name, "model": model_dir, "n_files": len(sources)}
    try:
        if threads:
            torch.set_num_threads(int(threads))
        model = PatchKNN.from_config(PatchKNNConfig.from_dict(config), **{**runtime, "progress": False})
        model.fit(list(sources))
        model.fit_info_[FINGERPRINT_KEY] = dict(fingerprint)
        model.save(model_dir)
    except Exception as exc:  # noqa: BLE001 - one variant's failure is reported, not raised
        result.update(
            status=FAILED,
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(limit=-6),
            seconds=round(time.perf_counter() - t0, 3),
        )
        return result
    info = model.fit_info_
    result.update(
        status=FITTED,
        n_images=info.get("n_train_images"),
        n_skipped=len(model.skipped_),
        skipped=[[src, reason] for src, reason in model.skipped_],
        bank_size=info.get("bank_size"),
        threshold=model.threshold_,
        seconds=round(time.perf_counter() - t0, 3),
        node=os.uname().nodename,
    )
    return result


# ------------------------------------------------------------------------------------ the driver
@dataclass
class FitManyReport:
    """What :func:`fit_many` did: one result dict per variant, in input order."""

    output: Path
    results: list[dict[str, Any]]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r["status"] == FAILED]

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        out = {FITTED: 0, UP_TO_DATE: 0, FAILED: 0}
        for r in self.results:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "seconds": self.seconds,
            "counts": self.counts(),
            "config": self.config,
            "variants": self.results,
        }


def fit_many(
    variants: Sequence[Variant],
    output: str | os.PathLike[str],
    config: PatchKNNConfig,
    *,
    weights: Any = None,
    device: str = "cpu",
    batch_size: int = 16,
    on_error: str = "stop",
    force: bool = False,
    concurrency: int | None = None,
    cpus_per_task: float = 1,
    gpus_per_task: float = 0,
    threads: int | None = None,
    retries: int = 1,
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    quiet: bool = False,
) -> FitManyReport:
    """Fit every variant as a Ray task; returns (and writes) the report.

    Args:
        variants: from :func:`discover_variants`.
        output: folder receiving ``<name>/`` model directories and ``fit-many-report.json``.
        config: the method configuration, the same for every variant.
        weights, device, batch_size, on_error: runtime options of each :class:`PatchKNN`.
        force: fit even the variants whose saved model is up to date.
        concurrency: at most this many variants fitting at once (default: as many as the cluster's
            resources allow, ``cpus_per_task``/``gpus_per_task`` each).
        cpus_per_task, gpus_per_task: Ray resources of one fit. With ``device="cuda"`` and no GPU
            requested, one GPU per task is requested.
        threads: torch threads in a task (default: ``cpus_per_task``, at least 1).
        retries: Ray retries of a task whose worker process died (not of a raised error).
        address: Ray cluster to join; ``None`` starts a local instance (``num_cpus``, ``num_gpus``).
        on_result: called in the driver with each variant's result as it finishes.
    """
    t0 = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if device.startswith("cuda") and not gpus_per_task:
        gpus_per_task = 1
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must be unique, got {names}")
    n_threads = int(threads or max(1, round(cpus_per_task)))
    if _is_weights_file(weights):
        weights = os.path.abspath(weights)  # the tasks may run in another folder (or on another node)
    runtime = {"weights": weights, "device": device, "batch_size": batch_size, "on_error": on_error}
    results: dict[str, dict[str, Any]] = {}

    def done(result: dict[str, Any]) -> None:
        results[result["name"]] = result
        if on_result is not None:
            on_result(result)

    todo: list[tuple[Variant, dict[str, Any]]] = []
    for v in variants:
        model_dir = out / v.name
        if v.error is not None:
            done({"name": v.name, "model": str(model_dir), "status": FAILED, "error": v.error, "n_files": 0})
            continue
        fp = training_fingerprint(config, v.sources, weights=weights, on_error=on_error)
        if not force and is_up_to_date(model_dir, fp):
            done({"name": v.name, "model": str(model_dir), "status": UP_TO_DATE, "n_files": len(v.sources)})
            continue
        todo.append((v, fp))

    def write_report() -> FitManyReport:
        rows = []
        for v in variants:
            rows.append(results.get(v.name) or {"name": v.name, "model": str(out / v.name), "status": INTERRUPTED,
                                                "n_files": len(v.sources)})
        report = FitManyReport(
            output=out, results=rows, seconds=round(time.perf_counter() - t0, 3),
            config=config.to_dict() | {"weights": None if weights is None else str(weights)},
        )
        write_json(out / REPORT_FILE, report.to_dict())
        return report

    try:
        _run_tasks(todo, out, config, runtime, n_threads, done, address=address, num_cpus=num_cpus,
                   num_gpus=num_gpus, quiet=quiet, concurrency=concurrency, cpus_per_task=cpus_per_task,
                   gpus_per_task=gpus_per_task, retries=retries)
    except BaseException:
        write_report()  # what finished is kept and reported; the rest says "interrupted"
        raise
    return write_report()


def _run_tasks(
    todo: list[tuple[Variant, dict[str, Any]]], out: Path, config: PatchKNNConfig, runtime: dict[str, Any],
    n_threads: int, done: Callable[[dict[str, Any]], None], *, address: str | None, num_cpus: int | None,
    num_gpus: int | None, quiet: bool, concurrency: int | None, cpus_per_task: float, gpus_per_task: float,
    retries: int,
) -> None:
    from patchknn.distributed._ray import ray_session

    if todo:
        with ray_session(address, num_cpus=num_cpus, num_gpus=num_gpus, quiet=quiet) as ray:
            task = ray.remote(fit_variant)
            resources = {"num_cpus": cpus_per_task, "num_gpus": gpus_per_task, "max_retries": retries}
            limit = concurrency or len(todo)
            queue = list(todo)
            pending: dict[Any, Variant] = {}
            while queue or pending:
                while queue and len(pending) < limit:
                    v, fp = queue.pop(0)
                    ref = task.options(name=f"fit:{v.name}", **resources).remote(
                        v.name, [str(s) for s in v.sources], config.to_dict(), runtime,
                        str(out / v.name), fp, n_threads,
                    )
                    pending[ref] = v
                ready, _ = ray.wait(list(pending), num_returns=1)
                v = pending.pop(ready[0])
                try:
                    done(ray.get(ready[0]))
                except Exception as exc:  # noqa: BLE001 - a crashed worker fails its variant only
                    done({"name": v.name, "model": str(out / v.name), "status": FAILED,
                          "n_files": len(v.sources), "error": f"{type(exc).__name__}: {exc}"})


