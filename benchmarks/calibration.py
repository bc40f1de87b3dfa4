"""Calibration as a measured property (issue 12): how good is the threshold a preset calibrates
from normal training images only, on real categories?

For each preset x category the script fits on the category's ``train/good`` images (the model
calibrates its threshold on held-out normal training images, nothing else), predicts the test set
and prints:

* ``threshold``: the calibrated threshold;
* ``P`` / ``R`` / ``F1``: image precision, recall and F1 of the verdict ``score >= threshold``;
* ``F1-max``: the best image F1 of any threshold, chosen in hindsight on the test labels;
* ``gap``: ``F1-max - F1``, the calibration gap (0 = the calibrated threshold is as good as the
  best one in hindsight);
* ``AUPRC``: pixel AUPRC (maps vs masks at the model's input size, as ``patchknn evaluate``);
* ``AUPRO``: the area under the per-region overlap curve up to 30 % false positives;
* ``AUROC``: image AUROC; below the table, the pixel AUPRC of each defect kind;
* ``images/s``: test images predicted per second (end to end, the whole test set in one
  ``predict`` call; on a shared machine only indicative: ``benchmarks/speed.py`` times speed).

``--rules`` also prints, for other threshold rules applied to the same held-out normal scores
(the ones the model calibrated on), the precision / recall / F1 they would give: the evidence for
the rule chosen in ``docs/calibration.md``. ``--json`` writes every row with the held-out normal
scores, the test scores and labels, so rules can be compared later without refitting.

Data: ``bottle`` (and any MVTec AD category) from ``--data-root`` / ``PATCHKNN_MVTEC_ROOT``;
``magnetic_tile`` from ``--mtd-root`` / ``PATCHKNN_MTD_ROOT`` (the folder holding
``magnetic_tile/``). The paper's weights from ``PATCHKNN_WEIGHTS_DIR``. ``--train-subsample N`` /
``--test-subsample N`` use a seeded random N of the training images / test images (test images
stratified by good vs defective), for the big magnetic_tile.

Usage::

    export PATCHKNN_MVTEC_ROOT=../shared/mvtec PATCHKNN_MTD_ROOT=../shared/mtd PATCHKNN_WEIGHTS_DIR=../shared/weights
    python benchmarks/calibration.py --presets paper,fast,best --categories bottle,magnetic_tile --rules
    python benchmarks/calibration.py --presets paper --categories magnetic_tile \\
        --train-subsample 200 --test-subsample 200 --json runs/calibration-mtd-paper.json
    python benchmarks/calibration.py --table runs/a.json runs/b.json        # the table of saved runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from patchknn import metrics
from patchknn.data import MVTecCategory
from patchknn.evaluation import _mask_for
from patchknn.metrics.decision import threshold_metrics
from patchknn.model import PatchKNN
from patchknn.options import parse_settings
from patchknn.presets import preset

#: Candidate rules, each a function of the held-out normal image scores (``--rules``).
RULES: dict[str, Any] = {
    "q0.99": lambda s: float(np.quantile(s, 0.99)),
    "q0.95": lambda s: float(np.quantile(s, 0.95)),
    "q0.9": lambda s: float(np.quantile(s, 0.9)),
    "max": lambda s: float(np.max(s)),
    "mean+3sd": lambda s: float(s.mean() + 3 * s.std(ddof=1)),
    "mean+4sd": lambda s: float(s.mean() + 4 * s.std(ddof=1)),
    "median+4mad": lambda s: float(np.median(s) + 4 * 1.4826 * np.median(np.abs(s - np.median(s)))),
    "median+6mad": lambda s: float(np.median(s) + 6 * 1.4826 * np.median(np.abs(s - np.median(s)))),
    "q0.9+1(q0.9-q0.5)": lambda s: float(2 * np.quantile(s, 0.9) - np.quantile(s, 0.5)),
    "max+0.5(max-med)": lambda s: float(1.5 * np.max(s) - 0.5 * np.median(s)),
}


def category_root(category: str, args: argparse.Namespace) -> Path:
    value = args.mtd_root if category == "magnetic_tile" else args.data_root
    env = "PATCHKNN_MTD_ROOT / --mtd-root" if category == "magnetic_tile" else "PATCHKNN_MVTEC_ROOT / --data-root"
    if not value:
        sys.exit(f"no data root for {category}: set {env}")
    root = Path(value)
    if not (root / category).is_dir():
        sys.exit(f"{root} has no {category}/ folder")
    return root


def subsample(items: list[Any], n: int | None, seed: int, labels: list[int] | None = None) -> list[Any]:
    """A seeded random ``n`` of ``items`` in their original order (stratified by ``labels``)."""
    if not n or n >= len(items):
        return list(items)
    rng = np.random.default_rng(seed)
    if labels is None:
        return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False).tolist())]
    labels_arr = np.asarray(labels)
    picks: list[int] = []
    for value in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == value)
        share = max(1, round(n * members.size / len(items)))
        picks += rng.choice(members, size=min(share, members.size), replace=False).tolist()
    return [items[i] for i in sorted(picks)]


def run_one(name: str, category: str, args: argparse.Namespace) -> dict[str, Any]:
    config = preset(name, **parse_settings(args.set or []))
    dataset = MVTecCategory(category_root(category, args), category)
    train = subsample(dataset.train_paths(), args.train_subsample, args.seed)
    samples = dataset.test_samples()
    samples = subsample(samples, args.test_subsample, args.seed, [s.label for s in samples])
    model = PatchKNN.from_config(config, device=args.device, progress=False)
    t0 = time.perf_counter()
    with _HeldOutScores() as held:  # the scores the threshold came from (single model or ensemble)
        model.fit(train)
    fit_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    preds = model.predict([s.path for s in samples], output_size="input")
    predict_seconds = time.perf_counter() - t1
    maps = np.stack([p.anomaly_map for p in preds])
    masks = np.stack(
        [_mask_for(s, m.shape, "input", config.image_size, model.max_pixels) for s, m in zip(samples, maps)]
    )
    scores = np.array([p.score for p in preds], dtype=np.float64)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    found = metrics.compute_all(maps, masks, scores, labels)
    decided = threshold_metrics(None, None, scores, labels, model.threshold_)
    cal = model.fit_info_.get("calibration") or {}
    f1, f1_max = decided["threshold_image_f1"], found.get("image_f1_max")
    row = {
        "preset": name,
        "category": category,
        "settings": args.set or [],
        "n_train": len(train),
        "n_test": len(samples),
        "n_test_defective": int(labels.sum()),
        "threshold": model.threshold_,
        "precision": decided["threshold_image_precision"],
        "recall": decided["threshold_image_recall"],
        "f1": f1,
        "f1_max": f1_max,
        "gap": None if f1 is None or f1_max is None else f1_max - f1,
        "pixel_auprc": found.get("pixel_auprc"),
        "aupro": found.get("aupro"),
        "image_auroc": found.get("image_auroc"),
        "pixel_auprc_by_kind": by_kind(maps, masks, [s.defect for s in samples]),
        "images_per_second": round(len(samples) / predict_seconds, 3),
        "calibration_images": cal.get("n_images"),
        "calibration_seconds": cal.get("seconds"),
        # an ensemble's member weights (ensemble_weights="auto": chosen at fit), None for one model
        "member_weights": cal.get("member_weights", {}).get("weights"),
        "fit_seconds": round(fit_seconds, 1),
        "predict_seconds": round(predict_seconds, 1),
        "held_out_scores": held.scores,
        "defect_scores": cal.get("defect_scores", []),
        "test_scores": scores.tolist(),
        "test_labels": labels.tolist(),
    }
    return row


def by_kind(maps: np.ndarray, masks: np.ndarray, kinds: list[str]) -> dict[str, float]:
    """Pixel AUPRC of each defect kind: its images pooled with the good ones."""
    kind_of = np.asarray(kinds)
    out = {}
    for kind in sorted(set(kinds) - {"good"}):
        sel = (kind_of == "good") | (kind_of == kind)
        out[kind] = round(float(metrics.pixel_auprc(maps[sel], masks[sel])), 4)
    return out


class _HeldOutScores:
    """Records the held-out normal scores given to :func:`patchknn.threshold.threshold_from_scores`
    while fitting (the ensemble does not store its scores, only their summary)."""

    def __enter__(self) -> _HeldOutScores:
        import patchknn.threshold as th

        self.scores: list[float] = []
        self._real = th.threshold_from_scores

        def spy(scores: Any, *a: Any, **kw: Any) -> float:
            self.scores = [float(x) for x in np.asarray(scores).ravel()]
            return self._real(scores, *a, **kw)

        th.threshold_from_scores = spy
        return self

    def __exit__(self, *exc: Any) -> None:
        import patchknn.threshold as th

        th.threshold_from_scores = self._real


def rule_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Precision / recall / F1 of every rule of :data:`RULES` on ``row``'s held-out and test scores."""
    held = np.asarray(row["held_out_scores"], dtype=np.float64)
    if held.size < 2:
        return []
    scores, labels = np.asarray(row["test_scores"]), np.asarray(row["test_labels"])
    out = []
    for rule, fn in RULES.items():
        thr = fn(held)
        m = threshold_metrics(None, None, scores, labels, thr)
        f1 = m["threshold_image_f1"]
        out.append({"rule": rule, "threshold": thr, "precision": m["threshold_image_precision"],
                    "recall": m["threshold_image_recall"], "f1": f1,
                    "gap": None if f1 is None or row["f1_max"] is None else row["f1_max"] - f1})
    return out


def _f(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | category | train/test | threshold | P | R | F1 | F1-max | gap | pixel AUPRC | AUPRO "
        "| image AUROC | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']}{' ' + ' '.join(r['settings']) if r['settings'] else ''} | {r['category']} "
            f"| {r['n_train']}/{r['n_test']} | {_f(r['threshold'], 2)} | {_f(r['precision'])} | {_f(r['recall'])} "
            f"| {_f(r['f1'])} | {_f(r['f1_max'])} | {_f(r['gap'])} | {_f(r['pixel_auprc'])} | {_f(r.get('aupro'))} "
            f"| {_f(r['image_auroc'])} | {_f(r.get('images_per_second'), 2)} |"
        )
    kinds = [r for r in rows if r.get("pixel_auprc_by_kind")]
    if kinds:
        lines += ["", "Pixel AUPRC per defect kind (its images with the good ones):", ""]
        lines += [f"- {r['preset']} {r['category']}: " + ", ".join(f"{k} {v:.3f}" for k, v in
                  r["pixel_auprc_by_kind"].items()) for r in kinds]
    return "\n".join(lines)


def rules_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| preset | category | rule | threshold | P | R | F1 | gap |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for x in rule_rows(r):
            lines.append(
                f"| {r['preset']} | {r['category']} | {x['rule']} | {_f(x['threshold'], 2)} | {_f(x['precision'])} "
                f"| {_f(x['recall'])} | {_f(x['f1'])} | {_f(x['gap'])} |"
            )
    return "\n".join(lines)


def stability_table(rows: list[dict[str, Any]], sizes: tuple[int, ...] = (16, 32, 64), draws: int = 2000) -> str:
    """How much each rule's decision varies with the draw of calibration images: for rows fitted
    with many calibration images (``--set calibration_images=N``), thresholds from random subsets
    of ``size`` of their held-out scores; mean and 5th percentile of the test precision / recall /
    F1 they give, and the share of draws with precision and recall both >= 0.95."""
    lines = [
        "| preset | category | rule | n | P mean (p5) | R mean (p5) | F1 mean (p5) | P,R >= 0.95 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        held = np.asarray(r["held_out_scores"], dtype=np.float64)
        scores, labels = np.asarray(r["test_scores"]), np.asarray(r["test_labels"])
        rng = np.random.default_rng(0)
        for size in sizes:
            if held.size < 2 * size:
                continue
            for rule, fn in RULES.items():
                got = []
                for _ in range(draws):
                    thr = fn(rng.choice(held, size=size, replace=False))
                    m = threshold_metrics(None, None, scores, labels, thr)
                    got.append([m["threshold_image_precision"] or 1.0, m["threshold_image_recall"] or 0.0,
                                m["threshold_image_f1"] or 0.0])
                a = np.array(got)
                ok = float(np.mean((a[:, 0] >= 0.95) & (a[:, 1] >= 0.95)))
                cells = " | ".join(f"{a[:, j].mean():.3f} ({np.quantile(a[:, j], 0.05):.3f})" for j in range(3))
                lines.append(f"| {r['preset']} | {r['category']} | {rule} | {size} | {cells} | {ok:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="paper,fast,best")
    parser.add_argument("--categories", default="bottle,magnetic_tile")
    parser.add_argument("--data-root", default=os.environ.get("PATCHKNN_MVTEC_ROOT"))
    parser.add_argument("--mtd-root", default=os.environ.get("PATCHKNN_MTD_ROOT"))
    parser.add_argument("--train-subsample", type=int, default=None, metavar="N")
    parser.add_argument("--test-subsample", type=int, default=None, metavar="N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsamples")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", help="option of every preset (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rules", action="store_true", help="also print other threshold rules' figures")
    parser.add_argument("--json", type=Path, default=None, help="write (append to) the rows as JSON")
    parser.add_argument("--stability", action="store_true", help="with --table: rule variability")
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="print the tables of saved --json files")
    args = parser.parse_args(argv)

    if args.table:
        rows = [r for path in args.table for r in json.loads(path.read_text())]
        print(table(rows))
        print()
        print(rules_table(rows))
        if args.stability:
            print()
            print(stability_table(rows))
        return 0
    rows: list[dict[str, Any]] = []
    rows_before = json.loads(args.json.read_text()) if args.json is not None and args.json.exists() else []
    for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
        for category in [c.strip() for c in args.categories.split(",") if c.strip()]:
            row = run_one(name, category, args)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            if args.json is not None:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(rows_before + rows, indent=1))
    print()
    print(table(rows))
    if args.rules:
        print()
        print(rules_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
