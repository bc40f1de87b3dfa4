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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from patchknn.errors import ConfigError
from patchknn.execution import progress_bar
from patchknn.heldout import Folds, score_group, select_images

if TYPE_CHECKING:
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


def calibrate(
    model: PatchKNN,
    bank: np.ndarray,
    n_images: int,
    *,
    bank_rows: np.ndarray | None = None,
    index_bank: np.ndarray | None = None,
    progress: bool = True,
    exact: bool = False,
) -> Calibration:
    """Calibrate ``model``'s threshold by cross-validation over its own training images.

    Args:
        model: the model being fitted (its config, :meth:`grid_to_map`, :meth:`image_score`).
        bank: the *full* memory bank before any subsampling, ``(n_images * grid**2, d)``, in the
            space of the index (after PCA); the rows of fitted image ``i`` are
            ``[i * grid**2, (i + 1) * grid**2)``.
        n_images: the number of fitted images.
        bank_rows: when the searched bank is a subset of ``bank`` (coreset), the row numbers (in
            ``bank``) of the rows kept, in the order of ``index_bank``; ``None`` = all rows kept.
        index_bank: the rows that are searched at predict time when ``bank_rows`` is given
            (defaults to ``bank[bank_rows]``).
        progress: show a progress bar (only when ``model.progress`` and stderr is a terminal).
        exact: search every held-out patch exactly instead of pruning (same scores, slower; for
            tests). Pruning is used only where it is exact (``image_score`` ``max``/``topk_mean``).

    Returns:
        A :class:`Calibration`; its ``threshold`` is ``None`` (with a :class:`CalibrationWarning`)
        when there are fewer than two fitted images or ``calibration_images`` is 0.
    """
    cfg = model.config
    method = cfg.threshold_method
    cells = cfg.grid_size**2
    if method not in ("quantile", "sigma"):
        raise ConfigError(f"calibrate needs threshold_method 'quantile' or 'sigma', got {method!r}")
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
    rng = np.random.default_rng(cfg.seed)
    with progress_bar(len(chosen), "fit: calibrate", model.progress and progress) as bar:
        for group, searcher, excluded, queries in folds:
            group_scores, patches = score_group(model, searcher, excluded, queries, len(group), rng, exact=exact)
            for img, score in zip(group, group_scores):
                scores[position[img]] = score
            patch_samples.append(patches)
            bar.update(len(group))
    n_substitutes = folds.n_substitutes
    patches = np.concatenate(patch_samples)
    threshold = threshold_from_scores(
        scores, method, quantile=float(cfg.threshold_quantile), sigma=float(cfg.threshold_sigma)
    )
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
    return Calibration(threshold, method, scores, chosen, info)


def calibrate_model(
    model: PatchKNN, bank: np.ndarray, bank_rows: np.ndarray | None = None, keep_held_out: bool = False
) -> None:
    """Set ``model.threshold_`` (and ``fit_info_["calibration"]``) from held-out normal scores, the
    rule of :meth:`~patchknn.model.PatchKNN.fit` and :meth:`~patchknn.model.PatchKNN.partial_fit`.

    ``bank`` is the full bank before any subsampling (rows ``[i*G*G, (i+1)*G*G)`` = image ``i``);
    with a coreset pass the kept row numbers as ``bank_rows`` (the model's index holds those rows).
    ``keep_held_out``: also set ``model.held_out_`` = :func:`held_out_grids` (for an ensemble).
    """
    n_images = bank.shape[0] // model.config.grid_size**2
    model.threshold_ = None
    index_bank = None if bank_rows is None else model.index_.bank  # type: ignore[union-attr]
    if keep_held_out:
        model.held_out_ = held_out_grids(model, bank, n_images, bank_rows=bank_rows, index_bank=index_bank)
    if model.config.threshold_method == "none":
        return
    cal = calibrate(model, bank, n_images, bank_rows=bank_rows, index_bank=index_bank)
    model.threshold_ = cal.threshold
    model.fit_info_["calibration"] = cal.info


def held_out_grids(
    model: PatchKNN,
    bank: np.ndarray,
    n_images: int,
    *,
    bank_rows: np.ndarray | None = None,
    index_bank: np.ndarray | None = None,
) -> tuple[list[int], np.ndarray]:
    """The held-out patch-score grids :func:`calibrate` scores its images from, searched exactly.

    Same arguments, images and cross-validation groups as :func:`calibrate` (coreset included);
    returns the chosen image indices and their grids ``(n, grid, grid)`` float32 (empty when
    there are fewer than two images or the bank without a group is smaller than ``k``). For
    callers that combine grids before scoring them (an ensemble z-scores and averages its
    members' grids, then calibrates its threshold on the result).
    """
    cfg = model.config
    g = cfg.grid_size
    if n_images < 2 or cfg.calibration_images < 1:
        return [], np.empty((0, g, g), dtype=np.float32)
    folds = Folds(model, bank, n_images, bank_rows, index_bank)
    if folds.too_small:
        return [], np.empty((0, g, g), dtype=np.float32)
    grids = np.empty((len(folds.chosen), g, g), dtype=np.float32)
    position = {img: j for j, img in enumerate(folds.chosen)}
    for group, searcher, excluded, queries in folds:
        values = searcher(queries, excluded).reshape(len(group), g, g)
        for img, grid in zip(group, values):
            grids[position[img]] = grid
    return folds.chosen, grids


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
    "Calibration",
    "CalibrationWarning",
    "calibrate",
    "calibrate_model",
    "held_out_grids",
    "select_images",
    "summarize",
    "threshold_from_scores",
]
