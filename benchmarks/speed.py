"""Speed benchmark: fit time, end-to-end predict throughput and its split, memory, model size, accuracy.

Run from the repository root (see docs/speed.md)::

    python benchmarks/speed.py --category bottle                         # the paper (exact)
    python benchmarks/speed.py --category bottle --preset fast
    python benchmarks/speed.py --category bottle --preset fast --train-images 320
    python benchmarks/speed.py --category bottle --preset fast --scaling 25,50,100,200,400
    python benchmarks/speed.py --categories bottle,magnetic_tile --presets paper,fast,best --json out.json
    python benchmarks/speed.py --categories bottle,magnetic_tile --train-every 12 --test-images 16  # quick

The data root comes from ``--data-root`` or ``PATCHKNN_MVTEC_ROOT``; with ``--categories``, a
category not found there is looked up under ``--mtd-root`` / ``PATCHKNN_MTD_ROOT``. The backbones'
weights from ``--weights`` or ``PATCHKNN_WEIGHTS_DIR`` (the backbone's own lookup).

``--categories A,B --presets P,Q`` (the matrix) runs every (category, preset) in a fresh process
(so that each peak RSS is its own) and prints, for each, predict images/s as a ratio to the
backbone alone measured in that same process (the model's own backbone at its own precision:
float32 for ``paper`` and ``best``, bfloat16 autocast for ``fast``; network forward only, on the
already decoded test images, in batches of ``--batch-size``), the fit time as a ratio to that
backbone's time for the training images, and the peak RSS. ``--train-every N`` (every N-th
training image) and ``--test-images N`` (N test images spread over the set) make a quick run.

Printed figures (``--json FILE`` also writes them):

* fit seconds (features + PCA + coreset + index + threshold calibration), and its parts;
* predict images/s end to end over the category's test set: decoding and resizing the PNGs
  (in ``--workers`` processes), backbone, PCA projection, nearest-neighbour search, anomaly maps;
  the split gives the main process's seconds per image in the backbone network's forward,
  projection (from its feature maps to the PCA-projected patch vectors: resampling and the
  per-layer projection of ``PatchFeatureExtractor.project``), search and the rest ("other":
  waiting for decoded images, map upsampling) and, measured separately on one core, the cost of
  decoding + resizing one image;
* peak RSS of this process (and of its worker processes), bank size, saved-model bytes per
  training image (all files, and without the backbone weights, which do not grow with the data),
  pixel AUPRC at 224x224 (masks resized with nearest neighbour, as ``patchknn evaluate``);
* with ``--scaling``: one fresh process per training-set size (images repeated cyclically past
  the category's count) giving fit time, predict images/s and peak RSS.

Figures are wall-clock on the machine as it is: other processes running at the same time slow
them down; the load average before and after is printed for that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def _dir_bytes(path: Path) -> dict[str, int]:
    sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    backbone = sum(v for k, v in sizes.items() if k.startswith("backbone-"))
    return {"total": sum(sizes.values()), "backbone": backbone}


class _HookTimer:
    """Seconds spent in a module's forward (pre/post hooks)."""

    def __init__(self, module: Any) -> None:
        self.seconds = 0.0
        self._start = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _Timer:
    """Wraps a callable and adds up its wall time."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


def _train_sources(train: list[Path], n: int | None, every: int = 1) -> list[Path]:
    train = list(train)[:: max(1, every)]
    if not n or n == len(train):
        return train
    return [train[i % len(train)] for i in range(n)]


def _spread(items: list[Any], n: int) -> list[Any]:
    """``n`` items spread evenly over ``items`` (all of them when ``n`` is 0 or larger)."""
    if not n or n >= len(items):
        return list(items)
    return [items[round(i * len(items) / n)] for i in range(n)]


def backbone_alone(model: Any, paths: list[Path], batch_size: int, rounds: int = 2) -> float:
    """Images/s of ``model``'s backbone network alone (forward only, at the model's precision, on
    images already decoded and resized to its input size), best of ``rounds`` passes."""
    import contextlib

    import torch

    from patchknn.data import load_resized

    size = model.config.image_size
    images = torch.stack(
        [torch.from_numpy(np.ascontiguousarray(load_resized(p, size)[0].transpose(2, 0, 1))) for p in paths]
    )
    net = model.extractor.backbone
    bf16 = model.extractor.precision == "bfloat16"  # as resolved for this machine ("auto")

    def one_pass() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
                with ctx:
                    net(images[i : i + batch_size])
        return time.perf_counter() - t

    one_pass()  # warm-up (oneDNN picks its kernels)
    return len(images) / min(one_pass() for _ in range(rounds))


def _build_model(args: argparse.Namespace) -> Any:
    from patchknn import PatchKNN
    from patchknn.options import parse_settings
    from patchknn.presets import preset

    config = preset(args.preset, **parse_settings(args.set or []))
    workers: Any = args.workers
    if workers != "auto":
        workers = int(workers)
    runtime = {
        "weights": args.weights,
        "device": args.device,
        "batch_size": args.batch_size,
        "num_workers": workers,
        "progress": False,
    }
    return PatchKNN.from_config(config, **runtime)


def _decode_ms(paths: list[Path], image_size: int, n: int = 16) -> float:
    from patchknn.data import load_image, resize_image

    sample = paths[:n]
    t = time.process_time()
    for p in sample:
        resize_image(load_image(p), image_size)
    return (time.process_time() - t) / max(1, len(sample)) * 1000


def run_once(args: argparse.Namespace, evaluate: bool = True) -> dict[str, Any]:
    """Fit, save, predict (and score) one configuration in this process."""
    import torch

    from patchknn.data import MVTecCategory

    torch.set_num_threads(args.threads or torch.get_num_threads())
    dataset = MVTecCategory(args.data_root, args.category)
    train = _train_sources(dataset.train_paths(), args.train_images, args.train_every)
    samples = _spread(dataset.test_samples(), args.test_images)
    model = _build_model(args)
    out: dict[str, Any] = {
        "category": args.category,
        "preset": args.preset,
        "set": list(args.set or []),
        "n_train_images": len(train),
        "n_test_images": len(samples),
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "loadavg_before": round(os.getloadavg()[0], 2),
    }
    _ = model.extractor  # build + load the backbone outside the timings
    t0 = time.perf_counter()
    c0 = time.process_time()
    model.fit(train)
    out["fit_seconds"] = round(time.perf_counter() - t0, 2)
    out["fit_cpu_seconds"] = round(time.process_time() - c0, 2)
    info = model.fit_info_
    for key in ("feature_seconds", "pca_seconds", "coreset_seconds", "index_seconds"):
        if key in info:
            out[f"fit_{key}"] = info[key]
    out["bank_size"] = int(info.get("bank_size", 0))
    out["bank_size_full"] = int(info.get("bank_size_full", out["bank_size"]))
    out["n_components"] = int(info.get("n_components", 0))
    out["rss_after_fit_mb"] = round(_rss_mb(resource.RUSAGE_SELF), 1)

    if args.save:
        saved = _dir_bytes(model.save(args.save))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            saved = _dir_bytes(model.save(Path(tmp) / "model"))
    n_fit = int(info["n_train_images"])
    out["model_bytes"] = saved["total"]
    out["model_bytes_per_train_image"] = round(saved["total"] / n_fit)
    out["model_bytes_per_train_image_without_backbone"] = round((saved["total"] - saved["backbone"]) / n_fit)

    paths = [s.path for s in samples]
    out["decode_resize_ms_per_image_one_core"] = round(_decode_ms(paths, model.config.image_size), 1)
    if args.backbone_alone:
        rate = backbone_alone(model, paths, args.batch_size)
        out["backbone_images_per_second"] = round(rate, 2)
        out["backbone_precision"] = model.extractor.precision
        out["backbone_seconds_for_train_images"] = round(len(train) / rate, 2)
    if hasattr(model, "members"):  # an ensemble: no single pipeline to split
        t1 = time.perf_counter()
        preds = model.predict(paths)
        wall = time.perf_counter() - t1
        out["predict_images_per_second"] = round(len(paths) / wall, 2)
        out["predict_ms_per_image"] = {"total": round(wall / len(paths) * 1000, 1)}
        return _finish(out, model, samples, preds, evaluate)
    # backbone = the network's forward; projection = everything from its maps to the projected patch
    # vectors (resampling, concatenation or the per-layer PCA of PatchFeatureExtractor.project)
    rows = model.query_rows = _Timer(model.query_rows)  # backbone + projection (public per-batch step)
    net = _HookTimer(model.extractor.backbone)
    search = model.index_.search = _Timer(model.index_.search)
    t1 = time.perf_counter()
    preds = model.predict(paths)
    wall = time.perf_counter() - t1
    net.remove()
    n = len(paths)
    out["predict_images_per_second"] = round(n / wall, 2)
    split = {
        "backbone": net.seconds,
        "projection": max(0.0, rows.seconds - net.seconds),
        "search": search.seconds,
    }
    split["other"] = max(0.0, wall - sum(split.values()))
    out["predict_ms_per_image"] = {k: round(v / n * 1000, 1) for k, v in split.items()}
    out["predict_ms_per_image"]["total"] = round(wall / n * 1000, 1)
    return _finish(out, model, samples, preds, evaluate)


def _finish(out: dict[str, Any], model: Any, samples: list[Any], preds: list[Any], evaluate: bool) -> dict[str, Any]:
    """Ratios to the backbone alone, pixel AUPRC, peak RSS and the load average after."""
    from patchknn import metrics
    from patchknn.data import load_mask, resize_mask

    if "backbone_images_per_second" in out:
        out["predict_vs_backbone"] = round(out["predict_images_per_second"] / out["backbone_images_per_second"], 3)
        out["fit_vs_backbone"] = round(out["fit_seconds"] / out["backbone_seconds_for_train_images"], 2)
    if evaluate:
        size = model.config.image_size
        maps = np.stack([p.anomaly_map for p in preds])
        masks = np.stack(
            [
                resize_mask(load_mask(s.mask_path), (size, size)) if s.mask_path else np.zeros((size, size), bool)
                for s in samples
            ]
        )
        if masks.any():
            out["pixel_auprc"] = round(float(metrics.pixel_auprc(maps, masks)), 4)
    out["peak_rss_mb"] = round(_rss_mb(resource.RUSAGE_SELF), 1)
    out["peak_rss_children_mb"] = round(_rss_mb(resource.RUSAGE_CHILDREN), 1)
    out["loadavg_after"] = round(os.getloadavg()[0], 2)
    return out


def _child_args(
    args: argparse.Namespace, extra: list[str], data_root: str | None = None, category: str | None = None,
    preset: str | None = None,
) -> list[str]:
    """The command line of one fresh-process run (``run_once`` printing its JSON) with ``extra`` options."""
    cmd = [sys.executable, os.path.abspath(__file__), "--data-root", str(data_root or args.data_root),
           "--category", category or args.category, "--preset", preset or args.preset,
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
           *extra, "--json-stdout"]
    for s in args.set or []:
        cmd += ["--set", s]
    if args.weights:
        cmd += ["--weights", args.weights]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def _run_child(cmd: list[str], what: str) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scaling(args: argparse.Namespace, sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        extra = ["--train-images", str(n), "--test-images", str(args.scaling_test_images), "--no-eval"]
        r = _run_child(_child_args(args, extra), f"scaling run with {n} training images")
        row = {
            "train_images": n,
            "bank_size": r["bank_size"],
            "fit_seconds": r["fit_seconds"],
            "predict_images_per_second": r["predict_images_per_second"],
            "search_ms_per_image": r["predict_ms_per_image"]["search"],
            "peak_rss_mb": r["peak_rss_mb"],
            "model_mb": round(r["model_bytes"] / 2**20, 1),
        }
        rows.append(row)
        print(
            f"{n:>6} {row['bank_size']:>9} {row['fit_seconds']:>8} {row['predict_images_per_second']:>8} "
            f"{row['search_ms_per_image']:>10} {row['peak_rss_mb']:>9} {row['model_mb']:>9}",
            flush=True,
        )
    return rows


def category_root(category: str, roots: list[str | None]) -> str:
    """The first of ``roots`` that holds ``category``."""
    for root in roots:
        if root and (Path(root) / category).is_dir():
            return root
    raise SystemExit(f"category {category!r} is in none of the data roots {[r for r in roots if r]}")


def matrix(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (category, preset) in a fresh process; prints one row each as it finishes."""
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    print(
        f"{'category':<14} {'preset':<6} {'train':>5} {'test':>4} {'backbone':>12} {'img/s':>6} {'x bb':>5} "
        f"{'fit s':>6} {'bb fit s':>8} {'x bb':>5} {'RSS MB':>7} {'AUPRC':>6}",
        flush=True,
    )
    rows = []
    for category in categories:
        root = category_root(category, [args.data_root, args.mtd_root])
        for preset in presets:
            extra = ["--train-every", str(args.train_every), "--test-images", str(args.test_images),
                     "--backbone-alone", *(["--no-eval"] if args.no_eval else [])]
            r = _run_child(_child_args(args, extra, root, category, preset), f"{category} / {preset}")
            rows.append(r)
            kind = "bf16" if r["backbone_precision"] == "bfloat16" else "fp32"
            backbone = f"{r['backbone_images_per_second']:.2f} {kind}"
            print(
                f"{category:<14} {preset:<6} {r['n_train_images']:>5} {r['n_test_images']:>4} {backbone:>12} "
                f"{r['predict_images_per_second']:>6.2f} {r['predict_vs_backbone']:>5.2f} {r['fit_seconds']:>6.1f} "
                f"{r['backbone_seconds_for_train_images']:>8.1f} {r['fit_vs_backbone']:>5.2f} "
                f"{r['peak_rss_mb']:>7.0f} {r.get('pixel_auprc', float('nan')):>6.4f}",
                flush=True,
            )
    print("backbone: images/s of the model's own backbone alone (forward only, decoded input) in the same "
          "process; x bb: predict's rate / the backbone's; bb fit s: the backbone's time for the training "
          "images; fit x bb: fit s / bb fit s", flush=True)
    return rows


def _print(out: dict[str, Any]) -> None:
    ms = {"backbone": "-", "projection": "-", "search": "-", "other": "-", **out["predict_ms_per_image"]}
    lines = [
        f"category {out['category']}  preset {out['preset']}  set {out['set'] or '-'}",
        f"train images {out['n_train_images']}  test images {out['n_test_images']}  "
        f"threads {out['threads']}  workers {out['workers']}  batch {out['batch_size']}",
        f"fit: {out['fit_seconds']} s (cpu {out['fit_cpu_seconds']} s; features {out.get('fit_feature_seconds')}"
        f" s, pca {out.get('fit_pca_seconds')} s, coreset {out.get('fit_coreset_seconds')} s,"
        f" index {out.get('fit_index_seconds')} s)",
        f"bank: {out['bank_size']} patches (of {out['bank_size_full']}) x {out['n_components']} dims",
        f"predict: {out['predict_images_per_second']} images/s end to end",
        f"  per image (ms): backbone {ms['backbone']}  projection {ms['projection']}  search {ms['search']}  "
        f"other {ms['other']}  total {ms['total']}",
        f"  decode+resize, one core, serial: {out['decode_resize_ms_per_image_one_core']} ms/image",
        *(
            [f"backbone alone ({out['backbone_precision']}): {out['backbone_images_per_second']} images/s; "
             f"predict = {out['predict_vs_backbone']}x it, fit = {out['fit_vs_backbone']}x its time for the "
             f"training images ({out['backbone_seconds_for_train_images']} s)"]
            if "backbone_images_per_second" in out else []
        ),
        f"peak RSS: {out['peak_rss_mb']} MB (after fit {out['rss_after_fit_mb']} MB; "
        f"worker processes {out['peak_rss_children_mb']} MB)",
        f"saved model: {out['model_bytes']} bytes = {out['model_bytes_per_train_image']} bytes/training image "
        f"({out['model_bytes_per_train_image_without_backbone']} without the backbone weights)",
        f"pixel AUPRC: {out.get('pixel_auprc', 'n/a')}",
        f"load average (1 min): before {out['loadavg_before']}, after {out['loadavg_after']}",
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("PATCHKNN_MVTEC_ROOT"))
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one option (repeatable)")
    ap.add_argument("--weights", default=None, help="backbone weights file (default: the backbone's lookup)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", default="auto", help="decoding worker processes, or auto")
    ap.add_argument("--threads", type=int, default=0, help="torch/faiss threads (0 = torch's default)")
    ap.add_argument("--train-images", type=int, default=0, help="repeat training images up to this count")
    ap.add_argument("--test-images", type=int, default=0, help="use only N test images, spread over the set")
    ap.add_argument("--train-every", type=int, default=1, help="use every N-th training image")
    ap.add_argument("--categories", default="", help="the matrix: categories, e.g. bottle,magnetic_tile")
    ap.add_argument("--presets", default="paper,fast,best", help="with --categories: the presets (default all three)")
    ap.add_argument("--mtd-root", default=os.environ.get("PATCHKNN_MTD_ROOT"),
                    help="with --categories: a second data root (default $PATCHKNN_MTD_ROOT)")
    ap.add_argument("--backbone-alone", action="store_true",
                    help="also measure the backbone alone and print ratios to it (always on in the matrix)")
    ap.add_argument("--scaling", default="", help="comma-separated training-set sizes, e.g. 25,50,100,200,400")
    ap.add_argument("--scaling-test-images", type=int, default=32, help="test images per scaling point")
    ap.add_argument("--no-eval", action="store_true", help="skip the accuracy computation")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    ap.add_argument("--save", type=Path, default=None, help="keep the fitted model in this directory")
    ap.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.data_root:
        ap.error("--data-root or PATCHKNN_MVTEC_ROOT is required")

    if args.json_stdout:
        print(json.dumps(run_once(args, evaluate=not args.no_eval)))
        return
    result: dict[str, Any] = {}
    if args.categories:
        result["matrix"] = matrix(args)
    elif args.scaling:
        sizes = [int(x) for x in args.scaling.split(",") if x.strip()]
        print(f"scaling: {args.category}, preset {args.preset}, set {args.set or '-'}", flush=True)
        print(f"{'train':>6} {'bank':>9} {'fit_s':>8} {'img/s':>8} {'search_ms':>10} {'rss_MB':>9} {'model_MB':>9}")
        result["scaling"] = scaling(args, sizes)
    else:
        result = run_once(args, evaluate=not args.no_eval)
        _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
