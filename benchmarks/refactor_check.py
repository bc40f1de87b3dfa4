"""Before/after check of a refactoring (issue 14): the same metrics on bottle, to 1e-6.

Runs the evaluation of each preset on one category twice, once with the package of an older commit
(a ``git worktree``) and once with this checkout's, each in its own process with ``PYTHONPATH``
pointing at that tree's ``src/``, and compares what a refactoring must not change: pixel AUPRC,
pixel AUROC, AUPRO, image AUROC (absolute differences), every image score and every anomaly map
(differences relative to the largest score / map value, since they are float32 numbers of
magnitude ~40, whose rounding step is 3.8e-6).

Options that behaviour-changing fixes made between the two commits (issue 12: the Keras stem as
the paper's default backbone, 32 calibration images, ``precision='auto'`` in ``fast``) are given
explicitly, so both commits run the same method::

    git worktree add /tmp/pk-before eea0fd9
    PATCHKNN_MVTEC_ROOT=... PATCHKNN_WEIGHTS_DIR=... \\
        .venv/bin/python benchmarks/refactor_check.py --before-src /tmp/pk-before/src --out /tmp/refactor-check

Each side prints the file its ``patchknn`` was imported from, so a wrong ``PYTHONPATH`` shows.
The exit status is 1 when a compared figure differs by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: the metrics a refactoring must not change (the decision metrics depend on the threshold,
#: which the issue-12 calibration fixes did change; they are printed, not compared)
METRICS = ("pixel_auprc", "pixel_auroc", "aupro", "image_auroc")
#: the explicit options that make both commits run the same method
FIXED = {
    "paper": {"backbone": "resnet50-caffe", "calibration_images": 32},
    "fast": {"backbone": "resnet50-caffe", "calibration_images": 32, "precision": "float32"},
    "best": {"calibration_images": 32},
}
HERE = Path(__file__).resolve().parent.parent


def run_one(preset_name: str, category: str, out: Path) -> None:
    """Evaluate ``preset_name`` (with :data:`FIXED`) on ``category`` with the ``patchknn`` on the
    path; write ``<out>.json`` (metrics, scores, threshold, where patchknn came from) and
    ``<out>.npy`` (the maps)."""
    import patchknn
    from patchknn.evaluation import evaluate
    from patchknn.presets import preset

    root = os.environ["PATCHKNN_MVTEC_ROOT"]
    config = preset(preset_name, **FIXED[preset_name])
    held: dict[str, Any] = {}
    results = evaluate(root, [category], config, on_category=lambda ev: held.update(ev=ev), progress=False)
    ev = held["ev"]
    row = results["categories"][category]
    doc = {
        "patchknn": str(Path(patchknn.__file__).resolve()),
        "preset": preset_name,
        "config": results["config"],
        "metrics": {m: row[m] for m in METRICS},
        "threshold": row.get("threshold"),
        "images": [str(Path(s.path).relative_to(Path(root))) for s in ev.samples],
        "scores": [float(s) for s in ev.scores],
        "bank_size": row["bank_size"],
        "n_components": row["n_components"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    np.save(out.with_suffix(".npy"), ev.maps.astype(np.float32), allow_pickle=False)
    print(f"{preset_name}: patchknn from {doc['patchknn']}: {doc['metrics']}", flush=True)


def compare(before: Path, after: Path) -> dict[str, float]:
    """The largest absolute difference of each compared figure between two runs."""
    a, b = json.loads(before.with_suffix(".json").read_text()), json.loads(after.with_suffix(".json").read_text())
    if a["images"] != b["images"]:
        raise SystemExit(f"{before} and {after} scored different images")
    diff = {m: abs(a["metrics"][m] - b["metrics"][m]) for m in METRICS}
    scores_a, scores_b = np.array(a["scores"]), np.array(b["scores"])
    diff["image_scores"] = float(np.max(np.abs(scores_a - scores_b)))
    diff["image_scores_relative"] = diff["image_scores"] / float(max(np.abs(scores_b).max(), 1e-12))
    maps_a, maps_b = np.load(before.with_suffix(".npy")), np.load(after.with_suffix(".npy"))
    diff["maps"] = float(np.max(np.abs(maps_a - maps_b)))
    diff["maps_relative"] = diff["maps"] / float(max(np.abs(maps_b).max(), 1e-12))
    diff["bank_size"] = float(a["bank_size"] != b["bank_size"])
    diff["n_components"] = float(a["n_components"] != b["n_components"])
    diff["threshold"] = abs((a["threshold"] or 0.0) - (b["threshold"] or 0.0))
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-src", type=Path, help="src/ of the older commit's worktree")
    parser.add_argument("--after-src", type=Path, default=HERE / "src", help="src/ of the newer tree (this one)")
    parser.add_argument("--presets", nargs="+", default=list(FIXED), choices=list(FIXED))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--out", type=Path, default=Path("refactor-check"))
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--run", metavar="PRESET", help=argparse.SUPPRESS)  # one side, in a child process
    parser.add_argument("--compare-only", action="store_true", help="compare the runs already in --out")
    args = parser.parse_args(argv)
    if args.run:
        run_one(args.run, args.category, args.out)
        return 0
    if args.before_src is None and not args.compare_only:
        parser.error("--before-src is required (the src/ folder of a git worktree of the older commit)")
    failed = False
    for name in args.presets:
        sides = {"before": args.before_src, "after": args.after_src}
        for side, src in sides.items():
            if args.compare_only:
                break
            env = {**os.environ, "PYTHONPATH": str(src.resolve())}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run", name, "--category", args.category,
                   "--out", str(args.out / f"{side}-{name}")]
            subprocess.run(cmd, env=env, check=True)
        diff = compare(args.out / f"before-{name}", args.out / f"after-{name}")
        # scores (float32 maps of magnitude ~40 on bottle: one float32 step is 3.8e-6) relative to the largest
        compared = {k: diff[k] for k in (*METRICS, "image_scores_relative", "maps_relative")}
        ok = all(v <= args.tolerance for v in compared.values())
        failed |= not ok
        shown = ", ".join(f"{k} {v:.2e}" for k, v in diff.items())
        print(f"{name}: {'same' if ok else 'DIFFERENT'} to {args.tolerance:g} (max |before - after|: {shown})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
