"""A decision threshold calibrated from normal images only, and the statistics of normal scores.

Every training image is in the memory bank, so scoring a training image against the bank gives
(nearly) zero: the threshold must come from images the bank has not seen. :func:`calibrate`
scores up to ``calibration_images`` training images by cross-validation, without losing any
image to the bank: the chosen images are split into a few groups, and each group is scored
against a temporary exact (flat) index over the bank rows of *all the other* training images.
With a coreset the searched rows are the kept rows of the other images, and each kept row of a
held-out image that leaves its area of the bank uncovered is replaced by its nearest patch of the
other images (a coreset row stands for a cluster of patches of many images; see
:func:`group_rows`).
The held-out maps and image scores are formed exactly as :meth:`PatchKNN.predict` forms them
(:meth:`~patchknn.model.PatchKNN.grid_to_map`, :meth:`~patchknn.model.PatchKNN.image_score`).

* ``threshold_method="defects"`` (the default): each calibration image also gets
  :data:`DEFECTS_PER_IMAGE` synthetic defects (:mod:`patchknn.defects`), scored by the same folds
  (so the bank has seen neither the image nor its defect); the threshold is the lowest cut with
  the best F1 on these images (the calibration images negative, their defects positive, each
  image counting once: :func:`separating_threshold`), never above the ``"quantile"`` rule's. Where
  the synthetic defects stand clear of the normal scores it stays near the normal scores' tail;
  where they overlap (magnetic_tile), it trades false alarms for misses as F1 does. The operating
  point is kept as ``defects_quantile`` (the share of held-out normal scores below the threshold):
  :meth:`~patchknn.model.PatchKNN.partial_fit`, which has only the new images, applies that
  quantile to its new held-out scores.
* ``threshold_method="quantile"``: threshold = the ``threshold_quantile`` quantile of the
  held-out normal image scores (linear interpolation; with 16 images, 0.99 is close to the max).
* ``threshold_method="sigma"``: threshold = mean + ``threshold_sigma`` x standard deviation.
* ``threshold_method="none"``: no threshold (and no calibration work).

Scoring every held-out patch exactly would cost as much as predicting the images; the search is
pruned without changing any score (see :func:`score_group`), which makes calibration several
times cheaper than predicting the same images.

The statistics (image-score mean/std/quantiles, quantiles of held-out normal patch scores) are
stored in ``model.fit_info_["calibration"]`` and saved with the model; :func:`color_scale` turns
them into a colour range that means the same on every image of the model.

Example:
    >>> import numpy as np
    >>> threshold_from_scores(np.array([1.0, 2.0, 3.0]), "quantile", quantile=0.5)
    2.0
    >>> round(threshold_from_scores(np.array([1.0, 2.0, 3.0]), "sigma", sigma=2.0), 3)
    4.0
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from patchknn.calibration_defects import (
    DEFECTS_PER_IMAGE,
    DefectRows,
    defect_images,
    defect_rows,
    fit_defects,
)
from patchknn.errors import ConfigError
from patchknn.execution import progress_bar
from patchknn.heldout import Folds, score_group, select_images
from patchknn.index.base import single_threaded_blas

if TYPE_CHECKING:
    from patchknn.config import PatchKNNConfig
    from patchknn.model import PatchKNN

IMAGE_QUANTILES = (0.5, 0.9, 0.95, 0.99)
PATCH_QUANTILES = (0.5, 0.9, 0.99, 0.999)


class CalibrationWarning(UserWarning):
    """Calibration was impossible (e.g. a single training image); the model has no threshold."""


@dataclass
class Calibration:
    """What :func:`calibrate` found.

    Attributes:
        threshold: the decision threshold (``None`` when it could not be calibrated).
        method: ``"quantile"`` or ``"sigma"``.
        image_scores: the held-out normal image scores, in the order of ``images``.
        images: indices (into the fitted images) of the calibration images.
        info: JSON-ready summary stored as ``fit_info_["calibration"]``.
    """

    threshold: float | None
    method: str
    image_scores: np.ndarray
    images: list[int]
    info: dict[str, Any] = field(default_factory=dict)


def threshold_from_scores(
    scores: np.ndarray, method: str, *, quantile: float = 0.99, sigma: float = 3.0
) -> float:
    """The threshold from held-out normal image ``scores`` (see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ConfigError("threshold calibration needs at least one held-out score")
    if method == "quantile":
        return float(np.quantile(scores, quantile))
    if method == "sigma":
        std = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
        return float(scores.mean() + sigma * std)
    raise ConfigError(f"threshold_method must be 'quantile' or 'sigma' to calibrate, got {method!r}")


def separating_threshold(normal: np.ndarray, defective: np.ndarray) -> float:
    """The lowest cut that maximises the F1 of the verdict ``score >= cut`` on the images scored:
    ``normal`` (negatives) and ``defective`` (positives) scores, each image counting once. Cuts lie
    midway between consecutive scores, so where the two separate, the cut is midway between the
    highest normal and the lowest defective score.

    >>> separating_threshold(np.array([1.0, 2.0, 3.0]), np.array([5.0, 6.0]))
    4.0
    """
    normal = np.sort(np.asarray(normal, dtype=np.float64).ravel())
    defective = np.sort(np.asarray(defective, dtype=np.float64).ravel())
    if normal.size == 0 or defective.size == 0:
        raise ConfigError("separating_threshold needs normal and defective scores")
    values = np.unique(np.concatenate([normal, defective]))
    cuts = np.concatenate([values[:1], (values[1:] + values[:-1]) / 2])
    tp = defective.size - np.searchsorted(defective, cuts, side="left")
    fp = normal.size - np.searchsorted(normal, cuts, side="left")
    f1 = 2 * tp / (tp + fp + defective.size)  # 2TP / (2TP + FP + FN) with FN = defective - TP
    return float(cuts[int(np.flatnonzero(f1 >= f1.max() - 1e-12)[0])])


def threshold_for(
    config: PatchKNNConfig,
    scores: np.ndarray,
    defect_scores: np.ndarray | None = None,
    *,
    operating_quantile: float | None = None,
) -> tuple[float, dict[str, Any]]:
    """``config.threshold_method``'s threshold from held-out normal image ``scores`` and (for
    ``"defects"``) the held-out scores of synthetic defects made on the same images; with no
    defect scores (:meth:`~patchknn.model.PatchKNN.partial_fit`) the ``operating_quantile`` a fit
    found (else ``threshold_quantile``). Returns the threshold and what to record about it."""
    method = config.threshold_method
    if method != "defects":
        q, sigma = config.threshold_quantile, config.threshold_sigma
        return threshold_from_scores(scores, method, quantile=q, sigma=sigma), {}
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if defect_scores is None or len(defect_scores) == 0:
        q = float(config.threshold_quantile if operating_quantile is None else operating_quantile)
        kept = {"defects_quantile": q, "defects": "operating point kept"}
        return threshold_from_scores(scores, "quantile", quantile=q), kept
    cap = threshold_from_scores(scores, "quantile", quantile=config.threshold_quantile)
    threshold = min(separating_threshold(scores, defect_scores), cap)
    defect_scores = np.asarray(defect_scores, dtype=np.float64).ravel()
    return threshold, {
        "defects_quantile": float((scores < threshold).mean()),
        "defects_cap": cap,
        "n_defects": int(defect_scores.size),
        "defects_recall": float((defect_scores >= threshold).mean()),
        "defect_scores": [round(float(v), 6) for v in defect_scores],
    }


def calibrate(
    model: PatchKNN,
    bank: np.ndarray,
    n_images: int,
    *,
    bank_rows: np.ndarray | None = None,
    index_bank: np.ndarray | None = None,
    progress: bool = True,
    exact: bool = False,
    sources: Sequence[Any] | DefectRows | None = None,
) -> Calibration:
    """Calibrate ``model``'s threshold by cross-validation over its own training images.

    Args:
        model: the model being fitted (its config, :meth:`grid_to_map`, :meth:`image_score`).
        bank: the *full* memory bank before any subsampling, ``(n_images * r, d)``, in the
            space of the index (after PCA); the rows of fitted image ``i`` are ``[i * r, (i + 1) * r)``,
            ``r`` = the config's ``rows_per_image`` (its grid, then its ``train_flips`` copies').
        n_images: the number of fitted images.
        bank_rows: when the searched bank is a subset of ``bank`` (coreset), the row numbers (in
            ``bank``) of the rows kept, in the order of ``index_bank``; ``None`` = all rows kept.
        index_bank: the rows that are searched at predict time when ``bank_rows`` is given
            (defaults to ``bank[bank_rows]``).
        progress: show a progress bar (only when ``model.progress`` and stderr is a terminal).
        exact: search every held-out patch exactly instead of pruning (same scores, slower; for
            tests). Pruning is used only where it is exact (``image_score`` ``max``/``topk_mean``).
        sources: the fitted images in bank order, for ``threshold_method="defects"`` (synthetic
            defects are made on the calibration images); ``None``: the operating point the model
            found when it was fitted is kept (see :func:`threshold_for`). Or their
            :class:`DefectRows`, computed while the bank was built (:func:`fit_defects`).

    Returns:
        A :class:`Calibration`; its ``threshold`` is ``None`` (with a :class:`CalibrationWarning`)
        when there are fewer than two fitted images or ``calibration_images`` is 0.
    """
    cfg = model.config
    method = cfg.threshold_method
    cells = cfg.rows_per_image
    if method not in ("quantile", "sigma", "defects"):
        raise ConfigError(f"calibrate needs threshold_method 'quantile', 'sigma' or 'defects', got {method!r}")
    if bank.shape[0] != n_images * cells:
        raise ConfigError(f"calibrate: the bank has {bank.shape[0]} rows, expected {n_images} x {cells}")
    if n_images < 2 or cfg.calibration_images < 1:
        why = (
            "calibration_images is 0"
            if cfg.calibration_images < 1
            else f"only {n_images} training image (the threshold needs images the bank has not seen)"
        )
        warnings.warn(
            f"no decision threshold: {why}; set one with model.threshold_ = ... or --threshold",
            CalibrationWarning,
            stacklevel=3,
        )
        return Calibration(None, method, np.empty(0), [], {"method": method, "threshold": None, "reason": why})

    t0 = time.perf_counter()
    folds = Folds(model, bank, n_images, bank_rows, index_bank)
    if folds.too_small:
        why = f"k={cfg.k} is larger than the memory bank without the held-out images"
        warnings.warn(f"no decision threshold: {why}", CalibrationWarning, stacklevel=3)
        return Calibration(None, method, np.empty(0), [], {"method": method, "threshold": None, "reason": why})
    chosen, n_groups = folds.chosen, len(folds.groups)
    scores = np.empty(len(chosen), dtype=np.float64)
    position = {img: j for j, img in enumerate(chosen)}
    patch_samples: list[np.ndarray] = []
    defect_scores: dict[int, np.ndarray] = {}
    with_defects = method == "defects" and sources is not None
    rng = np.random.default_rng(cfg.seed)
    defects = DefectRows.of(model, sources, n_images).wait() if with_defects else None  # the loop runs alone
    # numpy's BLAS on one thread: the maps of the pruned search are tiny products (28 x 28 ->
    # 224 x 224), which a 2-thread BLAS runs 100x slower when the cores are busy (same results)
    with progress_bar(len(chosen), "fit: calibrate", model.progress and progress) as bar, single_threaded_blas():
        for group, searcher, excluded, queries in folds:
            bound = folds.bound(group)
            group_scores, patches = score_group(
                model, searcher, excluded, queries, len(group), rng, exact=exact, bound=bound
            )
            for img, score in zip(group, group_scores):
                scores[position[img]] = score
            if with_defects:
                rows, n = defects.rows(group), len(group) * DEFECTS_PER_IMAGE  # type: ignore[union-attr]
                found, _ = score_group(model, searcher, excluded, rows, n, rng, exact=exact, bound=bound)
                for img, pair in zip(group, found.reshape(len(group), DEFECTS_PER_IMAGE)):
                    defect_scores[img] = pair
            patch_samples.append(patches)
            bar.update(len(group))
    n_substitutes = folds.n_substitutes
    patches = np.concatenate(patch_samples)
    made = np.concatenate([defect_scores[img] for img in chosen]) if with_defects else None
    operating = (model.fit_info_.get("calibration") or {}).get("defects_quantile")
    threshold, defects_info = threshold_for(cfg, scores, made, operating_quantile=operating)
    info = {
        "method": method,
        "threshold": threshold,
        "quantile": float(cfg.threshold_quantile),
        "sigma": float(cfg.threshold_sigma),
        "n_images": len(chosen),
        "n_groups": n_groups,
        "image_scores": [round(float(s), 6) for s in scores],
        "image": summarize(scores, IMAGE_QUANTILES),
        "patch": summarize(patches, PATCH_QUANTILES),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if n_substitutes:
        info["coreset_substitutes"] = n_substitutes
    info |= defects_info
    return Calibration(threshold, method, scores, chosen, info)


def calibrate_model(
    model: PatchKNN,
    bank: np.ndarray,
    bank_rows: np.ndarray | None = None,
    keep_held_out: bool = False,
    sources: Sequence[Any] | DefectRows | None = None,
) -> None:
    """Set ``model.threshold_`` (and ``fit_info_["calibration"]``) from held-out normal scores, the
    rule of :meth:`~patchknn.model.PatchKNN.fit` and :meth:`~patchknn.model.PatchKNN.partial_fit`.

    ``bank`` is the full bank before any subsampling (rows ``[i*G*G, (i+1)*G*G)`` = image ``i``;
    with ``train_flips``, each image's grid followed by its flipped copies' grids);
    with a coreset pass the kept row numbers as ``bank_rows`` (the model's index holds those rows).
    ``keep_held_out``: also set ``model.held_out_`` = :func:`held_out_grids` (for an ensemble).
    ``sources``: the fitted images in bank order (synthetic defects are made on them, see
    :func:`calibrate`; with ``keep_held_out``, also the defects' held-out grids), or their
    :class:`DefectRows` (:func:`fit_defects`).
    """
    n_images = bank.shape[0] // model.config.rows_per_image
    model.threshold_ = None
    index_bank = None if bank_rows is None else model.index_.bank  # type: ignore[union-attr]
    if keep_held_out:
        model.held_out_ = held_out_grids(
            model, bank, n_images, bank_rows=bank_rows, index_bank=index_bank, sources=sources
        )
    if model.config.threshold_method == "none":
        return
    cal = calibrate(model, bank, n_images, bank_rows=bank_rows, index_bank=index_bank, sources=sources)
    model.threshold_ = cal.threshold
    model.fit_info_["calibration"] = cal.info


class HeldOut(NamedTuple):
    """What :func:`held_out_grids` returns.

    Attributes:
        images: the calibration images (indices into the fitted images).
        grids: their held-out grids ``(n, grid, grid)`` float32.
        defect_grids: the held-out grids of their synthetic defects (:func:`defect_rows`, image by
            image), ``(n * DEFECTS_PER_IMAGE, grid, grid)``; empty without ``sources``.
    """

    images: list[int]
    grids: np.ndarray
    defect_grids: np.ndarray


def held_out_grids(
    model: PatchKNN,
    bank: np.ndarray,
    n_images: int,
    *,
    bank_rows: np.ndarray | None = None,
    index_bank: np.ndarray | None = None,
    sources: Sequence[Any] | DefectRows | None = None,
) -> HeldOut:
    """The held-out patch-score grids :func:`calibrate` scores its images from, searched exactly.

    Same arguments, images and cross-validation groups as :func:`calibrate` (coreset included);
    returns the chosen image indices and their grids ``(n, grid, grid)`` float32 (empty when
    there are fewer than two images or the bank without a group is smaller than ``k``), and with
    ``sources`` the grids of the synthetic defects made on them. For callers that combine grids
    before scoring them (an ensemble z-scores and averages its members' grids, then calibrates
    its threshold on the result).
    """
    cfg = model.config
    g = cfg.grid_size
    empty = np.empty((0, g, g), dtype=np.float32)
    if n_images < 2 or cfg.calibration_images < 1:
        return HeldOut([], empty, empty)
    folds = Folds(model, bank, n_images, bank_rows, index_bank)
    if folds.too_small:
        return HeldOut([], empty, empty)
    grids = np.empty((len(folds.chosen), g, g), dtype=np.float32)
    per = DEFECTS_PER_IMAGE
    defects = np.empty((len(folds.chosen) * per if sources is not None else 0, g, g), dtype=np.float32)
    position = {img: j for j, img in enumerate(folds.chosen)}
    made_rows = None if sources is None else DefectRows.of(model, sources, n_images).wait()
    for group, searcher, excluded, queries in folds:
        values = searcher(queries, excluded).reshape(len(group), g, g)
        made = None if made_rows is None else searcher(made_rows.rows(group), excluded)
        for j, (img, grid) in enumerate(zip(group, values)):
            grids[position[img]] = grid
            if made is not None:
                p = position[img] * per
                defects[p : p + per] = made.reshape(len(group), per, g, g)[j]
    return HeldOut(folds.chosen, grids, defects)


# -------------------------------------------------------------------------------------- helpers
def summarize(values: np.ndarray, quantiles: tuple[float, ...]) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    qs = np.quantile(values, quantiles)
    out = {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
    }
    out |= {_qname(q): float(v) for q, v in zip(quantiles, qs)}
    return out


def _qname(q: float) -> str:
    """0.5 -> 'q50', 0.99 -> 'q99', 0.999 -> 'q999'."""
    text = f"{q:.4f}".rstrip("0").split(".")[1]
    return "q" + (text if len(text) > 1 else text + "0")


__all__ = [
    "IMAGE_QUANTILES",
    "PATCH_QUANTILES",
    "DEFECTS_PER_IMAGE",
    "Calibration",
    "CalibrationWarning",
    "DefectRows",
    "HeldOut",
    "calibrate",
    "calibrate_model",
    "held_out_grids",
    "defect_images",
    "defect_rows",
    "fit_defects",
    "select_images",
    "separating_threshold",
    "summarize",
    "threshold_for",
    "threshold_from_scores",
]
