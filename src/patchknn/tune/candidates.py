"""The configurations ``patchknn tune`` tries: every named preset plus a small grid around the
paper's method and around ``best``, grouped so that candidates that need the same backbone pass
are fitted together, and ordered cheap-first.

Grid (each line one candidate; ``fixed`` options given by the user apply to all of them):

* around ``paper`` (ResNet-50 at 224 px, grid 28): per-layer L2 normalisation, map smoothing of
  0.5 and 1 grid cell, the top-k-mean image score, layers 2-3 only, the paper at 320 px / grid 40
  (resolution), and the grid's outer ring filled from inside (``border_cells=1``, where the
  option exists);
* ``paper`` + a ``layer_norm=true`` ensemble member (the two views of one backbone);
* around ``best`` (EfficientNet-Lite2 at 320 px / grid 40): its single members without the
  ensemble (raw and per-layer normalised), smoothing 1 cell, the ensemble without smoothing, and
  the layers with and without the deeper stage5 (stride 32, magnetic_tile's lever,
  docs/accuracy.md): the single raw view on stages 3-5, the normalised view alone on stages 2-4
  (bottle's best measured) and the ensemble on stages 2-4 and on stages 2-5 (a repeat of an
  earlier candidate, such as ``best`` itself, is left out);
* ``best`` with three views (raw, normalised, normalised 3x3) weighed per product at its own fit
  (``ensemble_weights="auto"``, :mod:`patchknn.member_weights`): the weights are chosen inside the
  candidate's fit from its own held-out images, so ``tune`` scores the weighed ensemble as a user
  would get it.

A candidate's *fit key* is its configuration without the options that act only after the search
(smoothing, the guided map, image score, threshold): candidates with the same fit key share one fitted model.
A *group* is the candidates on one backbone, image size, grid and ``train_flips`` without ensemble members: they
are fitted together (one decoding and one backbone pass per batch, :mod:`patchknn.tune.group`).
The baseline (the first candidate, ``paper``) and its post-search variants are a group of their
own, tried first, so that even a tiny budget returns a sound choice quickly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from patchknn.config import PatchKNNConfig
from patchknn.presets import PRESETS, preset

__all__ = ["POST_FIELDS", "Candidate", "CandidateGroup", "default_candidates", "fit_key", "plan_groups"]

#: options that act after the search: candidates differing only in these share a fitted model
POST_FIELDS = ("smoothing_sigma", "guided_filter", "guided_eps", "image_score", "image_score_topk", "border_cells",
               "threshold_method", "threshold_quantile", "threshold_sigma")
_OPTIONS = {f.name for f in dataclasses.fields(PatchKNNConfig)}
#: relative backbone cost per image at 224 px (measured: docs/speed.md and docs/accuracy.md)
_BACKBONE_COST = {"efficientnet-lite2": 0.7}


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: a name for the table and the configuration."""

    name: str
    config: PatchKNNConfig

    @property
    def cost(self) -> float:
        """Relative cost of fitting and scoring it (1 = the paper): backbone pixels, members."""
        c = self.config
        per_pass = _BACKBONE_COST.get(c.backbone, 1.0) * (c.image_size / 224) ** 2
        passes = len({(m.backbone, m.resolved_layers) for m in c.ensemble_members()}) if c.ensemble else 1
        return round(per_pass * passes * c.grids_per_image + 0.25 * len(c.ensemble), 3)


@dataclass
class CandidateGroup:
    """Candidates fitted together. ``members`` are the distinct fit keys (one fitted model each);
    ``variants[i]`` the candidates scored from member ``i``'s model. A group of one ensemble
    candidate has ``ensemble=True`` and is fitted as that ensemble."""

    members: list[PatchKNNConfig]
    variants: list[list[Candidate]]
    ensemble: bool = False

    @property
    def candidates(self) -> list[Candidate]:
        return [c for vs in self.variants for c in vs]

    @property
    def cost(self) -> float:
        first = self.variants[0][0]
        return round(first.cost + 0.25 * (len(self.members) - 1), 3)


def fit_key(config: PatchKNNConfig) -> str:
    """The configuration without :data:`POST_FIELDS`, as text."""
    d = {k: v for k, v in config.to_dict().items() if k not in POST_FIELDS}
    return json.dumps(d, sort_keys=True, default=str)


def default_candidates(fixed: dict[str, Any] | None = None) -> list[Candidate]:
    """The presets and the grid (see the module docstring), ``fixed`` applied to each, repeats
    removed (the first name is kept). A grid point that ``fixed`` makes invalid is left out."""
    fixed = dict(fixed or {})
    paper = {}
    best = dict(PRESETS.get("best", {}))
    specs: list[tuple[str, dict[str, Any]]] = [(name, dict(values)) for name, values in PRESETS.items()]
    specs += [
        ("paper+layer_norm", {**paper, "layer_norm": True}),
        ("paper+smooth0.5", {**paper, "smoothing_sigma": 0.5}),
        ("paper+smooth1", {**paper, "smoothing_sigma": 1.0}),
        ("paper+topk_mean", {**paper, "image_score": "topk_mean"}),
        ("paper+layers2-3", {**paper, "layers": ("layer2", "layer3")}),
        ("paper@320", {**paper, "image_size": 320, "grid_size": 40}),
        ("paper+ens(layer_norm)", {**paper, "ensemble": ("layer_norm=true",)}),
    ]
    if "border_cells" in _OPTIONS:  # the grid's outer ring takes its inner neighbour's value
        specs.append(("paper+border1", {**paper, "border_cells": 1}))
    if best:
        single = {k: v for k, v in best.items() if k not in ("ensemble", "ensemble_weights")}
        specs += [
            ("best-single", single),
            ("best-single+layer_norm", {**single, "layer_norm": True}),
            ("best-single+smooth1", {**single, "smoothing_sigma": 1.0}),
            ("best+smooth0", {**best, "smoothing_sigma": 0.0}),
        ]
        if best.get("backbone") == "efficientnet-lite2":  # with and without stage5 (stride 32)
            s24, s25 = ("stage2", "stage3", "stage4"), ("stage2", "stage3", "stage4", "stage5")
            specs += [
                ("best-single+stages3-5", {**single, "layers": ("stage3", "stage4", "stage5")}),
                ("best-single+layer_norm+stages2-4", {**single, "layer_norm": True, "layers": s24}),
                ("best+stages2-4", {**best, "layers": s24}),
                ("best+stages2-5", {**best, "layers": s25}),
            ]  # one equal to an earlier candidate (e.g. `best` itself) is a repeat, left out
        views3 = ("layer_norm=true", "layer_norm=true+aggregation=3")
        specs.append(("best+3views+auto", {**best, "ensemble": views3, "ensemble_weights": "auto"}))
    out: list[Candidate] = []
    seen: set[str] = set()
    for name, values in specs:
        try:
            config = preset("paper", **{**values, **fixed})
        except Exception:  # noqa: BLE001 - a grid point the fixed options rule out (e.g. layers of another net)
            if name == "paper":
                raise
            continue
        key = json.dumps(config.to_dict(), sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(Candidate(name, config))
    return out


def plan_groups(candidates: list[Candidate]) -> list[CandidateGroup]:
    """Group ``candidates`` for fitting (see the module docstring) and order the groups
    cheap-first. The first candidate (the baseline, ``paper``) and those that share its fitted
    model come first, alone: a budget that allows one group still compares the baseline's
    variants, quickly; its other members on the same network form a group of their own."""
    base = candidates[0]
    groups: dict[tuple[Any, ...], CandidateGroup] = {}
    for cand in candidates:
        c = cand.config
        if c.ensemble:
            groups[("ensemble", cand.name)] = CandidateGroup([c], [[cand]], ensemble=True)
            continue
        baseline = not base.config.ensemble and fit_key(c) == fit_key(base.config)
        # one group shares its batches, flipped copies included (train_flips is an ensemble-wide option)
        gkey = ("baseline",) if baseline else (c.backbone, c.image_size, c.grid_size, c.train_flips)
        group = groups.setdefault(gkey, CandidateGroup([], []))
        keys = [fit_key(m) for m in group.members]
        if fit_key(c) in keys:
            group.variants[keys.index(fit_key(c))].append(cand)
        else:
            group.members.append(c)
            group.variants.append([cand])
    ordered = list(groups.values())
    first = next(g for g in ordered if base in g.candidates)
    rest = sorted((g for g in ordered if g is not first), key=lambda g: g.cost)
    return [first, *rest]
