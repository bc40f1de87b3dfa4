"""Ablation of the accuracy options (issue #8): one row per option, on MVTec AD bottle and on the
synthetic generator, through the package's own API (``PatchKNN.fit`` / ``predict``, the metrics of
``patchknn evaluate``).

Backbone feature maps are the expensive part on a CPU, and most options only change what happens
after the backbone. So the backbone is wrapped by a cache keyed by the SHA-1 of each input image
(the uint8 tensor after resizing, flips included): every (backbone, image size) pair is computed
once, stored as float16 under ``--cache-dir``, and every variant that shares it re-runs only the
cheap part (pooling, resizing, PCA, search, smoothing, scoring). float16 storage moves the metrics
by about 1e-4; the rows for the presets are checked with ``patchknn evaluate`` itself.

Speed: after each variant is fitted, the real backbone is put back (channels-last, as PatchKNN's
own, and warmed up by one untimed image) and ``--speed-images`` test images are scored end to end
in one ``predict`` call (decode -> backbone -> search -> map), which is the images/s column. Up to
``batch_size`` (16) images are one batch, so no decoding worker starts and the images are decoded
serially before the backbone runs: the column compares variants with one another; the absolute
steady-state rate with decoding in parallel is ``benchmarks/speed.py``'s (docs/speed.md). On a
shared machine it is only indicative.

Usage::

    export PATCHKNN_WEIGHTS_DIR=/path/to/weights PATCHKNN_MVTEC_ROOT=/path/to/mvtec
    python benchmarks/ablation.py --category bottle --variants paper,agg3,smooth --out runs/ablation.jsonl
    python benchmarks/ablation.py --synthetic --variants paper,agg3 --out runs/ablation.jsonl
    python benchmarks/ablation.py --category bottle,magnetic_tile --train-stride 6 --variants paper,border2 \\
        --out runs/both.jsonl            # both real categories, each with every 6th train image (the stride applies
                                         # to every category: run bottle without it for its full 209 training images)
    python benchmarks/ablation.py --table runs/bottle.jsonl runs/synthetic.jsonl   # docs/accuracy.md's table
    python benchmarks/ablation.py --list                             # the variants and their flags
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import patchknn.model as model_mod
from patchknn import metrics
from patchknn.backbones import build_backbone
from patchknn.config import PatchKNNConfig
from patchknn.data import MVTecCategory
from patchknn.evaluation import _mask_for
from patchknn.presets import preset

# ---------------------------------------------------------------------------------- variants
# name -> (preset, overrides)
Variant = tuple[str, dict[str, Any]]
SMOOTH = 0.5  # grid cells: PatchCore's sigma = 4 px at 224 px, one cell = 8 px at grid 28
CORESET = 0.1  # PatchCore-10%: the bank subsampling the `best` preset uses for speed
TTA = ("hflip", "vflip")
# ensembles are configurations too: `ensemble` lists the other members' differing options
ENS = {"ensemble": ("backbone=efficientnet-lite2",)}  # + EfficientNet-Lite2 (same other options)
LNENS = {"ensemble": ("layer_norm=true",)}  # one backbone pass, raw + L2-normalised layers
ENS4 = {"ensemble": ("layer_norm=true", "backbone=efficientnet-lite2", "backbone=efficientnet-lite2+layer_norm=true")}
V1 = {"smoothing_sigma": SMOOTH, "coreset_ratio": CORESET}  # the two options that helped or cost nothing
EFF = {"backbone": "efficientnet-lite2"}
R320 = {"image_size": 320, "grid_size": 40}
R384 = {"image_size": 384, "grid_size": 48}  # 8 px cells, as 320 / 40
R448 = {"image_size": 448, "grid_size": 56}
LN_MAIN = {"layer_norm": True, "ensemble": ()}  # `best` with the normalised view alone
S2345 = ("stage2", "stage3", "stage4", "stage5")
# `best` had the network's default stages 2-4 until stage5 joined it (2026-11-30): the variants measured on top
# of that version pin them, so that their documented rows stay reproducible
B24 = {"layers": ("stage2", "stage3", "stage4")}
LN234 = "layer_norm=true+layers=stage2/stage3/stage4"  # an ensemble member: layer_norm on stages 2-4
# the plain mean of the members (pinned where a variant names its own members: they were measured with it)
EQ = {"ensemble_weights": "equal"}
VIEWS3 = ("layer_norm=true", "layer_norm=true+aggregation=3")
LN3_HP0 = "layer_norm=true+aggregation=3+grid_highpass=0"
LN3_2345 = "layer_norm=true+aggregation=3+layers=stage2/stage3/stage4/stage5"  # `best`'s normalised member, pinned
VARIANTS: dict[str, Variant] = {
    # one option at a time on top of the paper (exact search)
    "paper": ("paper", {}),
    "agg3": ("paper", {"aggregation": 3}),
    "smooth": ("paper", {"smoothing_sigma": SMOOTH}),
    "layer_norm": ("paper", {"layer_norm": True}),
    "coreset10": ("paper", {"coreset_ratio": CORESET}),
    "agg3+pca99": ("paper", {"aggregation": 3, "pca_variance": 0.99}),
    # the outer grid rings take their nearest inner cell's value (magnetic_tile's edges, issue 17)
    "border1": ("paper", {"border_cells": 1}),
    "border2": ("paper", {"border_cells": 2}),
    "border2+topk": ("paper", {"border_cells": 2, "image_score": "topk_mean", "image_score_topk": 3}),
    "v1+border2": ("paper", {**V1, "border_cells": 2}),
    "best-border0": ("best", {**B24, "border_cells": 0}),  # `best` before border_cells joined it
    "best+border3": ("best", {**B24, "border_cells": 3}),
    # v1 = paper + smoothing + coreset, and one more option (or a combination) at a time on top of it
    "v1": ("paper", V1),
    "v1-coreset": ("paper", {**V1, "coreset_ratio": 1.0}),
    "v1+agg3": ("paper", {**V1, "aggregation": 3}),
    "v1+smooth1": ("paper", {**V1, "smoothing_sigma": 1.0}),
    "v1+layer_norm": ("paper", {**V1, "layer_norm": True}),
    "v1+layers23": ("paper", {**V1, "layers": ("layer2", "layer3")}),
    "v1+pca99": ("paper", {**V1, "pca_variance": 0.99}),
    "v1+nopca": ("paper", {**V1, "pca_variance": None}),
    "v1+k3": ("paper", {**V1, "k": 3}),
    "v1+reweighted": ("paper", {**V1, "image_score": "reweighted", "image_score_topk": 9}),
    "v1+topk": ("paper", {**V1, "image_score": "topk_mean", "image_score_topk": 10}),
    "v1+res320": ("paper", {**V1, **R320}),
    "v1+tta": ("paper", {**V1, "tta": TTA}),
    "v1+bankflip": ("paper", {**V1, "train_flips": TTA}),  # flipped training images in the bank (train_flips)
    "v1+tta+bankflip": ("paper", {**V1, "tta": TTA, "train_flips": TTA}),
    "v1+ensemble": ("paper", {**V1, **ENS}),
    "v1+ln_views": ("paper", {**V1, **LNENS}),
    "v1+ens4": ("paper", {**V1, **ENS4}),
    "v1+layer_norm+ensemble": ("paper", {**V1, "layer_norm": True, **ENS}),
    "v1+res320+layer_norm": ("paper", {**V1, **R320, "layer_norm": True}),
    "v1+res320+ensemble": ("paper", {**V1, **R320, **ENS}),
    "v1+res320+ln_views": ("paper", {**V1, **R320, **LNENS}),
    "v1+effnet": ("paper", {**V1, **EFF}),
    "v1+effnet+layer_norm": ("paper", {**V1, **EFF, "layer_norm": True}),
    "v1+effnet+ln_views": ("paper", {**V1, **EFF, **LNENS}),
    "v1+effnet+ln_views+res320": ("paper", {**V1, **EFF, **R320, **LNENS}),
    # the preset itself, whatever it is now (`ensemble` members included)
    "best": ("best", {}),
    "best@stages2-4": ("best", B24),  # `best` before stage5 joined it
    # towards issue 17's pixel targets: one change at a time on top of `best` (docs/accuracy.md)
    "best-ln_main": ("best", {**B24, **LN_MAIN}),  # layer_norm as the only view (no raw member)
    "best+smooth0": ("best", {**B24, "smoothing_sigma": 0.0}),
    "best+smooth1": ("best", {**B24, "smoothing_sigma": 1.0}),
    "best-ln_main+smooth1": ("best", {**B24, **LN_MAIN, "smoothing_sigma": 1.0}),
    "best+stages23": ("best", {"layers": ("stage2", "stage3")}),  # earlier layers: finer detail
    "best+stages34": ("best", {"layers": ("stage3", "stage4")}),
    "best+stages2345": ("best", {"layers": S2345}),  # = `best` since stage5 joined it
    "best+stages34+smooth1": ("best", {"layers": ("stage3", "stage4"), "smoothing_sigma": 1.0}),
    "best+stages345": ("best", {"layers": ("stage3", "stage4", "stage5")}),  # stride 8-32
    # the two directions together: stage5 in the raw view (magnetic_tile), layer_norm on stages 2-4 (bottle)
    "best+stages2345+smooth1": ("best", {"layers": S2345, "smoothing_sigma": 1.0}),
    "best+s2345+ln234": ("best", {"layers": S2345, "ensemble": (LN234,), **EQ}),
    "best+s345+ln234": ("best", {"layers": ("stage3", "stage4", "stage5"), "ensemble": (LN234,), **EQ}),
    "best+s2345+ln234+smooth1": ("best", {"layers": S2345, "ensemble": (LN234,), **EQ, "smoothing_sigma": 1.0}),
    "best-ln_main+stages2345": ("best", {**LN_MAIN, "layers": S2345}),
    "best+agg3": ("best", {"aggregation": 3}),  # PatchCore's 3x3 neighbourhood average, on stages 2-5
    "best+coreset25": ("best", {"coreset_ratio": 0.25}),
    "best+pca99": ("best", {"pca_variance": 0.99}),  # both members keep 99 % of the variance
    "best+pca90": ("best", {"pca_variance": 0.90}),
    # 4 px cells (stage2 at its own resolution), a coreset of the same bank size
    "best+grid80": ("best", {"grid_size": 80, "coreset_ratio": 0.025}),
    # the raw view on early layers only (small, dark defects), the normalised 3x3 view on all four stages
    "best@raw23": ("best", {"layers": ("stage2", "stage3"), "ensemble": (LN3_2345,), **EQ}),
    "best@raw234": ("best", {"layers": ("stage2", "stage3", "stage4"), "ensemble": (LN3_2345,), **EQ}),
    # the normalised view over 5x5 neighbourhoods instead of 3x3
    "best+lnagg5": ("best", {"ensemble": ("layer_norm=true+aggregation=5",), **EQ}),
    # the normalised member averages each 3x3 neighbourhood (PatchCore's aggregation), the raw one does not:
    # = `best` since that member joined it; `best@ln-cells` is `best` before (the normalised view on single cells)
    # the raw member by its local contrast (grid_highpass: its z-scored grid minus a Gaussian blur of
    # 1.5 / 2 cells, negative parts 0), the normalised 3x3 member as it is
    "best+hp15": ("best", {"grid_highpass": 1.5, "ensemble": (LN3_HP0,), **EQ}),
    "best+hp2": ("best", {"grid_highpass": 2.0, "ensemble": (LN3_HP0,), **EQ}),
    # `best`'s two members and the raw one again by its local contrast (1.5 cells), weighed per product
    # (ensemble_weights="auto"): does the calibration's held-out ranking follow the real one? (1, 1, 0) is
    # `best`, (0, 1, 1) `best+hp15`; the row keeps the held-out table (member_weights)
    "best+hpauto": ("best", {"ensemble": (LN3_HP0, "grid_highpass=1.5"), "ensemble_weights": "auto"}),
    # flipped training images in the bank too (train_flips), the coreset share cut so the bank keeps
    # `best`'s size (and speed): magnetic_tile's tiles lie either way round
    "best+flips": ("best", {"train_flips": ("hflip", "vflip", "rot180"), "coreset_ratio": CORESET / 4}),
    "best+lnagg3": ("best", {"ensemble": ("layer_norm=true+aggregation=3",), **EQ}),
    "best@ln-cells": ("best", {"ensemble": ("layer_norm=true",), **EQ}),
    # three views (raw cells, normalised cells, normalised 3x3 averages): their mean, and weighed per product at
    # fit from the calibration's held-out synthetic defects (ensemble_weights="auto"; measured, not adopted)
    "best+views3": ("best", {"ensemble": VIEWS3, **EQ}),
    "best+views3auto": ("best", {"ensemble": VIEWS3, "ensemble_weights": "auto"}),
    # the map's outline from the image: a guided filter (radius in grid cells) instead of the map's smoothing
    # (the image score keeps it); `best` has 1.5 cells since 2026-12-02, `best@unguided` is `best` before
    "best@unguided": ("best", {"guided_filter": 0.0}),
    "best+guided1": ("best", {"guided_filter": 1.0}),
    "best+guided2": ("best", {"guided_filter": 2.0}),
    "best-ln_main+stages2345+smooth1": ("best", {**LN_MAIN, "layers": S2345, "smoothing_sigma": 1.0}),
    "best-ln_main+stages23": ("best", {**LN_MAIN, "layers": ("stage2", "stage3")}),
    "best-raw": ("best", {**B24, "ensemble": (), **EQ}),  # the raw view alone (no layer_norm member)
    # + early raw layers
    "best+raw23": ("best", {**B24, "ensemble": ("layer_norm=true", "layers=stage2/stage3"), **EQ}),
    "best+ln23": ("best", {**B24, "ensemble": ("layer_norm=true", "layer_norm=true+layers=stage2/stage3"), **EQ}),
    "best+topk3": ("best", {**B24, "image_score": "topk_mean", "image_score_topk": 3}),
    "best+res384": ("best", {**B24, **R384}),
    "best+res448": ("best", {**B24, **R448}),
    "best-ln_main+res384": ("best", {**B24, **LN_MAIN, **R384}),
    "best-ln_main+res448": ("best", {**B24, **LN_MAIN, **R448}),
    "best+resnet": ("best", {**B24, "ensemble": ("layer_norm=true", "backbone=resnet50-keras"), **EQ}),
    # `best` now (stages 2-5, the normalised 3x3 member) with the paper's network as a third member
    "best+resnet3": ("best", {"ensemble": ("layer_norm=true+aggregation=3", "backbone=resnet50-keras"), **EQ}),
}


def variant_config(name: str, **extra_overrides: Any) -> PatchKNNConfig:
    base, overrides = VARIANTS[name]
    return preset(base, **{**overrides, **extra_overrides})


def cli_flags(name: str) -> str:
    """The ``patchknn evaluate`` flags of a variant (what a user would type)."""
    base, overrides = VARIANTS[name]
    parts = [f"--preset {base}"]
    for key, value in overrides.items():
        if isinstance(value, tuple):
            value = ",".join(value)
        parts.append(f"--set {key}={value}")
    return " ".join(parts)


# ------------------------------------------------------------------------------ feature cache
class CachedBackbone(nn.Module):
    """Wraps a real backbone; maps of already-seen input images are read from disk (float16)."""

    def __init__(self, real: nn.Module, layers: Sequence[str], folder: Path, stats: dict[str, float],
                 uncached: Callable[[], nn.Module]):
        super().__init__()
        self.real = real
        self.uncached = uncached  # the plain backbone with exactly the asked layers (speed runs)
        self.layers = tuple(layers)
        self.layer_info = real.layer_info
        self.weights_id = real.weights_id
        self.folder = folder
        self.stats = stats
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, img: torch.Tensor) -> Path:
        key = hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest()
        return self.folder / f"{key}.pt"

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.cpu()
        paths = [self._path(img) for img in images]
        missing = [i for i, p in enumerate(paths) if not p.exists()]
        if missing:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.real(images[missing])
            self.stats["backbone_seconds"] += time.perf_counter() - t0
            self.stats["backbone_images"] += len(missing)
            for j, i in enumerate(missing):
                torch.save({k: v[j].half().clone() for k, v in out.items()}, paths[i])
        maps = [torch.load(p, weights_only=True) for p in paths]
        return {name: torch.stack([m[name] for m in maps]).float() for name in self.layers}


def install_cache(cache_dir: Path, stats: dict[str, float]) -> Callable[..., Any]:
    """Make ``PatchKNN`` build cached backbones (all default layers computed, the asked ones returned)."""
    real_build = build_backbone

    def cached_build(name: str, layers: Sequence[str] | None = None, weights: Any = None) -> nn.Module:
        real = real_build(name, None, weights)  # every default layer, so one cache serves all subsets
        wanted = tuple(layers or real.layers)
        folder = cache_dir / f"{name}"
        beyond = tuple(n for n in wanted if n not in real.layers)  # e.g. EfficientNet's stage5
        if beyond:  # defaults + those, in a cache of their own
            real = real_build(name, tuple(real.layers) + beyond, weights)
            folder = cache_dir / f"{name}+{'+'.join(beyond)}"
        return CachedBackbone(real, wanted, folder, stats, lambda: real_build(name, wanted, weights))

    model_mod.build_backbone = cached_build
    return real_build


# ----------------------------------------------------------------------------------- running
def run_variant(
    root: Path, category: str, name: str, cache_dir: Path, speed_images: int, cache_key: str, train_stride: int = 1
) -> dict[str, Any]:
    config = variant_config(name, threshold_method="none")  # no metric depends on it
    stats = {"backbone_seconds": 0.0, "backbone_images": 0}
    real_build = install_cache(cache_dir / cache_key / f"s{config.image_size}", stats)
    try:
        dataset = MVTecCategory(root, category)
        dataset.validate()
        train: list[Any] = [str(p) for p in dataset.train_paths()[::train_stride]]
        samples = dataset.test_samples()
        runtime = {"progress": False, "batch_size": 16}
        model: Any = model_mod.PatchKNN.from_config(config, **runtime)  # an ensemble when config.ensemble
        t0 = time.perf_counter()
        model.fit(train)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        preds = model.predict([str(s.path) for s in samples])
        predict_s = time.perf_counter() - t1
    finally:
        model_mod.build_backbone = real_build
    maps = np.stack([p.anomaly_map for p in preds])
    masks = np.stack([_mask_for(s, m.shape, "input", config.image_size) for s, m in zip(samples, maps)])
    scores = np.array([p.score for p in preds], dtype=np.float64)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    row: dict[str, Any] = dict(metrics.compute_all(maps, masks, scores, labels))
    # each defect type against the good images: a worst case over kinds of defect
    types = np.array([s.defect for s in samples])
    row["per_type_pixel_auprc"] = {
        t: round(float(metrics.pixel_auprc(maps[sel], masks[sel])), 4)
        for t in sorted(set(types[labels == 1].tolist()))
        for sel in [(types == t) | (labels == 0)]
    }
    # end-to-end speed with the real backbone(s) put back, in the memory layout PatchKNN gives its
    # own backbone (channels-last: a new module is in the default layout, about a third slower)
    for member in getattr(model, "members", [model]):
        ext = member.extractor
        if isinstance(ext.backbone, CachedBackbone):
            ext.backbone = ext.backbone.uncached().to(memory_format=torch.channels_last)
        elif isinstance(getattr(ext.backbone, "inner", None), CachedBackbone):  # shared by members
            ext.backbone.inner = ext.backbone.inner.uncached().to(memory_format=torch.channels_last)
    speed_paths = [str(s.path) for s in samples[:speed_images]]
    model.predict(speed_paths[:1])  # untimed: the new module's first call (oneDNN set-up)
    t2 = time.perf_counter()
    model.predict(speed_paths)
    speed_s = time.perf_counter() - t2
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    row |= {
        "variant": name,
        "dataset": category if cache_key == "mvtec" else f"{cache_key}:{category}",
        "flags": cli_flags(name),
        "config": {k: v for k, v in config.to_dict().items() if v != getattr(PatchKNNConfig, k, None)},
        "images_per_second": round(len(speed_paths) / speed_s, 3),
        "load_average": load,
        "fit_seconds_cached": round(fit_s, 2),
        "predict_seconds_cached": round(predict_s, 2),
        "bank_size": int(getattr(model, "fit_info_", {}).get("bank_size", 0)),
        "n_components": int(getattr(model, "fit_info_", {}).get("n_components", 0)),
        "member_weights": getattr(model, "fit_info_", {}).get("calibration", {}).get("member_weights"),
    }
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per (dataset, variant) row."""
    head = (
        "| dataset | variant | pixel AUPRC | AUPRO@0.3 | image AUROC | pixel AUROC | images/s* | flags |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['variant']} | {r['pixel_auprc']:.3f} | {r['aupro']:.3f} | "
            f"{r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['images_per_second']:.2f} | "
            f"`{r['flags']}` |"
        )
    return "\n".join(lines)


def combined_markdown(real: list[dict[str, Any]], synthetic: list[dict[str, Any]]) -> str:
    """One line per variant: real-data metrics, synthetic AUPRC, and the worst change against the paper
    over every defect kind of both sources (the rule of docs/accuracy.md)."""
    syn = {r["variant"]: r for r in synthetic}
    paper_r = next(r for r in real if r["variant"] == "paper")
    paper_s = syn.get("paper")
    head = (
        "| variant | bottle pixel AUPRC | bottle AUPRO | bottle image AUROC | synthetic pixel AUPRC | "
        "worst defect kind vs paper | images/s* | `patchknn evaluate` flags |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in real:
        s = syn.get(r["variant"])
        deltas = [v - paper_r["per_type_pixel_auprc"][k] for k, v in r.get("per_type_pixel_auprc", {}).items()]
        if s is not None and paper_s is not None:
            deltas += [v - paper_s["per_type_pixel_auprc"][k] for k, v in s.get("per_type_pixel_auprc", {}).items()]
        worst = f"{min(deltas):+.3f}" if deltas and r["variant"] != "paper" else "–"
        lines.append(
            f"| {r['variant']} | {r['pixel_auprc']:.3f} | {r['aupro']:.3f} | {r['image_auroc']:.3f} | "
            f"{s['pixel_auprc']:.3f} | {worst} | {r['images_per_second']:.1f} | `{r['flags']}` |"
            if s is not None
            else f"| {r['variant']} | {r['pixel_auprc']:.3f} | {r['aupro']:.3f} | {r['image_auroc']:.3f} | – | "
            f"{worst} | {r['images_per_second']:.1f} | `{r['flags']}` |"
        )
    return "\n".join(lines)


def per_type_markdown(real: list[dict[str, Any]], synthetic: list[dict[str, Any]], variants: Sequence[str]) -> str:
    """Pixel AUPRC of each defect kind (against the good images) for some variants."""
    rows = {("real", r["variant"]): r for r in real} | {("syn", r["variant"]): r for r in synthetic}
    kinds = [("real", k) for k in real[0]["per_type_pixel_auprc"]] + [
        ("syn", k) for k in (synthetic[0]["per_type_pixel_auprc"] if synthetic else {})
    ]
    head = "| variant | " + " | ".join(f"{k} ({src})" for src, k in kinds) + " |\n|---|" + "---|" * len(kinds)
    lines = [head]
    for v in variants:
        cells = []
        for src, k in kinds:
            r = rows.get((src, v))
            cells.append("–" if r is None else f"{r['per_type_pixel_auprc'][k]:.3f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=os.environ.get("PATCHKNN_MVTEC_ROOT"))
    ap.add_argument("--category", default="bottle", help="one or more, comma-separated (bottle,magnetic_tile)")
    ap.add_argument("--mtd-root", type=Path, default=os.environ.get("PATCHKNN_MTD_ROOT"),
                    help="the folder holding magnetic_tile/ (used for that category)")
    ap.add_argument("--train-stride", type=int, default=1, help="use every N-th training image (big categories)")
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic generator's data instead")
    ap.add_argument("--variants", default="paper")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "patchknn-ablation")
    ap.add_argument("--out", type=Path, default=Path("ablation.jsonl"))
    ap.add_argument("--speed-images", type=int, default=8)
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch/faiss threads; 1 is much faster than 2 on an oversubscribed machine",
    )
    ap.add_argument(
        "--table", type=Path, nargs="+",
        help="print the markdown table of a results file (or of REAL SYNTHETIC result files, combined) and exit",
    )
    ap.add_argument("--per-type", help="with two --table files: also a per-defect-kind table of these variants")
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name in VARIANTS:
            print(f"{name:14s} {cli_flags(name)}")
        return 0
    if args.table:
        tables = [[json.loads(line) for line in t.read_text().splitlines() if line.strip()] for t in args.table]
        if len(tables) == 1:
            print(markdown(tables[0]))
        else:
            print(combined_markdown(tables[0], tables[1]))
            if args.per_type:
                print()
                print(per_type_markdown(tables[0], tables[1], args.per_type.split(",")))
        return 0
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; --list shows them")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        from patchknn.synthetic import make_synthetic_dataset

        root = args.cache_dir / "synthetic-data"
        if not (root / "synthetic").is_dir():
            make_synthetic_dataset(root, "synthetic", n_train=60, n_test_good=20, n_test_defective=40, seed=1)
        sources = [(root, "synthetic", "synthetic")]
    else:  # bottle and magnetic_tile together: each from its own root
        sources = []
        for category in [c.strip() for c in args.category.split(",") if c.strip()]:
            root = args.mtd_root if category == "magnetic_tile" else args.data_root
            if root is None:
                ap.error(f"no data root for {category}: --data-root / --mtd-root (or PATCHKNN_MVTEC_ROOT / _MTD_ROOT)")
            sources.append((Path(root), category, "mtd" if category == "magnetic_tile" else "mvtec"))
    for root, category, cache_key in sources:
        for name in args.variants.split(","):
            row = run_variant(root, category, name, args.cache_dir, args.speed_images, f"{cache_key}-{category}",
                              args.train_stride)
            row["train_stride"] = args.train_stride
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(
                f"{row['dataset']:10s} {name:14s} AUPRC {row['pixel_auprc']:.3f}  AUPRO {row['aupro']:.3f}  "
                f"imgAUROC {row['image_auroc']:.3f}  {row['images_per_second']:.2f} img/s  "
                f"(bank {row['bank_size']}x{row['n_components']}, predict {row['predict_seconds_cached']} s cached, "
                f"load {row['load_average']})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
