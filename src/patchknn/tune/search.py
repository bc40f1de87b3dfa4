"""Choose a product's configuration from its normal images only (``patchknn tune``).

1. A seeded share of the normal images is held out (``holdout``, at most ``max_heldout``); the
   candidates are fitted on the others.
2. Each held-out image gets ``defects_per_image`` synthetic defects (:mod:`patchknn.defects`:
   cut-paste of the product's own patches, scratches, colour and texture changes, missing parts,
   large blobs: :data:`~patchknn.defects.TUNE_KINDS`), each with its pixel mask. The evaluation
   set is the held-out normal images plus these.
3. The candidates (:func:`~patchknn.tune.candidates.default_candidates`: the presets and a bounded
   grid) are fitted group by group, cheap-first (:func:`~patchknn.tune.candidates.plan_groups`),
   and every candidate scores the evaluation set. A candidate's threshold is calibrated on its
   training images only, as a fitted model's would be.
4. Objective (:data:`~patchknn.tune.result.OBJECTIVE`): ``0.5 pixel AUPRC + 0.25 image AUROC +
   0.25 F1 at the calibrated threshold``. Pixel AUPRC on the synthetic masks is the paper's
   measure and the one that separates configurations most (image AUROC on synthetic defects is
   often near 1 for all); image AUROC keeps the ranking of whole images honest; the F1 of the
   calibrated verdict (held-out normal vs defective) makes the choice one whose OK/NG decision
   works without labels, not only one whose maps rank well. Ties go to the cheaper candidate.
5. The budget (minutes) is checked before each group: once it is spent no new group starts (the
   first group, the baseline, always runs), and the best candidate so far is returned. The time
   used can exceed the budget by at most the group running when it ran out.

Everything is seeded (``seed``): the split, the defects and the configurations' own seeds, so the
same images, seed and budget give the same table (unless the budget cuts at another group on a
slower machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patchknn import metrics
from patchknn.config import PatchKNNConfig
from patchknn.data import DEFAULT_MAX_PIXELS, as_sources, load_image, resize_mask
from patchknn.defects import TUNE_KINDS, defect_set
from patchknn.errors import ConfigError, PatchKNNError
from patchknn.metrics.decision import threshold_metrics
from patchknn.tune.candidates import Candidate, CandidateGroup, default_candidates, plan_groups
from patchknn.tune.group import Scored, fit_group, score_group
from patchknn.tune.result import CandidateRow, TuneResult, objective

__all__ = ["EvaluationSet", "candidate_row", "choose", "split_images", "tune"]


class EvaluationSet:
    """Images with labels and pixel masks, at their own size; masks resized per image size."""

    def __init__(self, images: list[Any], masks: list[np.ndarray], labels: np.ndarray) -> None:
        self.images, self.masks, self.labels = images, masks, labels
        self._resized: dict[int, np.ndarray] = {}

    def masks_at(self, size: int) -> np.ndarray:
        if size not in self._resized:
            self._resized[size] = np.stack([resize_mask(m, (size, size)) for m in self.masks])
        return self._resized[size]


def split_images(sources: Sequence[Any], holdout: float, max_heldout: int, seed: int) -> tuple[list[Any], list[Any]]:
    """``(fit, heldout)``: a seeded share ``holdout`` of ``sources`` (at least 2, at most
    ``max_heldout``) held out, the rest kept for fitting in their order."""
    n = len(sources)
    n_held = int(np.clip(round(holdout * n), 2, max_heldout))
    if n - n_held < 2:
        raise ConfigError(f"tune needs at least {n_held + 2} normal images ({n_held} held out, 2 to fit), got {n}")
    held = set(np.random.default_rng(seed).choice(n, size=n_held, replace=False).tolist())
    return [s for i, s in enumerate(sources) if i not in held], [s for i, s in enumerate(sources) if i in held]


def candidate_row(scored: Scored, evalset: EvaluationSet) -> CandidateRow:
    """The metrics of one candidate's answers on ``evalset``."""
    cand = scored.candidate
    masks = evalset.masks_at(cand.config.image_size)
    got = metrics.compute_all(scored.maps, masks, scored.scores, evalset.labels)
    decision = threshold_metrics(None, None, scored.scores, evalset.labels, scored.threshold)
    row = CandidateRow(
        cand.name, cand.config.to_dict(), "scored", got["pixel_auprc"], got["image_auroc"],
        decision["threshold_image_f1"], decision["threshold_image_precision"], decision["threshold_image_recall"],
        cost=cand.cost, seconds=scored.seconds,
    )
    row.objective = objective(row.pixel_auprc, row.image_auroc, row.threshold_f1)
    return row


def choose(rows: Sequence[CandidateRow]) -> CandidateRow:
    """The scored row with the highest objective; among equal ones, the cheapest, then the first."""
    scored = [r for r in rows if r.status == "scored" and r.objective is not None]
    if not scored:
        raise PatchKNNError("tune: no candidate was scored")
    return min(scored, key=lambda r: (-(r.objective or 0.0), r.cost))


def tune(
    images: Sequence[Any] | str | Path,
    *,
    budget_minutes: float = 10.0,
    seed: int = 0,
    holdout: float = 0.2,
    max_heldout: int = 16,
    defects_per_image: int = 2,
    max_fit_images: int | None = None,
    candidates: Sequence[Candidate] | None = None,
    fixed: dict[str, Any] | None = None,
    on_group: Callable[[list[CandidateRow]], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    **runtime: Any,
) -> TuneResult:
    """Choose a configuration for the product of ``images`` (normal images only).

    Args:
        images: the normal training images (paths, a folder, arrays).
        budget_minutes: no new group of candidates starts after this many minutes.
        seed: seeds the split, the defects and every candidate's ``seed``.
        holdout, max_heldout: share of the images held out, and its cap.
        defects_per_image: synthetic defective versions of each held-out image.
        max_fit_images: fit the candidates on at most this many images (a seeded subsample;
            ``None`` = all the others). A ranking, not a final model: the choice is fitted on all.
        candidates: the configurations to try (default :func:`default_candidates` with ``fixed``).
        fixed: options applied to every default candidate (e.g. ``{"device": ...}`` is not one;
            ``{"k": 3}`` is).
        on_group: called with the rows of each group as it finishes (progress).
        clock: the time source (seconds; tests pass a fake one).
        **runtime: keyword-only :class:`~patchknn.PatchKNN` options (weights, device, batch_size,
            ...). A weights *file* applies to the candidates on the first candidate's backbone.
    """
    t0 = clock()
    if budget_minutes <= 0:
        raise ConfigError(f"--budget must be a positive number of minutes, got {budget_minutes}")
    sources = as_sources(images)
    fit, held = split_images(sources, holdout, max_heldout, seed)
    if max_fit_images is not None and len(fit) > max_fit_images:
        keep = np.sort(np.random.default_rng(seed + 1).choice(len(fit), size=max_fit_images, replace=False))
        fit = [fit[i] for i in keep]
    normal = [load_image(s, max_pixels=runtime.get("max_pixels", DEFAULT_MAX_PIXELS)) for s in held]
    defects = defect_set(normal, defects_per_image, seed=seed, kinds=TUNE_KINDS)
    evalset = EvaluationSet(
        [*normal, *(d.image for d in defects)],
        [np.zeros(img.shape[:2], dtype=bool) for img in normal] + [d.mask for d in defects],
        np.array([0] * len(normal) + [1] * len(defects)),
    )
    cands = list(candidates) if candidates is not None else default_candidates({"seed": seed, **(fixed or {})})
    if not cands:
        raise ConfigError("tune needs at least one candidate configuration")
    groups = plan_groups(cands)
    rows: list[CandidateRow] = []
    budget = budget_minutes * 60.0
    for gi, group in enumerate(groups):
        if gi > 0 and clock() - t0 >= budget:
            rows += [_skipped(c, "budget spent") for g in groups[gi:] for c in g.candidates]
            break
        done = _run_group(group, fit, evalset, _runtime_for(group, cands[0].config, runtime))
        rows += done
        if on_group is not None:
            on_group(done)
    scored = [r for r in rows if r.status == "scored"]
    if not scored:
        raise PatchKNNError("tune: no candidate could be scored: " + "; ".join(f"{r.name}: {r.note}" for r in rows))
    best = choose(scored)
    baseline = scored[0]
    reason = (
        f"highest objective {best.objective:.4f} (pixel AUPRC {_f(best.pixel_auprc)}, image AUROC "
        f"{_f(best.image_auroc)}, calibrated F1 {_f(best.threshold_f1)}) of {len(scored)} scored candidates"
    )
    if best is not baseline:
        reason += f"; {baseline.name} had {baseline.objective:.4f}"
    if len(scored) < len(rows):
        why = sorted({r.note for r in rows if r.note and r.status != "scored"})
        reason += f"; {len(rows) - len(scored)} not scored ({', '.join(why)})"
    return TuneResult(
        rows=rows, choice=best.name, reason=reason, seconds=round(clock() - t0, 1), budget_minutes=budget_minutes,
        seed=seed, n_fit=len(fit), n_heldout=len(normal), n_defective=len(defects),
        defect_kinds=sorted({d.kind for d in defects}, key=TUNE_KINDS.index),
    )


def _run_group(
    group: CandidateGroup, fit: list[Any], evalset: EvaluationSet, runtime: dict[str, Any]
) -> list[CandidateRow]:
    t = time.perf_counter()
    try:
        models = fit_group(group, fit, runtime)
        scored = score_group(group, models, evalset.images, fit_seconds=time.perf_counter() - t)
    except (PatchKNNError, ValueError, RuntimeError, MemoryError) as e:
        # one bad group (e.g. weights missing offline) must not end the search
        return [_skipped(c, f"failed: {' '.join(str(e).split())[:200]}", status="failed") for c in group.candidates]
    rows = [candidate_row(s, evalset) for s in scored]
    weights = getattr(models[0], "member_weights_", None)
    if group.ensemble and group.members[0].ensemble_weights == "auto" and weights is not None:
        for row in rows:  # the weights its own fit chose (from its own held-out images)
            row.note = "scored; member weights " + ",".join(f"{w:g}" for w in weights)
    return rows


def _runtime_for(group: CandidateGroup, baseline: PatchKNNConfig, runtime: dict[str, Any]) -> dict[str, Any]:
    """A weights file belongs to one network: candidates on another backbone use their default."""
    weights = runtime.get("weights")
    if weights is None or str(weights).startswith("random") or group.ensemble:
        return runtime
    if group.members[0].backbone == baseline.backbone:
        return runtime
    return {**runtime, "weights": None}


def _skipped(cand: Candidate, note: str, status: str = "skipped") -> CandidateRow:
    return CandidateRow(cand.name, cand.config.to_dict(), status, cost=cand.cost, note=note)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"
