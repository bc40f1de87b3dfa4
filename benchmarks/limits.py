"""The floors of each stage on this CPU, and the best ratios they leave each preset (issue 13).

Issue 13 asks for ``predict`` at a ratio of the backbone alone (``paper``: >= 0.75x on bottle,
``fast``: >= 0.7x its bfloat16 backbone) and for ``fit`` at <= 1.5x the backbone's time for the
training images. Two stages cannot be skipped by any search or fit strategy: decoding each image
and running the backbone on it. This script measures both in one process, per (category, preset):

* decoding + resizing to the model's input (``patchknn.data.load_resized``, the one loader), serially
  on one core: ms of CPU per image;
* the preset's backbone alone (forward only, decoded input, its precision on this CPU, batch 16),
  on one thread (its CPU cost per image: one thread uses a core best) and on all threads (the rate
  every ratio of ``benchmarks/speed.py`` divides by);

and prints the ceilings they imply on ``threads`` cores if everything else (projection, search,
maps, PCA, calibration) were free and the cores perfectly shared:

* ``predict ceiling`` = ``threads / (decode + backbone CPU per image)``, as a ratio to the backbone
  alone on all threads;
* ``fit floor`` = the same CPU for the training images, over ``threads`` cores, as a ratio to the
  backbone alone's time for them.

A target above the predict ceiling (or below the fit floor) cannot be met on this machine by any
change after the backbone::

    python benchmarks/limits.py --categories bottle,magnetic_tile --presets paper,fast,best
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from speed import backbone_alone, category_root  # noqa: E402

#: issue 13's targets: predict / backbone alone (bottle) and fit / backbone's time
TARGETS = {("bottle", "paper"): 0.75, ("bottle", "fast"): 0.7, ("magnetic_tile", "paper"): 0.25}
FIT_TARGET = 1.5


def decode_ms(paths: list[Path], size: int, rounds: int = 2) -> float:
    """ms of one core per image for ``load_resized`` to ``size`` (best of ``rounds`` serial passes)."""
    from patchknn.data import load_resized

    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for p in paths:
            load_resized(p, size)
        best = min(best, (time.process_time() - start) / len(paths) * 1e3)
    return best


def limits(category: str, preset_name: str, args: argparse.Namespace) -> dict[str, Any]:
    from patchknn import PatchKNN
    from patchknn.data import MVTecCategory

    root = category_root(category, [args.data_root, args.mtd_root])
    ds = MVTecCategory(root, category)
    tests = [s.path for s in ds.test_samples()]
    paths = [Path(p) for p in tests[:: max(1, len(tests) // args.images)][: args.images]]
    n_train = len(ds.train_paths())
    model = PatchKNN.from_preset(preset_name, progress=False, weights=args.weights)
    size = model.config.image_size
    threads = args.threads
    torch.set_num_threads(threads)
    rate_all = backbone_alone(model, paths, 16, rounds=3)
    torch.set_num_threads(1)
    rate_one = backbone_alone(model, paths, 16, rounds=3)
    torch.set_num_threads(threads)
    dec = decode_ms(paths, size)
    backbone_cpu = 1e3 / rate_one
    per_image_cpu = dec + backbone_cpu
    ceiling_rate = threads * 1e3 / per_image_cpu
    fit_floor = (n_train * per_image_cpu / 1e3 / threads) / (n_train / rate_all)
    return {
        "category": category,
        "preset": preset_name,
        "precision": model.extractor.precision,
        "threads": threads,
        "decode_ms_one_core": round(dec, 1),
        "backbone_ms_one_thread": round(backbone_cpu, 1),
        "backbone_images_per_second": round(rate_all, 2),
        "predict_ceiling_images_per_second": round(ceiling_rate, 2),
        "predict_ceiling_ratio": round(ceiling_rate / rate_all, 3),
        "predict_target_ratio": TARGETS.get((category, preset_name)),
        "fit_floor_ratio": round(fit_floor, 2),
        "fit_target_ratio": FIT_TARGET,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=os.environ.get("PATCHKNN_MVTEC_ROOT"))
    ap.add_argument("--mtd-root", default=os.environ.get("PATCHKNN_MTD_ROOT"))
    ap.add_argument("--categories", default="bottle,magnetic_tile")
    ap.add_argument("--presets", default="paper,fast,best")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--images", type=int, default=32, help="test images decoded and run through the backbone")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    cols = ("category", "preset", "precision", "decode_ms_one_core", "backbone_ms_one_thread",
            "backbone_images_per_second", "predict_ceiling_ratio", "predict_target_ratio", "fit_floor_ratio")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for category in args.categories.split(","):
        for name in args.presets.split(","):
            rows.append(limits(category, name, args))
            print("| " + " | ".join(str(rows[-1][c]) for c in cols) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
