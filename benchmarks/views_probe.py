"""Probe input shapes and feature views outside the package's fixed pipeline (issue 17).

``best`` squashes every image to ``image_size x image_size`` and scores two views of one
EfficientNet-Lite2 pass: the raw cells and the per-layer L2-normalised 3x3 averages
(``layer_norm=true+aggregation=3``). This script rebuilds that recipe step by step (the package's
backbone, coreset, border fill and metrics; PCA 95 %, coreset 10 %, an exact 1-NN, each view's grid
z-scored on held-out normal images, smoothing 0.5 cell) so that two things the package cannot
express can be measured against it in the same run:

* ``--shape``: ``squash`` (the package), ``aspect`` (each image keeps its aspect ratio at the
  same area, sides multiples of 32, 8 px cells: magnetic_tile's tiles range from 0.4 to 2.7
  width / height) or ``native`` (one scale for every image, the training images' median area to
  ``image_size`` squared: each tile keeps its pixel size);
* a third view, ``mag``: each layer's log feature norm per cell (3x3 averaged), standardised,
  the magnitude that the normalised view discards.

Metrics are computed in the ``image_size`` square frame, as ``evaluation`` does by default. On
bottle's full set it reproduces the package's ``best`` (0.853 against 0.854 pixel AUPRC)::

    python benchmarks/views_probe.py --root ../shared/mtd --category magnetic_tile --train-stride 6 --shape aspect
    python benchmarks/views_probe.py --root ../shared/mvtec --category bottle --shape squash
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from patchknn import metrics, scoring
from patchknn.backbones import build_backbone
from patchknn.coreset import greedy_coreset
from patchknn.data import MVTecCategory, load_image, load_mask, resize_mask
from patchknn.presets import preset

VIEWS = ("raw", "ln3", "mag", "ln")  # "ln": the normalised cells, not averaged (bank_probe.py)
COMBO_VIEWS = VIEWS[:3]
COMBOS = {  # weights of (raw, ln3, mag); "best" is the package's preset
    "raw": (1, 0, 0), "ln3": (0, 1, 0), "mag": (0, 0, 1), "best": (1, 1, 0),
    "ln3+mag": (0, 1, 1), "ln3+0.5mag": (0, 1, 0.5), "raw+ln3+mag": (1, 1, 1),
}


def input_size(h: int, w: int, shape: str, side: int, median_area: float) -> tuple[int, int]:
    """The backbone's input ``(height, width)`` for an ``h x w`` image."""
    if shape == "squash":
        return side, side
    s = side / np.sqrt(h * w) if shape == "aspect" else side / np.sqrt(median_area)
    return max(64, round(h * s / 32) * 32), max(64, round(w * s / 32) * 32)


class Views:
    """One backbone pass per image -> the three views' patch vectors on an 8 px grid."""

    def __init__(self, shape: str, side: int, median_area: float) -> None:
        cfg = preset("best")
        self.net = build_backbone(cfg.backbone, cfg.resolved_layers).to(memory_format=torch.channels_last)
        self.shape, self.side, self.median_area = shape, side, median_area

    def __call__(self, path: Path, flip: str = "") -> tuple[dict[str, np.ndarray], tuple[int, int]]:
        img = load_image(path)
        img = img[:, ::-1] if "h" in flip else img
        img = np.ascontiguousarray(img[::-1] if "v" in flip else img)
        th, tw = input_size(img.shape[0], img.shape[1], self.shape, self.side, self.median_area)
        x = np.array(Image.fromarray(img).resize((tw, th), Image.Resampling.BILINEAR))
        t = torch.from_numpy(x).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            maps = {k: v.float() for k, v in self.net(t).items()}
        grid = (th // 8, tw // 8)
        out: dict[str, list[torch.Tensor]] = {v: [] for v in VIEWS}
        for name in self.net.layers:
            f = maps[name]
            f3 = F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)
            f, f3 = (F.interpolate(a, size=grid, mode="bilinear", align_corners=False) for a in (f, f3))
            out["raw"].append(f)
            out["ln3"].append(F.normalize(f3, dim=1))
            out["ln"].append(F.normalize(f, dim=1))
            out["mag"].append(torch.log(f3.norm(dim=1, keepdim=True) + 1e-6))
        return {v: torch.cat(p, 1)[0].flatten(1).T.numpy() for v, p in out.items()}, grid


def view_grids(view: str, fit: list[Any], held: list[Any], test: list[Any]) -> list[np.ndarray]:
    """PCA 95 % (``mag``: standardised), coreset 10 %, exact 1-NN; test grids z-scored on ``held``."""
    x = np.concatenate([f[view] for f, _ in fit])
    mu = x.mean(0)
    if view == "mag":
        proj = np.diag(1.0 / x.std(0)).astype(np.float32)
    else:
        ev, evec = np.linalg.eigh(np.cov((x - mu)[::4].T))
        ev, evec = ev[::-1], evec[:, ::-1]
        proj = evec[:, : int(np.searchsorted(np.cumsum(ev) / ev.sum(), 0.95)) + 1].astype(np.float32)
    bank = ((x - mu) @ proj).astype(np.float32)
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank[greedy_coreset(bank, 0.1)]))

    def grids(items: list[Any]) -> list[np.ndarray]:
        out = []
        for f, (gh, gw) in items:
            d, _ = index.search(np.ascontiguousarray(((f[view] - mu) @ proj).astype(np.float32)), 1)
            out.append(scoring.fill_border(np.sqrt(np.maximum(d[:, 0], 0)).reshape(gh, gw), 2))
        return out

    h = np.concatenate([g.ravel() for g in grids(held)])
    return [(g - h.mean()) / h.std() for g in grids(test)]


def to_map(grid: np.ndarray, side: int, sigma: float = 0.5) -> np.ndarray:
    gh, gw = grid.shape
    amap = scoring.resize_bilinear(grid, (side, side))
    return gaussian_filter(amap, sigma=(sigma * side / gh, sigma * side / gw), mode="nearest", truncate=4.0)


def targets(samples: list[Any], side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test samples' masks at ``side x side``, labels and defect kinds."""
    masks = np.stack([np.zeros((side, side), bool) if s.mask_path is None
                      else resize_mask(load_mask(s.mask_path), (side, side)) for s in samples])
    return masks, np.array([s.label for s in samples]), np.array([s.defect for s in samples])


def evaluate(grids: list[np.ndarray], side: int, masks: np.ndarray, labels: np.ndarray,
             kinds: np.ndarray) -> dict[str, float]:
    """Pixel AUPRC, image AUROC (the map's maximum), AUPRO, and each kind's pixel AUPRC (with the good ones)."""
    maps = np.stack([to_map(g, side) for g in grids])
    scores = maps.reshape(len(maps), -1).max(1)
    r = {"pixel_auprc": metrics.pixel_auprc(maps, masks), "image_auroc": metrics.image_auroc(scores, labels),
         "aupro": metrics.aupro(maps, masks)}
    for kind in sorted(set(kinds) - {"good"}):
        sel = (kinds == "good") | (kinds == kind)
        r[kind] = metrics.pixel_auprc(maps[sel], masks[sel])
    return {k: round(float(v), 4) for k, v in r.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--shape", choices=("squash", "aspect", "native"), default="squash")
    ap.add_argument("--train-stride", type=int, default=1, help="fit on every N-th training image")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    side = preset("best").image_size
    ds = MVTecCategory(args.root, args.category)
    train, samples = ds.train_paths(), ds.test_samples()
    if args.train_stride == 1:  # the last 20 are held out
        fit_paths, held_paths = train[:-20], train[-20:]
    else:
        k = args.train_stride
        fit_paths, held_paths = train[::k], [p for i, p in enumerate(train) if i % k == k // 2][:24]
    median_area = float(np.median([np.prod(Image.open(p).size) for p in train]))
    views = Views(args.shape, side, median_area)
    t0 = time.perf_counter()
    fit, held = [views(p) for p in fit_paths], [views(p) for p in held_paths]
    test = [views(s.path) for s in samples]
    print(f"features {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    z = {v: view_grids(v, fit, held, test) for v in COMBO_VIEWS}
    masks, labels, kinds = targets(samples, side)
    row: dict[str, Any] = {"category": args.category, "shape": args.shape, "train": len(fit_paths)}
    for name, w in COMBOS.items():
        grids = [sum(wi * z[v][i] for wi, v in zip(w, COMBO_VIEWS)) / sum(w) for i in range(len(samples))]
        row[name] = evaluate(grids, side, masks, labels, kinds)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
