"""Exported-model speed: images/s of the torch model vs onnxruntime vs OpenVINO, same model, same images.

Run from the repository root (see docs/export.md)::

    flock /tmp/patchknn-bench.lock python benchmarks/export.py --preset paper --preset fast --preset best

For each preset: fit on ``--train-images`` bottle training images, export to ONNX and to OpenVINO
IR, decode and resize ``--test-images`` test images once, then time, in this one process and
interleaved round by round (``--rounds``; the best round is kept, so a burst of load from other
processes hurts all three alike), ``predict_batch`` on the same uint8 batches of ``--batch-size``:

* ``torch``: :meth:`PatchKNN.predict_batch` (the backbone channels-last, as the library runs it;
  ``torch.set_num_threads(--threads)``);
* ``onnxruntime`` / ``openvino``: :meth:`patchknn.runtime.ExportedModel.predict_batch` (graph +
  the torch model's own search, :func:`patchknn.index.build_index` + the same maps and scores),
  the graph runtime and the search on ``--threads`` threads.

Decoding is left out (it is the same Pillow code on all three paths). Figures are images/s end to
end from a decoded batch, and each one's ratio to torch measured in the same run; the largest
difference of the maps to torch's (relative to the map's max) and whether every verdict agrees
are printed beside them. The data root comes from ``--data-root`` or ``PATCHKNN_MVTEC_ROOT``; the
paper's weights from ``--weights`` or ``PATCHKNN_WEIGHTS_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WEIGHTS_FILES = ("resnet50-caffe-msra-stem-layer3.safetensors", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")


def _weights(arg: str | None) -> str | None:
    if arg:
        return arg
    folder = os.environ.get("PATCHKNN_WEIGHTS_DIR")
    if folder:
        for name in WEIGHTS_FILES:
            if (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    return None


def run_preset(name: str, args: argparse.Namespace, root: Path) -> dict:
    import torch

    from patchknn import PatchKNN
    from patchknn.data import load_resized
    from patchknn.export import export_model
    from patchknn.runtime import ExportedModel

    torch.set_num_threads(args.threads)
    category = root / args.category
    train = sorted((category / "train" / "good").glob("*.png"))[: args.train_images]
    test = sorted((category / "test").rglob("*.png"))
    step = max(1, len(test) // args.test_images)
    test = test[::step][: args.test_images]
    options = {"progress": False, "batch_size": args.batch_size}
    weights = _weights(args.weights)
    if weights and name != "best":
        options["weights"] = weights
    model = PatchKNN.from_preset(name, **options).fit(train)
    size = model.config.image_size
    images = np.stack([load_resized(p, size)[0].transpose(2, 0, 1) for p in test])
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = export_model(model, Path(tmp) / "onnx")
        ov_dir = export_model(model, Path(tmp) / "openvino", format="openvino")
        auto = ExportedModel(onnx_dir).backend  # what backend="auto" runs for this model
        runners = {
            "torch": lambda b: model.predict_batch(torch.from_numpy(b)),
            "onnxruntime": ExportedModel(onnx_dir, "onnxruntime", threads=args.threads).predict_batch,
            "openvino": ExportedModel(ov_dir, "openvino", threads=args.threads).predict_batch,
        }
        for run in runners.values():  # warm-up, untimed
            run(batches[0])
        best = dict.fromkeys(runners, float("inf"))
        preds: dict[str, list] = {}
        for _ in range(args.rounds):
            for key, run in runners.items():
                t0 = time.perf_counter()
                out = [p for b in batches for p in run(b)]
                best[key] = min(best[key], time.perf_counter() - t0)
                preds[key] = out
    ref = preds["torch"]
    result = {"preset": name, "n_images": len(images), "threads": args.threads, "batch_size": args.batch_size,
              "search": [type(m.index_).__name__ for m in getattr(model, "members", None) or [model]],
              "bank_rows": [int(m.index_.size) for m in getattr(model, "members", None) or [model]],
              "auto": auto}
    for key in runners:
        diff = max(
            float(np.abs(a.anomaly_map - b.anomaly_map).max() / np.abs(b.anomaly_map).max())
            for a, b in zip(preds[key], ref)
        )
        result[key] = {
            "images_per_s": round(len(images) / best[key], 2),
            "vs_torch": round(best["torch"] / best[key], 3),
            "max_map_diff": diff,
            "verdicts_equal": [p.verdict for p in preds[key]] == [p.verdict for p in ref],
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", action="append", help="paper, fast, best (repeatable; default all three)")
    parser.add_argument("--data-root", default=os.environ.get("PATCHKNN_MVTEC_ROOT"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--train-images", type=int, default=40)
    parser.add_argument("--test-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.data_root:
        parser.error("give --data-root or set PATCHKNN_MVTEC_ROOT")
    results = [run_preset(p, args, Path(args.data_root)) for p in (args.preset or ["paper", "fast", "best"])]
    print(f"| preset | search (bank rows) | runtime | images/s | vs torch | max map diff | verdicts equal | auto |"
          f"  (threads={args.threads})")
    print("|---|---|---|---:|---:|---:|---|---|")
    for r in results:
        search = ", ".join(f"{s} ({n})" for s, n in zip(r["search"], r["bank_rows"]))
        for key in ("torch", "onnxruntime", "openvino"):
            x = r[key]
            print(f"| {r['preset']} | {search} | {key} | {x['images_per_s']} | {x['vs_torch']:.2f}x | "
                  f"{x['max_map_diff']:.1e} | {x['verdicts_equal']} | {'<-' if key == r['auto'] else ''} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
