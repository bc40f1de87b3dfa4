"""partial_fit against a refit (issue 16): time, equality of the answers, and model bytes.

Fits a preset on the first ``--n-train`` training images of a category, adds ``--n-add`` more with
``partial_fit``, and fits the same preset on all of them from scratch (its own PCA: what a user
would do without ``partial_fit``). Prints seconds as ratios to the backbone alone on the added
images (measured in the same run), the largest score difference between the partially fitted
model and an exact reference (a fit on all the images with the first PCA; with a coreset, whose
fresh selection differs from the continued one, the largest difference of the full training
banks instead), and the bytes of the saved model (with a coreset: the training bank that
``partial_fit`` needs is part of them).

    flock /tmp/patchknn-bench.lock .venv/bin/python benchmarks/partial_fit.py \\
        --data-root "$PATCHKNN_MVTEC_ROOT" --weights "$PATCHKNN_WEIGHTS_DIR" --preset paper
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from patchknn import PatchKNN
from patchknn.bank import collect_features


def folder_bytes(path: Path) -> dict[str, int]:
    """Bytes of a saved model by file stem (``tensors``, ``backbone``, ``training``, ...)."""
    out: dict[str, int] = {}
    for f in path.rglob("*.safetensors"):
        stem = f.name.split("-")[0]
        out[stem] = out.get(stem, 0) + f.stat().st_size
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", required=True, type=Path)
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--weights", default=None, help="weights file or folder (default: the backbone's own)")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-add", type=int, default=5)
    ap.add_argument("--n-test", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    train = sorted((args.data_root / args.category / "train" / "good").glob("*.png"))
    a = [str(p) for p in train[: args.n_train]]
    b = [str(p) for p in train[args.n_train : args.n_train + args.n_add]]
    test_root = args.data_root / args.category / "test"
    every = sorted(test_root.glob("*/*.png"))
    test = [str(p) for p in every[:: max(1, len(every) // args.n_test)]]
    runtime = {"weights": args.weights, "progress": False, "num_workers": 0}

    model = PatchKNN.from_preset(args.preset, **runtime)
    collect_features(model, b[:1], "warm-up")  # builds the backbone, loads its weights
    # the backbone alone on the added images (features only), the unit of every figure below
    t = time.perf_counter()
    collect_features(model, b, "backbone")
    backbone = time.perf_counter() - t

    t = time.perf_counter()
    model.fit(a)
    fit_a = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        saved = model.save(Path(tmp) / "a")
        t = time.perf_counter()
        model.partial_fit(b)
        partial = time.perf_counter() - t
        calib = float(model.fit_info_.get("calibration", {}).get("seconds", float("nan")))

        ref = PatchKNN.load(saved, **{k: v for k, v in runtime.items() if k != "weights"})
        store = collect_features(ref, a + b).store
        ref.fit_store(store, time.perf_counter(), pca=ref.pca_)
        coreset = model.training_ is not None
        if coreset:  # the reference's coreset is a fresh selection: compare the full training banks
            full_diff = float(np.abs(model.training_.rows()[0] - ref.training_.rows()[0]).max())
        got, want = model.predict(test), ref.predict(test)
        diff = max(abs(g.score - w.score) for g, w in zip(got, want))
        same = all(g.verdict == w.verdict for g, w in zip(got, want))
        after = folder_bytes(model.save(Path(tmp) / "ab"))

    t = time.perf_counter()
    refit = PatchKNN.from_preset(args.preset, **runtime).fit(a + b)
    refit_s = time.perf_counter() - t

    print(f"{args.category} {args.preset}: fit on {len(a)}, partial_fit {len(b)}, refit on {len(a) + len(b)}")
    print(f"backbone alone on the {len(b)} added images: {backbone:.2f} s (= 1.00)")
    print(f"fit on {len(a)}:            {fit_a / backbone:7.2f} x backbone")
    print(f"partial_fit of {len(b)}:       {partial / backbone:7.2f} x backbone (calibration {calib / backbone:.2f} x)")
    print(f"refit on {len(a) + len(b)}:          {refit_s / backbone:7.2f} x backbone")
    print(f"partial_fit / refit:      {partial / refit_s:7.3f}")
    if coreset:
        print(f"full training bank vs a fit on all with the first PCA: max |diff| {full_diff:.2e}; kept rows: "
              f"greedy k-center continued (that fit's fresh coreset differs: max |score diff| {diff:.2e})")
    else:
        print(f"exact reference (fit on all with the first PCA): max |score diff| {diff:.2e} on {len(test)} test "
              f"images, verdicts {'identical' if same else 'DIFFER'}")
    thresholds = (model.threshold_, ref.threshold_, refit.threshold_)
    print("threshold: partial_fit {:.4f}, reference {:.4f}, refit {:.4f}".format(*thresholds))
    total = sum(after.values())
    print("model bytes after partial_fit: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(after.items()))
          + f" (total {total / 1e6:.1f} MB)")
    if not coreset:
        np.testing.assert_array_equal([g.verdict for g in got], [w.verdict for w in want])


if __name__ == "__main__":
    main()
