"""Fit a :class:`~patchknn.tune.candidates.CandidateGroup` once and score all its candidates.

The members of a group (the distinct fit keys on one backbone, image size and grid) are fitted as
the members of an :class:`~patchknn.ensemble.EnsemblePatchKNN`: each batch is decoded once and
every distinct network runs once on it; each member keeps its own PCA, memory bank and held-out
calibration grids. A candidate that differs from its member only in smoothing, image score or
threshold options is scored from the member's grids (no search of its own), and its threshold is
calibrated from the member's held-out grids exactly as :func:`patchknn.threshold.calibrate` would
(the same images, folds and image score; the ensemble calibrates on the same grids).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchknn import scoring
from patchknn.config import ENSEMBLE_SHARED, PatchKNNConfig
from patchknn.ensemble import EnsemblePatchKNN
from patchknn.model import PatchKNN
from patchknn.threshold import threshold_for
from patchknn.tune.candidates import Candidate, CandidateGroup

__all__ = ["GroupModels", "Scored", "fit_group", "score_group"]


class HeldOutMember(PatchKNN):
    """A :class:`PatchKNN` that keeps the held-out grids of its calibration images after fitting
    (``held_out_grids``), so that candidates sharing its model calibrate their own thresholds."""

    held_out_grids: np.ndarray | None = None

    def fit_store(self, store: Any, t0: float, *, keep_held_out: bool = False, **_: Any) -> HeldOutMember:
        # no synthetic defects for the candidates' thresholds (the evaluation set has its own):
        # a "defects" candidate is ranked by its upper bound, the quantile rule (threshold_for)
        super().fit_store(store, t0, keep_held_out=True)
        held = self.__dict__.get("held_out_")
        self.held_out_grids = None if held is None else held[1]
        if not keep_held_out:
            self.__dict__.pop("held_out_", None)
        return self


class GroupModels(EnsemblePatchKNN):
    """The members of a group fitted together (an ensemble whose members are
    :class:`HeldOutMember` models; its own combined score is not used)."""

    def __init__(self, configs: Sequence[PatchKNNConfig], **runtime: Any) -> None:
        options = [{k: v for k, v in c.as_kwargs().items() if k not in ENSEMBLE_SHARED} for c in configs]
        super().__init__(options, configs[0], **runtime)
        self.members = [
            HeldOutMember.from_config(c.replace(threshold_method="none"), weights=m.weights, **self.runtime)
            for c, m in zip(configs, self.members)
        ]


@dataclass
class Scored:
    """One candidate's answers on an evaluation set.

    Attributes:
        candidate: the candidate.
        maps: ``(N, S, S)`` float32 anomaly maps at the candidate's ``image_size``.
        scores: ``(N,)`` image scores.
        threshold: the threshold calibrated on the training images (``None``: none).
        seconds: this candidate's share of the group's fitting and scoring time.
    """

    candidate: Candidate
    maps: np.ndarray
    scores: np.ndarray
    threshold: float | None
    seconds: float


def fit_group(group: CandidateGroup, sources: Sequence[Any], runtime: dict[str, Any]) -> list[PatchKNN]:
    """The fitted models of ``group``: one per member (an ensemble group: the ensemble itself)."""
    if group.ensemble:
        return [PatchKNN.from_config(group.members[0], **runtime).fit(sources)]
    if len(group.members) == 1:
        config = group.members[0].replace(threshold_method="none")
        return [HeldOutMember.from_config(config, **runtime).fit(sources)]
    models = GroupModels(group.members, **runtime)
    models.fit(sources)
    return list(models.members)


def _threshold(model: PatchKNN, config: PatchKNNConfig) -> float | None:
    """``config``'s threshold from ``model``'s held-out calibration grids (or the model's own)."""
    grids = getattr(model, "held_out_grids", None)
    if grids is None:
        return model.threshold_
    if config.threshold_method == "none" or len(grids) == 0:
        return None
    scores = np.array([scoring.image_score(g, config) for g in grids])
    return threshold_for(config, scores)[0]


def score_group(
    group: CandidateGroup, models: list[PatchKNN], images: Sequence[Any], fit_seconds: float = 0.0
) -> list[Scored]:
    """Score ``images`` with every candidate of ``group`` (one decoding pass; members on the same
    network share its pass, as in the ensemble's own scoring)."""
    t0 = time.perf_counter()
    lead = models[0]
    maps: dict[int, list[np.ndarray]] = {id(c): [] for c in group.candidates}
    scores: dict[int, list[float]] = {id(c): [] for c in group.candidates}
    thresholds = {id(c): _threshold(m, c.config) for m, vs in zip(models, group.variants) for c in vs}
    for batch in lead.batches(list(images)):
        batch_images = batch.images.to(lead.device)
        for model, variants in zip(models, group.variants):
            grids, weights = model.score_batch(batch_images)
            for cand in variants:
                for pred in scoring.predictions(grids, weights, cand.config, guides=batch.images.cpu().numpy()):
                    if pred.error is not None:
                        raise ValueError(f"{cand.name}: {pred.error}")
                    maps[id(cand)].append(pred.anomaly_map)  # type: ignore[arg-type]
                    scores[id(cand)].append(float(pred.score))  # type: ignore[arg-type]
    share = (fit_seconds + time.perf_counter() - t0) / max(1, len(group.candidates))
    return [
        Scored(c, np.stack(maps[id(c)]), np.array(scores[id(c)]), thresholds[id(c)], round(share, 3))
        for c in group.candidates
    ]
