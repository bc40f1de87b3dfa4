"""The greedy k-center coreset on a real member bank: patchknn's selection against the previous one
(every chosen centre applied to the whole bank at each refresh), same bank, same thread count, one run.

The bank is the one ``PatchKNN.fit`` hands to the coreset (after the PCA): the script fits the preset's
first member on the category's training images and stops there (no index, no calibration). It prints
each selection's seconds, the row-centre distances the new one computed as a share of the previous
one's, and whether both keep the same patches (the bank keeps the kept rows sorted; two patches at
equal distance up to float round-off may be chosen in either order).

Usage::

    export PATCHKNN_MVTEC_ROOT=../shared/mvtec PATCHKNN_MTD_ROOT=../shared/mtd
    python benchmarks/coreset.py --category bottle --preset best --threads 1
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from patchknn import bank as bank_mod
from patchknn import coreset
from patchknn.data import MVTecCategory
from patchknn.model import PatchKNN
from patchknn.presets import preset


class _Bank(Exception):
    def __init__(self, bank: np.ndarray) -> None:
        self.bank = np.asarray(bank, dtype=np.float32)


def member_bank(category: str, name: str) -> tuple[np.ndarray, float, int, int]:
    """The first member's bank as fit builds it, with the preset's coreset ratio, dimension and seed."""
    config = preset(name, ensemble=())
    env = "PATCHKNN_MTD_ROOT" if category == "magnetic_tile" else "PATCHKNN_MVTEC_ROOT"
    dataset = MVTecCategory(Path(os.environ[env]), category)

    def grab(bank: np.ndarray, *args: object) -> np.ndarray:
        raise _Bank(bank)

    real, bank_mod.greedy_coreset = bank_mod.greedy_coreset, grab
    try:
        PatchKNN.from_config(config, progress=False).fit([str(p) for p in dataset.train_paths()])
    except _Bank as got:
        return got.bank, config.coreset_ratio, config.coreset_dim, config.seed
    finally:
        bank_mod.greedy_coreset = real
    raise SystemExit(f"preset {name!r} has no coreset")


def previous_selection(z: torch.Tensor, m: int, first: int, candidates: int = 8192) -> tuple[np.ndarray, int]:
    """The selection before 2026-11-30: at each refresh every centre chosen since the last one is
    applied to every row (the choice among the candidates is the same). Returns the selection and
    the row-centre distances computed."""
    n = z.shape[0]
    norms = (z * z).sum(1)
    min_d = torch.full((n,), math.inf, dtype=torch.float32)
    order = torch.empty(m, dtype=torch.int64)
    order[0] = first
    done, count, work = 0, 1, 0  # centres applied to every row: order[:done]
    t = min(n, candidates)
    while count < m:
        coreset._apply_centres(z, norms, min_d, order[done:count].tolist())
        work += n * (count - done)
        done = count
        top_d, top = torch.topk(min_d, t + 1)
        count = coreset._select_among(z, norms, min_d, order, count, top[:t], top_d[:t].clone(), float(top_d[t]))
    return order.numpy(), work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--preset", default="best")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ratios", default="", help="comma-separated coreset ratios (default: the preset's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bank, ratio, dim, seed = member_bank(args.category, args.preset)
    z = coreset.random_projection(bank, dim, seed)
    first = int(np.random.default_rng([seed, 1]).integers(bank.shape[0]))
    print(f"{args.category} {args.preset}: bank {bank.shape[0]} x {bank.shape[1]}, projected to {z.shape[1]}, "
          f"{args.threads} thread(s)")
    for r in [float(x) for x in args.ratios.split(",") if x] or [ratio]:
        m = coreset.coreset_size(bank.shape[0], r)
        counted = [0]
        real_catch_up = coreset._catch_up

        def counting(z_, norms, min_d, seen, order, count, rows, _real=real_catch_up, counted=counted) -> None:
            counted[0] += int((count - seen[rows]).sum())
            _real(z_, norms, min_d, seen, order, count, rows)

        t0 = time.perf_counter()
        old, old_work = previous_selection(z, m, first)
        t1 = time.perf_counter()
        coreset._catch_up = counting
        try:
            new = coreset._lazy_greedy(z, m, first)
        finally:
            coreset._catch_up = real_catch_up
        t2 = time.perf_counter()
        same = np.array_equal(np.sort(old), np.sort(new))
        print(f"ratio {r:g} ({m} rows): previous {t1 - t0:.2f} s, now {t2 - t1:.2f} s "
              f"({(t2 - t1) / (t1 - t0):.2f}x); distances computed {counted[0] / old_work:.2f} of the previous; "
              f"same kept rows: {same}; same order: {np.array_equal(old, new)}")


if __name__ == "__main__":
    main()
