"""Probe changes to ``best``'s projection, bank and distances that the package does not express (issue 17).

It rebuilds ``best``'s two views with ``benchmarks/views_probe.py``'s steps (the package's backbone,
coreset, border fill, metrics; PCA 95 %, coreset 10 %, exact 1-NN, each view z-scored on held-out
normal images, their mean, smoothing 0.5 cell) and scores one change at a time beside it:

* ``wh25`` / ``wh50``: the PCA partly whitened (each component scaled by ``(eigenvalue / top)^-a``);
* ``dens05`` / ``dens1``: each distance divided by its nearest bank row's coverage radius to the power
  0.5 / 1 (the mean distance of the full bank's rows that the coreset row covers: a local density);
* ``pos02`` / ``pos05``: the cell's grid position appended to every vector (``lambda`` x the vectors'
  RMS norm, so the neighbours come from nearby positions);
* ``pow5`` / ``pow75``: the raw view's features power-normalised (``sign(x) |x|^a``) before the PCA;
* ``raw345`` / ``raw45``: the raw view on stages 3-5 / 4-5 only (the normalised view on 2-5);
* ``flipsh`` / ``flipshv``: the bank also gets the training images mirrored left-right / flipped all
  three ways (the PCA from the images as they are; the coreset ratio divided by the copies, so the bank
  keeps its size).

Features are cached under ``--cache`` (float16); ``--save-grids`` keeps each variant's z-scored test
grids of both views and of the plain normalised view (``ln``: cells L2-normalised, not averaged) for
map-level combinations (``benchmarks/grid_combos.py``). Commands (2026-12-02, docs/accuracy.md)::

    V=base,wh25,dens05,dens1,pos02,pos05,pow5,pow75,raw345,raw45
    python benchmarks/bank_probe.py --root ../shared/mvtec --category bottle --variants $V
    python benchmarks/bank_probe.py --root ../shared/mtd --category magnetic_tile --train-stride 6 \
        --variants base,raw345,pow5
    python benchmarks/bank_probe.py --root ../shared/mvtec --category bottle --variants flipsh,flipshv
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from views_probe import Views, evaluate, targets  # noqa: E402

from patchknn import scoring  # noqa: E402
from patchknn.coreset import greedy_coreset  # noqa: E402
from patchknn.data import MVTecCategory  # noqa: E402
from patchknn.presets import preset  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "base": {}, "wh25": {"whiten": 0.25}, "wh50": {"whiten": 0.5},
    "dens05": {"dens": 0.5}, "dens1": {"dens": 1.0},
    "pos02": {"pos": 0.2}, "pos05": {"pos": 0.5},
    "pow5": {"pow": 0.5}, "pow75": {"pow": 0.75},
    "flipsh": {"flips": ("h",)}, "flipshv": {"flips": ("h", "v", "hv")},
    "raw345": {"rawch": (24, 544)}, "raw45": {"rawch": (72, 544)},  # EfficientNet-Lite2: 24 + 48 + 120 + 352 channels
}

#: the views whose patch vectors are cached (views_probe.Views): raw cells, normalised 3x3, normalised cells
CACHED_VIEWS = ("raw", "ln3", "ln")


def fit_view(data: dict[str, np.ndarray], view: str, opt: dict[str, Any], grid: int) -> tuple[list[np.ndarray], int]:
    """One view's z-scored test grids under ``opt``, and its number of PCA components."""
    raw = view == "raw"
    ch = slice(*opt["rawch"]) if opt.get("rawch") and raw else slice(None)
    a = opt.get("pow") if raw else None

    def feats(name: str) -> np.ndarray:
        f = data[f"{name}_{view}"][..., ch].astype(np.float32)
        return np.sign(f) * np.abs(f) ** a if a else f

    x = feats("fit")
    n = x.shape[0]
    x = x.reshape(-1, x.shape[-1])
    mu = x.mean(0)
    ev, evec = np.linalg.eigh(np.cov((x - mu)[::4].T))
    ev, evec = ev[::-1], evec[:, ::-1]
    p = int(np.searchsorted(np.cumsum(ev) / ev.sum(), 0.95)) + 1
    proj = evec[:, :p].astype(np.float32)
    if opt.get("whiten") is not None:
        proj = proj * (ev[:p] / ev[0]).astype(np.float32) ** (-opt["whiten"])
    if opt.get("flips"):  # the PCA of the training images as they are; the bank gains their flips
        x = np.concatenate([x] + [feats(f"fit{f}").reshape(-1, x.shape[-1]) for f in opt["flips"]])
        n = x.shape[0] // grid**2
    bank = ((x - mu) @ proj).astype(np.float32)
    lam = opt.get("pos", 0.0)
    scale = float(np.sqrt((bank**2).sum(1).mean()))
    yy, xx = np.mgrid[0:grid, 0:grid]
    pos = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32) / grid

    def add_pos(b: np.ndarray, m: int) -> np.ndarray:
        return b if not lam else np.concatenate([b, (np.tile(pos, (m, 1)) * lam * scale).astype(np.float32)], 1)

    bank = add_pos(bank, n)
    core = np.ascontiguousarray(bank[greedy_coreset(bank, 0.1 / (1 + len(opt.get("flips", ()))))])
    index = faiss.IndexFlatL2(core.shape[1])
    index.add(core)
    radius = None
    if opt.get("dens"):
        d, i = index.search(np.ascontiguousarray(bank), 1)
        d, i = np.sqrt(np.maximum(d[:, 0], 0)), i[:, 0]
        sel = d > 0
        total = np.bincount(i[sel], weights=d[sel], minlength=len(core))
        count = np.bincount(i[sel], minlength=len(core))
        radius = np.where(count >= 3, total / np.maximum(count, 1), np.median(d[sel]))
        radius = radius / np.median(radius)

    def grids(name: str) -> list[np.ndarray]:
        f = feats(name)
        m = f.shape[0]
        q = add_pos(((f.reshape(-1, f.shape[-1]) - mu) @ proj).astype(np.float32), m)
        d, i = index.search(np.ascontiguousarray(q), 1)
        d = np.sqrt(np.maximum(d[:, 0], 0))
        if radius is not None:
            d = d / radius[i[:, 0]] ** opt["dens"]
        return [scoring.fill_border(g.reshape(grid, grid), 2) for g in d.reshape(m, -1)]

    h = np.concatenate([g.ravel() for g in grids("held")])
    return [(g - h.mean()) / h.std() for g in grids("test")], p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--train-stride", type=int, default=1, help="fit on every N-th training image")
    ap.add_argument("--variants", default="base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "patchknn-bank-probe")
    ap.add_argument("--save-grids", action="store_true", help="keep each variant's z-scored test grids (.npz)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    side, grid = preset("best").image_size, preset("best").grid_size
    ds = MVTecCategory(args.root, args.category)
    train, samples = ds.train_paths(), ds.test_samples()
    k = args.train_stride
    if k == 1:  # the last 20 are held out
        fit_paths, held_paths = train[:-20], train[-20:]
    else:
        fit_paths, held_paths = train[::k], [p for i, p in enumerate(train) if i % k == k // 2][:24]
    args.cache.mkdir(parents=True, exist_ok=True)
    cache = args.cache / f"{args.category}-{k}-v2.npz"  # v2: with the plain normalised view
    if not cache.exists():
        views, t0, out = Views("squash", side, 1.0), time.perf_counter(), {}
        for name, paths in (("fit", fit_paths), ("held", held_paths), ("test", [s.path for s in samples])):
            feats = [views(p)[0] for p in paths]
            for v in CACHED_VIEWS:
                out[f"{name}_{v}"] = np.stack([f[v] for f in feats]).astype(np.float16)
        np.savez(cache, **out)
        print(f"features {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    data = dict(np.load(cache))
    flips = sorted({f for name in args.variants.split(",") for f in VARIANTS[name].get("flips", ())})
    flip_views = Views("squash", side, 1.0) if flips else None
    for flip in flips:  # the training images flipped, for a bank with their patches too
        fcache = args.cache / f"{args.category}-{k}-flip{flip}.npz"
        if not fcache.exists():
            feats = [flip_views(p, flip)[0] for p in fit_paths]
            np.savez(fcache, **{f"fit{flip}_{v}": np.stack([f[v] for f in feats]).astype(np.float16)
                                for v in CACHED_VIEWS})
        data.update(dict(np.load(fcache)))
    masks, labels, kinds = targets(samples, side)

    def score(grids: list[np.ndarray]) -> dict[str, float]:
        return evaluate(grids, side, masks, labels, kinds)

    for name in args.variants.split(","):
        opt = VARIANTS[name]
        (zr, pr), (zl, pl) = fit_view(data, "raw", opt, grid), fit_view(data, "ln3", opt, grid)
        if args.save_grids:
            zn, _ = fit_view(data, "ln", opt, grid)
            np.savez(args.cache / f"z-{args.category}-{k}-{name}.npz", raw=np.stack(zr), ln3=np.stack(zl),
                     ln=np.stack(zn), masks=masks, labels=labels, kinds=kinds)
        row = {"category": args.category, "train": len(fit_paths), "variant": name, "components": [pr, pl],
               "best": score([(a + b) / 2 for a, b in zip(zr, zl)]),
               "raw_alone": score(zr)["pixel_auprc"], "ln3_alone": score(zl)["pixel_auprc"]}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
