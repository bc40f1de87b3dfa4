"""How well ``patchknn tune`` chooses (issue 17).

For each category: run ``tune`` on the normal training images with a fixed budget (it sees no
test image and no real defect), then fit every candidate that ``tune`` scored on the same training
images and evaluate it on the real test set. Prints, per category, the table of those candidates
with their synthetic (tune) objective beside their real test pixel AUPRC, image AUROC and F1 at
the calibrated threshold, and marks:

* ``picked``: the configuration ``tune`` chose;
* ``hindsight``: the best of the same candidates on the real test set (by the same objective);
* ``paper``: the paper's configuration.

Data: ``bottle`` from ``PATCHKNN_MVTEC_ROOT``, ``magnetic_tile`` from ``PATCHKNN_MTD_ROOT``, weights
from ``PATCHKNN_WEIGHTS_DIR``. To fit a shared 2-core CPU, a product is a seeded random
``--train-images`` of its training images (magnetic_tile: taken from every ``--mtd-train-step``-th);
``tune`` holds out and fits within them, and every candidate of the real test is fitted on all of
them; magnetic_tile's test set is every ``--mtd-test-step``-th test image in sorted order.

Usage::

    export PATCHKNN_MVTEC_ROOT=../shared/mvtec PATCHKNN_MTD_ROOT=../shared/mtd PATCHKNN_WEIGHTS_DIR=../shared/weights
    flock /tmp/patchknn-bench.lock python benchmarks/tune.py --budget 8 --cpu-budget --train-images 40 \\
        --json runs/tune.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from patchknn.data import MVTecCategory, load_mask
from patchknn.tune.candidates import plan_groups
from patchknn.tune.group import fit_group, score_group
from patchknn.tune.result import OBJECTIVE
from patchknn.tune.search import EvaluationSet, candidate_row, tune


def category_data(name: str, args: argparse.Namespace) -> tuple[list[Path], EvaluationSet, str]:
    """Training paths, the real test set, and a note on subsampling."""
    if name == "magnetic_tile":
        root, train_step, test_step = os.environ["PATCHKNN_MTD_ROOT"], args.mtd_train_step, args.mtd_test_step
    else:
        root, train_step, test_step = os.environ["PATCHKNN_MVTEC_ROOT"], 1, 1
    ds = MVTecCategory(root, name)
    train = ds.train_paths()[::train_step]
    if args.train_images and len(train) > args.train_images:
        keep = np.sort(np.random.default_rng(args.seed).choice(len(train), size=args.train_images, replace=False))
        train = [train[i] for i in keep]
    samples = ds.test_samples()[::test_step]
    masks = []
    for s in samples:
        if s.mask_path is None:
            from PIL import Image

            with Image.open(s.path) as im:
                masks.append(np.zeros((im.height, im.width), dtype=bool))
        else:
            masks.append(load_mask(s.mask_path))
    labels = np.array([s.label for s in samples])
    note = (f"{len(train)} training images (seeded, from every {train_step}. of {len(ds.train_paths())}), "
            f"{len(samples)} test images (every {test_step}. of {len(ds.test_samples())})")
    return train, EvaluationSet([str(s.path) for s in samples], masks, labels), note


def run_category(name: str, args: argparse.Namespace) -> dict[str, Any]:
    train, test, note = category_data(name, args)
    t0 = time.perf_counter()
    # the budget counts this process's CPU time (all its threads), so that how many candidates fit
    # in it does not depend on what else the shared machine runs; `patchknn tune` counts wall time
    clock = time.process_time if args.cpu_budget else time.perf_counter
    result = tune(train, budget_minutes=args.budget, seed=args.seed, progress=False, clock=clock)
    tune_seconds = time.perf_counter() - t0
    print(f"\n## {name}: tune ({tune_seconds:.0f} s, {note})\n\n{result.markdown()}\n", flush=True)
    scored = {r.name: r for r in result.rows if r.status == "scored"}
    from patchknn.tune.candidates import default_candidates

    cands = [c for c in default_candidates({"seed": args.seed}) if c.name in scored]
    rows = []
    t1 = time.perf_counter()
    for group in plan_groups(cands):
        t = time.perf_counter()
        models = fit_group(group, train, {"progress": False})
        for s in score_group(group, models, test.images, fit_seconds=time.perf_counter() - t):
            real = candidate_row(s, test)
            rows.append({"name": s.candidate.name, "tune_objective": scored[s.candidate.name].objective,
                         "test": {k: getattr(real, k) for k in
                                  ("pixel_auprc", "image_auroc", "threshold_f1", "objective", "seconds")}})
        del models
    hindsight = max(rows, key=lambda r: r["test"]["objective"])["name"]
    best_auprc = max(rows, key=lambda r: r["test"]["pixel_auprc"])["name"]
    return {"category": name, "note": note, "budget_minutes": args.budget, "cpu_budget": args.cpu_budget,
            "tune_seconds": round(tune_seconds, 1),
            "test_seconds": round(time.perf_counter() - t1, 1), "picked": result.choice, "hindsight": hindsight,
            "hindsight_pixel_auprc": best_auprc, "rows": rows, "tune": result.to_dict()}


def table(run: dict[str, Any]) -> str:
    head = ("| candidate | tune objective (synthetic) | test pixel AUPRC | test image AUROC | test F1 @ calibrated "
            "| test objective | role |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in sorted(run["rows"], key=lambda r: -r["test"]["objective"]):
        roles = [k for k, who in (("picked", run["picked"]), ("hindsight", run["hindsight"]), ("paper", "paper"))
                 if r["name"] == who]
        t = r["test"]
        lines.append(f"| {r['name']} | {r['tune_objective']:.4f} | {t['pixel_auprc']:.4f} | {t['image_auroc']:.4f} | "
                     f"{_f(t['threshold_f1'])} | {t['objective']:.4f} | {', '.join(roles)} |")
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--categories", default="bottle,magnetic_tile")
    p.add_argument("--budget", type=float, default=6.0, help="tune's budget in minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-budget", action="store_true", help="count the budget in process CPU time, not wall time")
    p.add_argument("--mtd-train-step", type=int, default=3)
    p.add_argument("--mtd-test-step", type=int, default=4)
    p.add_argument("--train-images", type=int, default=60, help="seeded subsample of the training images (0 = all)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    runs = []
    for name in args.categories.split(","):
        run = run_category(name, args)
        runs.append(run)
        print(f"\n## {name}: the candidates tune scored, on the real test set ({run['note']})\n")
        print(table(run))
        print(f"\npicked {run['picked']}, best in hindsight {run['hindsight']} (by pixel AUPRC alone: "
              f"{run['hindsight_pixel_auprc']}); objective = {OBJECTIVE}; tune {run['tune_seconds']} s, "
              f"test evaluation {run['test_seconds']} s", flush=True)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
