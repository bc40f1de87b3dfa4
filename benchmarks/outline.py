"""Does the map's outline agree with the verdict, and how good is it? (issue 17: ``guided_filter``)

Fits a preset on a category's normal training images (the model calibrates its own threshold), predicts
the whole test set with the fitted model and prints one JSON line: pixel AUPRC, AUPRO and image AUROC,
each defect kind's pixel AUPRC (its images with the good ones), the verdict's precision / recall / F1,
and the agreement of the map with the verdict: how many NG images have an empty region
``map >= threshold`` and how many OK images have a non-empty one (both 0 when the map's maximum is the
image score), and the percentiles of ``map.max() - score``.

Commands (2026-12-02, docs/accuracy.md "The map's outline from the image")::

    export PATCHKNN_MVTEC_ROOT=../shared/mvtec PATCHKNN_MTD_ROOT=../shared/mtd PATCHKNN_WEIGHTS_DIR=../shared/weights
    python benchmarks/outline.py --root ../shared/mvtec --category bottle
    python benchmarks/outline.py --root ../shared/mvtec --category bottle --set guided_filter=0
    python benchmarks/outline.py --root ../shared/mtd --category magnetic_tile
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from patchknn import PatchKNN, metrics
from patchknn.data import MVTecCategory, load_mask, resize_mask
from patchknn.options import parse_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="the folder holding the category")
    ap.add_argument("--category", required=True)
    ap.add_argument("--preset", default="best")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override an option")
    ap.add_argument("--train-every", type=int, default=1, help="fit on every N-th training image")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = MVTecCategory(args.root, args.category)
    train, samples = ds.train_paths()[:: args.train_every], ds.test_samples()
    t0 = time.perf_counter()
    model = PatchKNN.from_preset(args.preset, **parse_settings(args.set), progress=False).fit(train)
    fit_s = time.perf_counter() - t0
    preds = model.predict([s.path for s in samples])
    side = model.config.image_size
    masks = np.stack([np.zeros((side, side), bool) if s.mask_path is None
                      else resize_mask(load_mask(s.mask_path), (side, side)) for s in samples])
    maps = np.stack([p.anomaly_map for p in preds])
    scores, labels = np.array([p.score for p in preds]), np.array([s.label for s in samples])
    kinds = np.array([s.defect for s in samples])
    ng = np.array([p.verdict == "NG" for p in preds])
    empty = np.array([not p.mask.any() for p in preds])
    tp = int((ng & (labels == 1)).sum())
    precision, recall = tp / max(1, int(ng.sum())), tp / max(1, int((labels == 1).sum()))
    per_kind = {}
    for kind in sorted(set(kinds) - {"good"}):
        sel = (kinds == "good") | (kinds == kind)
        per_kind[kind] = round(float(metrics.pixel_auprc(maps[sel], masks[sel])), 4)
    peak = maps.reshape(len(maps), -1).max(1)
    print(json.dumps({
        "category": args.category, "preset": args.preset, "set": args.set, "train": len(train),
        "test": len(samples), "fit_seconds": round(fit_s, 1), "threshold": model.threshold_,
        "pixel_auprc": round(float(metrics.pixel_auprc(maps, masks)), 4),
        "aupro": round(float(metrics.aupro(maps, masks)), 4),
        "image_auroc": round(float(metrics.image_auroc(scores, labels)), 4),
        "per_kind_pixel_auprc": per_kind,
        "precision": round(precision, 4), "recall": round(recall, 4),
        "f1": round(2 * precision * recall / max(1e-12, precision + recall), 4),
        "ng": int(ng.sum()), "ng_with_empty_region": int((ng & empty).sum()),
        "ok_with_a_region": int((~ng & ~empty).sum()),
        "peak_minus_score_percentiles_0_5_50_95_100": [round(float(x), 3) for x in
                                                      np.percentile(peak - scores, [0, 5, 50, 95, 100])],
    }))


if __name__ == "__main__":
    main()
