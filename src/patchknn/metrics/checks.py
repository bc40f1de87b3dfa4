"""Input checks shared by the metrics: shapes, finiteness, classes present, options."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from patchknn.errors import ConfigError

FloatArray = NDArray[np.floating[Any]]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]


def as_array(values: ArrayLike, name: str) -> np.ndarray:
    if values is None:
        raise ConfigError(f"{name} is None; an array is required")
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a numeric array ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise ConfigError(f"{name} must hold real numbers or booleans, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ConfigError(f"{name} is empty (shape {arr.shape}); at least one value is needed")
    return arr


def as_scores(values: ArrayLike, name: str) -> FloatArray:
    """Scores as float32 (float16/float32 input) or float64 (anything else), checked finite."""
    arr = as_array(values, name)
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    elif arr.dtype.itemsize < 4:
        arr = arr.astype(np.float32)
    elif arr.dtype.itemsize > 8:
        arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = arr.size - int(np.count_nonzero(finite))
        raise ConfigError(f"{name} contains {bad} NaN or infinite value(s); scores must be finite")
    return arr


def as_targets(values: ArrayLike, name: str, shape: tuple[int, ...], ref_name: str) -> BoolArray:
    """Ground truth as bool (value > 0 = defective), checked to have ``shape``."""
    arr = as_array(values, name)
    if arr.shape != shape:
        raise ConfigError(
            f"{name} has shape {arr.shape} but {ref_name} has shape {shape}; they must be the same"
        )
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ConfigError(f"{name} contains NaN or infinite values")
    return arr > 0


def pixel_inputs(maps: ArrayLike, masks: ArrayLike) -> tuple[FloatArray, BoolArray]:
    scores = as_scores(maps, "maps")
    if scores.ndim not in (2, 3):
        raise ConfigError(f"maps must have shape (N, H, W) or (H, W), got shape {scores.shape}")
    positive = as_targets(masks, "masks", scores.shape, "maps")
    if scores.ndim == 2:
        scores, positive = scores[np.newaxis], positive[np.newaxis]
    return scores, positive


def image_inputs(scores: ArrayLike, labels: ArrayLike) -> tuple[FloatArray, BoolArray]:
    values = as_scores(scores, "scores")
    if values.ndim != 1:
        raise ConfigError(f"scores must be 1-D (one score per image), got shape {values.shape}")
    return values, as_targets(labels, "labels", values.shape, "scores")


def curve_inputs(scores: ArrayLike, targets: ArrayLike) -> tuple[FloatArray, BoolArray]:
    values = as_scores(scores, "maps_or_scores")
    return values, as_targets(targets, "targets", values.shape, "maps_or_scores")


def check_fpr_limit(fpr_limit: float) -> float:
    try:
        limit = float(fpr_limit)
    except (TypeError, ValueError):
        raise ConfigError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}") from None
    if not 0.0 < limit <= 1.0:
        raise ConfigError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return limit


def check_max_points(max_points: int | None) -> int | None:
    if max_points is None:
        return None
    if isinstance(max_points, bool) or not isinstance(max_points, int | np.integer) or max_points < 4:
        raise ConfigError(f"max_points must be None or an integer >= 4, got {max_points!r}")
    return int(max_points)


def require(condition: bool, what: str) -> None:
    if not condition:
        raise ConfigError(f"{what} is undefined for this data: {UNDEFINED_REASON[what]}")


def defined(value: Any, what: str) -> Any:
    require(value is not None, what)
    return value


UNDEFINED_REASON = {
    "pixel AUPRC": "the masks contain no defective pixel",
    "pixel AUROC": "it needs both defective and normal pixels",
    "pixel F1": "the masks contain no defective pixel",
    "AUPRO": "it needs at least one ground-truth region and at least one normal pixel",
    "PRO curve": "it needs at least one ground-truth region and at least one normal pixel",
    "image AUROC": "it needs both defective and good images",
    "image F1": "no image is labelled defective",
    "precision-recall curve": "the targets contain no defective sample",
    "ROC curve": "it needs both defective and normal samples",
}


# -- the shared core ---------------------------------------------------------------------------
