"""Measure fit-many and score-archive with 1, 2, ... Ray workers on this machine.

Makes synthetic MVTec-layout variants (patchknn.synthetic) and an archive of their test images, starts
one local Ray instance (127.0.0.1) with as many CPUs as the largest worker count, then for each worker
count N times:

* ``fit_many(concurrency=N, cpus_per_task=1, force=True)`` over all variants;
* ``score_archive(concurrency=N, cpus_per_worker=1, overwrite=True)`` over the archive (wall time
  includes starting the actors and loading the model in each);
* for reference, ``PatchKNN.predict`` over the same archive in this process with N torch threads;
* how many cores N busy processes actually get at that moment (the machine may be shared).

The backbone runs with random weights (no download): the cost per image is that of the same
network with trained weights. Results are printed as a Markdown table and written as JSON.

Usage:
    python benchmarks/distributed.py --workers 1 2 --output bench-distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def _spin(_: int) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(3_000_000):
        x += i * i
    return time.perf_counter() - t


def effective_cores(n: int) -> float:
    """How many cores n busy processes actually got just now: n * t(alone) / t(n at once)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(n) as pool:
        pool.map(_spin, range(n))  # start-up
        alone = min(pool.map(_spin, [0]) for _ in range(2))[0]
        t = time.perf_counter()
        pool.map(_spin, range(n))
        together = time.perf_counter() - t
    return round(n * alone / together, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", type=int, default=4, help="categories for fit-many")
    ap.add_argument("--train", type=int, default=10, help="training images per variant")
    ap.add_argument("--archive", type=int, default=96, help="images in the archive to score")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--grid-size", type=int, default=28)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (the best is kept)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--output", type=Path, default=None, help="JSON results")
    args = ap.parse_args()

    from patchknn.distributed._ray import local_only, shutdown

    local_only()
    import ray
    import torch

    from patchknn import PatchKNN
    from patchknn.distributed import discover_variants, fit_many, score_archive
    from patchknn.presets import preset
    from patchknn.synthetic import make_synthetic_dataset

    work = args.workdir or Path(tempfile.mkdtemp(prefix="patchknn-bench-"))
    data = work / "data"
    n_test = max(1, -(-args.archive // args.variants))
    for i in range(args.variants):
        make_synthetic_dataset(data, category=f"v{i:02d}", n_train=args.train, n_test_good=n_test // 2,
                               n_test_defective=n_test - n_test // 2, image_size=256, seed=100 + i)
    archive = work / "archive.txt"
    paths = sorted(str(p) for p in data.glob("*/test/*/*.png"))[: args.archive]
    archive.write_text("\n".join(paths) + "\n")
    config = preset("paper", backbone=args.backbone, image_size=args.image_size, grid_size=args.grid_size)
    variants = discover_variants([data])

    ray.init(num_cpus=max(args.workers), include_dashboard=False, logging_level="warning")
    rows = []
    model_dir = work / "models" / "v00"
    try:
        for n in args.workers:
            best: dict[str, float] = {}
            load_before = os.getloadavg()[0]
            cores = [effective_cores(n)]
            for _ in range(args.repeats):
                t = time.perf_counter()
                report = fit_many(variants, work / "models", config, weights="random", batch_size=args.batch_size,
                                  force=True, concurrency=n, quiet=True)
                fit_s = time.perf_counter() - t
                assert report.ok, report.failed
                one = work / "one.txt"
                one.write_text(paths[0] + "\n")
                fixed = score_archive(model_dir, [one], work / f"fixed-{n}", concurrency=n,
                                      batch_size=args.batch_size, overwrite=True, progress=False, quiet=True)
                summary = score_archive(model_dir, [archive], work / f"scores-{n}", concurrency=n,
                                        batch_size=args.batch_size, overwrite=True, progress=False, quiet=True)
                assert summary.n_scored == len(paths)
                before = torch.get_num_threads()
                torch.set_num_threads(n)
                model = PatchKNN.load(model_dir, batch_size=args.batch_size, progress=False)
                t = time.perf_counter()
                model.predict(paths)
                local_s = time.perf_counter() - t
                torch.set_num_threads(before)
                measured = (("fit", fit_s), ("score", summary.seconds), ("fixed", fixed.seconds), ("local", local_s))
                for key, value in measured:
                    best[key] = min(best.get(key, float("inf")), value)
            rows.append({
                "workers": n,
                "fit_many_s": round(best["fit"], 2),
                "variants_per_min": round(60 * args.variants / best["fit"], 2),
                "score_archive_s": round(best["score"], 2),
                "archive_images_per_s": round(len(paths) / best["score"], 2),
                "score_one_image_s": round(best["fixed"], 2),
                "archive_images_per_s_after_startup": round(
                    (len(paths) - 1) / max(best["score"] - best["fixed"], 1e-3), 2
                ),
                "predict_in_process_s": round(best["local"], 2),
                "predict_images_per_s": round(len(paths) / best["local"], 2),
                "load_average_1min_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                "effective_cores_for_n_processes_before_after": [*cores, effective_cores(n)],
            })
            print(rows[-1], flush=True)
    finally:
        shutdown(ray)

    setup = {
        "variants": args.variants, "train_per_variant": args.train, "archive_images": len(paths),
        "image_size": args.image_size, "grid_size": args.grid_size, "backbone": args.backbone,
        "batch_size": args.batch_size, "repeats": args.repeats, "cpus": os.cpu_count(),
        "machine": platform.platform(), "python": platform.python_version(),
        "note": "the machine was shared with other jobs during the measurement (see the load averages)",
    }
    print("\n| workers | fit-many (s) | variants/min | score-archive (s) | images/s | 1-image run (s) | "
          "images/s after start-up | predict, 1 process, N threads (s) | images/s | load avg before/after | "
          "cores N processes got, before/after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['fit_many_s']} | {r['variants_per_min']} | {r['score_archive_s']} | "
              f"{r['archive_images_per_s']} | {r['score_one_image_s']} | {r['archive_images_per_s_after_startup']} | "
              f"{r['predict_in_process_s']} | {r['predict_images_per_s']} | "
              f"{r['load_average_1min_before_after'][0]} / {r['load_average_1min_before_after'][1]} | "
              f"{r['effective_cores_for_n_processes_before_after'][0]} / "
              f"{r['effective_cores_for_n_processes_before_after'][1]} |")
    print(f"\nsetup: {json.dumps(setup)}")
    if args.output:
        args.output.write_text(json.dumps({"setup": setup, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
