"""Score weighted combinations of the z-scored test grids that ``bank_probe.py --save-grids`` kept (issue 17).

Each combination is ``VIEW[@S]:WEIGHT`` terms joined by commas, over the saved views ``raw`` (the raw
cells), ``ln`` (the per-layer L2-normalised cells) and ``ln3`` (normalised 3x3 averages, ``best``'s
second view); ``@S`` takes the view's local contrast first (``grid_highpass=S``, the package's
:func:`patchknn.member_weights.local_contrast` after the two-ring border fill). The weighted mean is
scored as ``views_probe.evaluate`` does (pixel AUPRC, image AUROC, AUPRO, each kind's pixel AUPRC).
Commands (2026-12-02, docs/accuracy.md)::

    python benchmarks/bank_probe.py --root ../shared/mvtec --category bottle --variants base --save-grids
    python benchmarks/grid_combos.py "$TMPDIR/patchknn-bank-probe/z-bottle-1-base.npz" raw:1,ln3:1 \
        raw@1.5:1,ln:2,ln3:1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from views_probe import evaluate  # noqa: E402

from patchknn.member_weights import local_contrast  # noqa: E402


def combine(saved: dict[str, np.ndarray], spec: str) -> np.ndarray:
    """The weighted mean of the views that ``spec`` names (see the module docstring)."""
    total, weight = 0.0, 0.0
    for term in spec.split(","):
        name, w = term.split(":")
        view, _, sigma = name.partition("@")
        grids = saved[view].astype(np.float64)
        if sigma:
            grids = local_contrast(grids, float(sigma), 2)
        total, weight = total + float(w) * grids, weight + float(w)
    return total / weight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grids", type=Path, help="a z-*.npz file of bank_probe.py --save-grids")
    ap.add_argument("combos", nargs="+", help="e.g. raw:1,ln3:1 or raw@1.5:1,ln:2,ln3:1")
    args = ap.parse_args()
    saved = dict(np.load(args.grids))
    masks, labels, kinds = saved["masks"], saved["labels"], saved["kinds"]
    for spec in args.combos:
        row = evaluate(list(combine(saved, spec)), masks.shape[-1], masks, labels, kinds)
        print(json.dumps({"combo": spec, **row}), flush=True)


if __name__ == "__main__":
    main()
