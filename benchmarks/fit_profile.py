"""Fit time as a ratio to the backbone alone (issue 13: "fit at the speed of the backbone"), with
the time of each stage of the fit.

For each preset the script, in one process and one run:

1. decodes the category's training images once (not timed) and runs the preset's backbone
   network(s) alone over them (``PatchFeatureExtractor``'s network call, the preset's precision,
   batches of ``--batch-size``): the *backbone-only* time, measured before and after the fit (the
   smaller of the two is used, so the ratio is never flattered by a slow reference);
2. fits the preset on the same images as a user would (``PatchKNN.fit`` on the paths: decoding
   workers, backbone, PCA, bank, coreset, index, threshold calibration), the backbone already built
   and loaded (as ``benchmarks/speed.py`` does);
3. prints ``fit / backbone-only`` and the seconds spent (main thread, wall clock) in each stage:
   backbone forward passes (training images and synthetic defects), compact maps and moments, the
   PCA's eigen-decomposition, the projection of the store, coreset, index build, calibration and
   its parts (fold searches; the synthetic defects, made and run through the backbone in a
   background thread while the bank is built: their wall time there, and how long the calibration
   waited for them).

Stages are timed by wrapping the functions that run them (main thread only, except the stages
marked "background thread"); nested stages are shown indented and are included in their parent's
time (a background stage is shown under the stage it overlaps, not included in it).
``--profile FILE`` also writes a cProfile of the fit.

Usage::

    export PATCHKNN_MVTEC_ROOT=../shared/mvtec PATCHKNN_WEIGHTS_DIR=../shared/weights
    flock /tmp/patchknn-bench.lock python benchmarks/fit_profile.py --category bottle --presets paper,fast,best
    python benchmarks/fit_profile.py --presets paper --max-images 48        # a quick iteration
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import hashlib
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: (label, depth, owner object, attribute): the functions whose main-thread time is a stage
STAGES: list[tuple[str, int, str, str]] = [
    ("features (decode wait + backbone + store)", 0, "patchknn.model", "collect_features"),
    ("features, ensemble (one decode, shared backbone)", 0, "patchknn.ensemble:EnsemblePatchKNN", "_member_stores"),
    ("backbone forward (all calls)", 1, "patchknn.features:PatchFeatureExtractor", "_maps"),
    ("store.add (copy + moments)", 1, "patchknn.features:TrainingStore", "add"),
    ("moments (ssyrk)", 2, "patchknn.reduction:MomentAccumulator", "update"),
    ("memory bank (PCA + projection + coreset + index)", 0, "patchknn.model", "build_memory_bank"),
    ("PCA eigh", 1, "patchknn.reduction:PCA", "from_moments"),
    ("projection of the store", 1, "patchknn.features:TrainingStore", "projected"),
    ("coreset", 1, "patchknn.bank", "greedy_coreset"),
    ("index build", 1, "patchknn.model:PatchKNN", "_build_index"),
    ("defect images, background thread (decode + add_defect)", 1, "patchknn.calibration_defects", "defect_images"),
    ("defect rows, background thread (backbone + projection)", 1, "patchknn.calibration_defects", "defect_rows"),
    ("calibration (threshold)", 0, "patchknn.threshold", "calibrate"),
    ("waiting for the defect thread (before the coreset / the fold searches)", 1,
     "patchknn.calibration_defects:DefectRows", "wait"),
    ("held-out grids (ensemble members)", 0, "patchknn.threshold", "held_out_grids"),
    ("folds setup (exact search, coverage radius)", 1, "patchknn.heldout:Folds", "__init__"),
    ("score_group (pruned fold searches)", 1, "patchknn.threshold", "score_group"),
    ("exact fold searches", 2, "patchknn.heldout:ExactSearch", "__call__"),
]


class StageTimers:
    """Wrap the functions of :data:`STAGES` so each adds its main-thread wall time to a total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {label: 0.0 for label, *_ in STAGES}
        self.calls: dict[str, int] = {label: 0 for label, *_ in STAGES}
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        main = threading.main_thread()
        for label, _depth, owner, attr in STAGES:
            module_name, _, cls_name = owner.partition(":")
            try:  # a stage an older patchknn does not have (e.g. to compare commits) is left out
                target: Any = importlib.import_module(module_name)
                target = getattr(target, cls_name) if cls_name else target
                original = target.__dict__[attr] if cls_name else getattr(target, attr)
            except (ImportError, AttributeError, KeyError):
                continue
            is_classmethod = isinstance(original, classmethod)
            func = original.__func__ if is_classmethod else original

            def wrapped(*a: Any, __f: Any = func, __label: str = label, **k: Any) -> Any:
                if threading.current_thread() is not main and "background" not in __label:
                    return __f(*a, **k)
                t = time.perf_counter()
                try:
                    return __f(*a, **k)
                finally:
                    self.seconds[__label] += time.perf_counter() - t
                    self.calls[__label] += 1

            functools.update_wrapper(wrapped, func)
            setattr(target, attr, classmethod(wrapped) if is_classmethod else wrapped)
            self._undo.append(functools.partial(setattr, target, attr, original))

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    @contextlib.contextmanager
    def active(self) -> Iterator[StageTimers]:
        self.install()
        try:
            yield self
        finally:
            self.remove()

    def rows(self) -> list[tuple[str, int, float, int]]:
        return [(label, depth, round(self.seconds[label], 2), self.calls[label]) for label, depth, *_ in STAGES
                if self.calls[label]]


def _models(model: Any) -> list[Any]:
    return list(getattr(model, "members", None) or [model])


def backbone_only(model: Any, paths: list[Path], batch_size: int) -> float:
    """Seconds of the preset's distinct backbone network(s) alone over ``paths`` (decoded and
    resized beforehand, not timed), batches of ``batch_size``, the preset's precision."""
    import torch

    from patchknn.data import iter_batches

    seen: dict[tuple[str, int], Any] = {}
    for member in _models(model):
        seen.setdefault((member.config.backbone, member.config.image_size), member)
    total = 0.0
    for (_name, size), member in seen.items():
        batches = [b.images.to(member.device) for b in iter_batches(paths, size, batch_size, num_workers=0)]
        ext = member.extractor
        with torch.inference_mode():
            ext._maps(batches[0][:2])  # warm-up (oneDNN primitives for this shape)
            t = time.perf_counter()
            for images in batches:
                ext._maps(images)
            total += time.perf_counter() - t
    return total


def run_preset(name: str, paths: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from patchknn import PatchKNN

    torch.set_num_threads(args.threads or torch.get_num_threads())
    runtime = {"weights": args.weights, "batch_size": args.batch_size, "progress": False}
    model = PatchKNN.from_preset(name, **runtime)
    for member in _models(model):
        _ = member.extractor  # build + load the backbone outside the timings
    before = backbone_only(model, paths, args.batch_size)
    timers = StageTimers()
    profiler = cProfile.Profile() if args.profile else None
    load0 = os.getloadavg()[0]
    with timers.active():
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        model.fit(paths)
        if profiler:
            profiler.disable()
        fit = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    after = backbone_only(model, paths, args.batch_size)
    if profiler:
        profiler.dump_stats(f"{args.profile}.{name}")
    reference = min(before, after)
    cal = model.fit_info_.get("calibration") or {}
    banks = hashlib.sha256()
    for member in _models(model):  # the fitted banks, to compare two commits' fits
        banks.update(np.ascontiguousarray(member.index_.bank).tobytes())
    return {
        "preset": name,
        "n_images": len(paths),
        "fit_seconds": round(fit, 2),
        "backbone_only_seconds": round(reference, 2),
        "backbone_only_before_after": [round(before, 2), round(after, 2)],
        "ratio": round(fit / reference, 2),
        "threshold": model.threshold_,
        "banks_sha256": banks.hexdigest()[:16],
        "patchknn": str(Path(importlib.import_module("patchknn").__file__).parent),
        "calibration_seconds": cal.get("seconds"),
        "stages": timers.rows(),
        "loadavg_before_after": [round(load0, 2), round(load1, 2)],
        "threads": torch.get_num_threads(),
    }


def fewer_defects(rows_file: Path) -> None:
    """The calibration gap with half the synthetic defects, from ``benchmarks/calibration.py
    --json`` rows (fitted with the default 2 defects per image): the threshold of the default rule
    on the same held-out normal scores with every image's first defect only (defect ``2 i``, kinds
    still cycling through all five), and the image precision / recall / F1 it gives on the test set.
    Half the defects is half the calibration's defect work (making them, their backbone pass and
    their fold searches)."""
    from patchknn.metrics.decision import threshold_metrics
    from patchknn.presets import preset
    from patchknn.threshold import DEFECTS_PER_IMAGE, threshold_for

    print("| preset | category | defects / image | threshold | P | R | F1 | F1-max | gap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in json.loads(rows_file.read_text()):
        config = preset(row["preset"])
        normal, made = np.asarray(row["held_out_scores"]), np.asarray(row["defect_scores"])
        scores, labels = np.asarray(row["test_scores"]), np.asarray(row["test_labels"])
        for per, defects in ((DEFECTS_PER_IMAGE, made), (1, made[::DEFECTS_PER_IMAGE])):
            threshold, _ = threshold_for(config, normal, defects)
            m = threshold_metrics(None, None, scores, labels, threshold)
            f1 = m["threshold_image_f1"] or 0.0
            print(
                f"| {row['preset']} | {row['category']} | {per} | {threshold:.2f} | "
                f"{m['threshold_image_precision'] or 0:.3f} | {m['threshold_image_recall'] or 0:.3f} | {f1:.3f} | "
                f"{row['f1_max']:.3f} | {row['f1_max'] - f1:.3f} |"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=os.environ.get("PATCHKNN_MVTEC_ROOT"))
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--presets", default="paper,fast,best")
    ap.add_argument("--max-images", type=int, default=0, help="the first N training images (0 = all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--profile", default=None, help="write a cProfile of each fit to FILE.<preset>")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--fewer-defects", type=Path, default=None, metavar="ROWS_JSON",
                    help="print the calibration gap with half the defects (benchmarks/calibration.py --json rows)")
    args = ap.parse_args(argv)
    if args.fewer_defects:
        fewer_defects(args.fewer_defects)
        return 0
    if not args.data_root:
        ap.error("--data-root or PATCHKNN_MVTEC_ROOT is required")
    from patchknn.data import MVTecCategory

    paths = list(MVTecCategory(args.data_root, args.category).train_paths())
    if args.max_images:
        paths = paths[: args.max_images]
    results = []
    for name in args.presets.split(","):
        out = run_preset(name, paths, args)
        results.append(out)
        print(
            f"{args.category} {name}: fit {out['fit_seconds']} s for {out['n_images']} images, backbone alone "
            f"{out['backbone_only_seconds']} s (before/after {out['backbone_only_before_after']}): "
            f"ratio {out['ratio']}  threshold {out['threshold']}  banks {out['banks_sha256']}  "
            f"load {out['loadavg_before_after']}  (patchknn from {out['patchknn']})",
            flush=True,
        )
        for label, depth, seconds, calls in out["stages"]:
            print(f"    {'  ' * depth}{label}: {seconds} s ({calls} calls)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
