"""Evaluation metrics for anomaly detection, following the MVTec AD protocol.

Everything here is plain numpy/scipy. Pixel metrics are *pooled*: every pixel of every test image
counts once, whatever image it belongs to.

Inputs:
    maps: anomaly maps, shape ``(N, H, W)`` (one ``(H, W)`` map is read as ``N = 1``), any real
        dtype; higher means more anomalous. Must be finite.
    masks: ground truth, same shape as ``maps``, any numeric or bool dtype; a value ``> 0`` marks a
        defective pixel, so bool, 0/1 and 0/255 ``uint8`` masks all work. A good image has an
        all-zero mask.
    scores: image scores, shape ``(N,)``, finite.
    labels: image labels, shape ``(N,)``; a value ``> 0`` means defective (1 = defective).

Thresholds follow scikit-learn: a sample is predicted defective when its score is ``>=`` the
threshold.

Undefined metrics: a metric that needs a class the data lacks (AUROC with one class only, AUPRC and
F1 without defective samples, AUPRO without a ground-truth region or without a normal pixel) raises
:class:`~patchknn.errors.ConfigError` from its own function, while :func:`compute_all` reports it
as ``None`` (never NaN) and raises nothing for it. Invalid input (empty arrays, mismatched shapes,
NaN/Inf in maps or scores) raises :class:`~patchknn.errors.ConfigError` everywhere.

Speed and memory: the scores of the defective and of the normal samples are each sorted once, in
their own dtype (float32 maps are not copied to float64), and every metric is read off the two
sorted arrays with binary searches; there is no loop over thresholds and no per-sample float64
arrays as in scikit-learn. AUPRO weights each defective pixel by ``1 / size of its region`` and
reads the PRO curve off the same sorted arrays.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from patchknn.errors import ConfigError

__all__ = [
    "DEFAULT_FPR_LIMIT",
    "DEFAULT_MAX_POINTS",
    "METRIC_KEYS",
    "aupro",
    "compute_all",
    "f1_optimal_threshold",
    "image_auroc",
    "pixel_auprc",
    "pixel_auroc",
    "pixel_f1_max",
    "precision_recall_curve",
    "pro_curve",
    "roc_curve",
]

DEFAULT_FPR_LIMIT = 0.3
"""FPR up to which AUPRO integrates (the MVTec AD default)."""

DEFAULT_MAX_POINTS = 2000
"""Default largest number of points a curve function returns (enough for a plot)."""

METRIC_KEYS = (
    "pixel_auprc",
    "pixel_auroc",
    "image_auroc",
    "aupro",
    "pixel_f1_max",
    "pixel_f1_threshold",
    "image_f1_max",
    "image_f1_threshold",
)
"""The keys of the dictionary :func:`compute_all` returns, in order."""

FloatArray = NDArray[np.floating[Any]]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]

# 3x3 (8-connected) neighbourhood inside an image, no connection across images of the stack;
# the official MVTec AD code labels each map with ``np.ones((3, 3))``.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# -- input checks ------------------------------------------------------------------------------


def _as_array(values: ArrayLike, name: str) -> np.ndarray:
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


def _as_scores(values: ArrayLike, name: str) -> FloatArray:
    """Scores as float32 (float16/float32 input) or float64 (anything else), checked finite."""
    arr = _as_array(values, name)
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


def _as_targets(values: ArrayLike, name: str, shape: tuple[int, ...], ref_name: str) -> BoolArray:
    """Ground truth as bool (value > 0 = defective), checked to have ``shape``."""
    arr = _as_array(values, name)
    if arr.shape != shape:
        raise ConfigError(
            f"{name} has shape {arr.shape} but {ref_name} has shape {shape}; they must be the same"
        )
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ConfigError(f"{name} contains NaN or infinite values")
    return arr > 0


def _pixel_inputs(maps: ArrayLike, masks: ArrayLike) -> tuple[FloatArray, BoolArray]:
    scores = _as_scores(maps, "maps")
    if scores.ndim not in (2, 3):
        raise ConfigError(f"maps must have shape (N, H, W) or (H, W), got shape {scores.shape}")
    positive = _as_targets(masks, "masks", scores.shape, "maps")
    if scores.ndim == 2:
        scores, positive = scores[np.newaxis], positive[np.newaxis]
    return scores, positive


def _image_inputs(scores: ArrayLike, labels: ArrayLike) -> tuple[FloatArray, BoolArray]:
    values = _as_scores(scores, "scores")
    if values.ndim != 1:
        raise ConfigError(f"scores must be 1-D (one score per image), got shape {values.shape}")
    return values, _as_targets(labels, "labels", values.shape, "scores")


def _curve_inputs(scores: ArrayLike, targets: ArrayLike) -> tuple[FloatArray, BoolArray]:
    values = _as_scores(scores, "maps_or_scores")
    return values, _as_targets(targets, "targets", values.shape, "maps_or_scores")


def _check_fpr_limit(fpr_limit: float) -> float:
    try:
        limit = float(fpr_limit)
    except (TypeError, ValueError):
        raise ConfigError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}") from None
    if not 0.0 < limit <= 1.0:
        raise ConfigError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return limit


def _check_max_points(max_points: int | None) -> int | None:
    if max_points is None:
        return None
    if isinstance(max_points, bool) or not isinstance(max_points, int | np.integer) or max_points < 4:
        raise ConfigError(f"max_points must be None or an integer >= 4, got {max_points!r}")
    return int(max_points)


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ConfigError(f"{what} is undefined for this data: {_UNDEFINED_REASON[what]}")


def _defined(value: Any, what: str) -> Any:
    _require(value is not None, what)
    return value


_UNDEFINED_REASON = {
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


def _group_starts(sorted_values: np.ndarray) -> IntArray:
    """Index of the first element of each run of equal values in an ascending array."""
    if sorted_values.size == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.empty(sorted_values.size, dtype=bool)
    change[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=change[1:])
    return np.flatnonzero(change)


def _region_weights(positive: BoolArray) -> tuple[FloatArray, int]:
    """``1 / region size`` for each defective pixel (in C order) and the number of regions.

    Regions are the 8-connected components of each image's mask (``scipy.ndimage.label`` with a 3x3
    ones structure, as in the official MVTec AD evaluation); images never connect to each other.
    """
    labels, n_regions = ndimage.label(positive, structure=_REGION_STRUCTURE)
    region_of_pixel = labels[positive]
    del labels
    sizes = np.bincount(region_of_pixel, minlength=n_regions + 1)
    return 1.0 / sizes[region_of_pixel], int(n_regions)


class _Pooled:
    """Scores split by class and sorted once; every metric is read off the two sorted arrays.

    ``pos`` / ``neg`` hold the scores of the defective / normal samples in ascending order. With
    ``regions=True`` (pixel data of shape ``(N, H, W)``) each defective pixel also carries its PRO
    weight ``1 / region size``, kept in ``pos`` order.
    """

    def __init__(self, scores: FloatArray, positive: BoolArray, *, regions: bool = False) -> None:
        flat = scores.reshape(-1)
        is_pos = positive.reshape(-1)
        neg = flat[~is_pos]
        neg.sort()
        self.neg = neg
        pos = flat[is_pos]
        self.n_regions = 0
        self.pos_weights: FloatArray | None = None
        if regions:
            weights, self.n_regions = _region_weights(positive)
            order = np.argsort(pos)
            pos = pos[order]
            self.pos_weights = weights[order]
        else:
            pos.sort()
        self.pos = pos
        self.n_pos = int(pos.size)
        self.n_neg = int(neg.size)

    # -- counts at the distinct positive scores (enough for AP, AUROC and the best F1) -------

    @cached_property
    def _pos_groups(self) -> tuple[np.ndarray, IntArray, IntArray, IntArray, IntArray, IntArray]:
        """Distinct positive scores ``v`` (ascending) and, for each: how many positives equal ``v``,
        how many positives / negatives score ``>= v``, and how many negatives score ``< v`` and
        ``<= v``."""
        starts = _group_starts(self.pos)
        values = self.pos[starts]
        counts = np.diff(np.append(starts, self.n_pos))
        neg_below = np.searchsorted(self.neg, values, side="left").astype(np.int64)
        neg_upto = np.searchsorted(self.neg, values, side="right").astype(np.int64)
        tp = self.n_pos - starts
        fp = self.n_neg - neg_below
        return values, counts, tp, fp, neg_below, neg_upto

    def average_precision(self) -> float | None:
        # Step-wise AP = sum over thresholds of (recall gain) * precision; recall only grows at
        # thresholds equal to some positive score, so those are the only ones that contribute.
        if self.n_pos == 0:
            return None
        _, counts, tp, fp, _, _ = self._pos_groups
        return float(np.dot(counts, tp / (tp + fp)) / self.n_pos)

    def auroc(self) -> float | None:
        # Mann-Whitney: P(score_pos > score_neg) + P(tie) / 2, exactly the trapezoidal ROC area.
        if self.n_pos == 0 or self.n_neg == 0:
            return None
        _, counts, _, _, neg_below, neg_upto = self._pos_groups
        twice_u = int(np.dot(counts, neg_below + neg_upto))
        return twice_u / (2 * self.n_pos * self.n_neg)

    def f1_max(self) -> tuple[float, float] | None:
        # Lowering the threshold to a score no positive has only adds false positives, so the best
        # F1 is at a distinct positive score. Ties go to the highest such threshold.
        if self.n_pos == 0:
            return None
        values, _, tp, fp, _, _ = self._pos_groups
        f1 = 2.0 * tp / (tp + fp + self.n_pos)
        best = f1.size - 1 - int(np.argmax(f1[::-1]))
        return float(f1[best]), float(values[best])

    # -- counts at every distinct score (curves for plots) ------------------------------------

    def confusion_at_thresholds(self) -> tuple[FloatArray, IntArray, IntArray]:
        """Every distinct score in falling order, with true / false positives at ``score >= t``."""
        pos_values = self.pos[_group_starts(self.pos)]
        neg_values = self.neg[_group_starts(self.neg)]
        thresholds = np.union1d(pos_values, neg_values)[::-1]
        tp = self.n_pos - np.searchsorted(self.pos, thresholds, side="left").astype(np.int64)
        fp = self.n_neg - np.searchsorted(self.neg, thresholds, side="left").astype(np.int64)
        return thresholds.astype(np.float64), tp, fp

    # -- PRO ------------------------------------------------------------------------------------

    @cached_property
    def _pro_above(self) -> FloatArray:
        """``_pro_above[i]`` = PRO when the positives ``pos[i:]`` are predicted defective."""
        assert self.pos_weights is not None
        suffix = np.zeros(self.n_pos + 1)
        suffix[:-1] = np.cumsum(self.pos_weights[::-1])[::-1]
        suffix /= self.n_regions
        np.minimum(suffix, 1.0, out=suffix)
        return suffix

    def pro_pieces(self, fpr_limit: float | None) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """The sloped pieces of the PRO curve in order of falling threshold.

        Each distinct normal score ``v`` moves the curve linearly from ``(fpr(> v), pro(> v))`` to
        ``(fpr(>= v), pro(>= v))``; between pieces the curve only rises vertically (thresholds that
        only defective pixels have). With ``fpr_limit`` only the pieces that start below the limit
        are computed. Returns ``(fpr_start, pro_start, fpr_end, pro_end)``.
        """
        neg, n_neg = self.neg, self.n_neg
        first = 0
        if fpr_limit is not None and fpr_limit < 1.0:
            # Pieces whose start lies beyond the limit need no work: keep the top ceil(limit * n)
            # normal scores plus one, widened to the whole run of ties they begin in.
            first = max(0, n_neg - math.ceil(fpr_limit * n_neg) - 1)
            first = int(np.searchsorted(neg, neg[first], side="left"))
        starts = first + _group_starts(neg[first:])
        ends = np.append(starts[1:], n_neg)
        values = neg[starts]
        pro_above = self._pro_above
        pro_ge = pro_above[np.searchsorted(self.pos, values, side="left")]
        pro_gt = pro_above[np.searchsorted(self.pos, values, side="right")]
        fpr_ge = (n_neg - starts) / n_neg
        fpr_gt = (n_neg - ends) / n_neg
        return fpr_gt[::-1], pro_gt[::-1], fpr_ge[::-1], pro_ge[::-1]

    def aupro(self, fpr_limit: float) -> float | None:
        if self.n_regions == 0 or self.n_neg == 0:
            return None
        fpr0, pro0, fpr1, pro1 = self.pro_pieces(fpr_limit)
        full = int(np.searchsorted(fpr1, fpr_limit, side="right"))  # pieces ending at or before it
        area = float(np.dot(fpr1[:full] - fpr0[:full], pro0[:full] + pro1[:full])) / 2.0
        if full < fpr1.size and fpr0[full] < fpr_limit:
            # The piece crossing the limit: interpolate the PRO there (as the official trapezoid).
            x0, y0 = fpr0[full], pro0[full]
            y_limit = y0 + (pro1[full] - y0) * (fpr_limit - x0) / (fpr1[full] - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2.0
        return float(area / fpr_limit)

    def pro_vertices(self) -> tuple[FloatArray, FloatArray] | None:
        if self.n_regions == 0 or self.n_neg == 0:
            return None
        fpr0, pro0, fpr1, pro1 = self.pro_pieces(None)
        fpr = np.empty(2 * fpr0.size + 2)
        pro = np.empty_like(fpr)
        fpr[0], pro[0], fpr[-1], pro[-1] = 0.0, 0.0, 1.0, 1.0
        fpr[1:-1:2], pro[1:-1:2], fpr[2:-1:2], pro[2:-1:2] = fpr0, pro0, fpr1, pro1
        keep = np.ones(fpr.size, dtype=bool)
        keep[1:] = (np.diff(fpr) != 0) | (np.diff(pro) != 0)
        return fpr[keep], pro[keep]


def _subsample(x: FloatArray, y: FloatArray, max_points: int | None) -> IntArray | None:
    """Indices of at most ``max_points`` curve points spread evenly along the curve's length
    (first and last point kept), or ``None`` when the curve is short enough already.

    Each sampled point comes with its predecessor, so steps and corners stay sharp.
    """
    n = x.size
    if max_points is None or n <= max_points:
        return None
    length = np.zeros(n)
    np.cumsum(np.hypot(np.diff(x), np.diff(y)), out=length[1:])
    targets = np.linspace(0.0, length[-1], (max_points - 2) // 2)
    picked = np.searchsorted(length, targets, side="left")
    picked = np.concatenate(([0, n - 1], picked, picked - 1))
    return np.unique(np.clip(picked, 0, n - 1))


# -- public functions --------------------------------------------------------------------------


def pixel_auprc(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pooled pixel-level average precision (area under the precision-recall curve).

    Step-wise average precision, ``sum_k (R_k - R_{k-1}) * P_k`` over the distinct thresholds,
    exactly as ``sklearn.metrics.average_precision_score`` on the flattened pixels (not the
    trapezoidal area), but computed from one sort per class in the maps' own dtype.

    Args:
        maps: Anomaly maps, ``(N, H, W)`` or ``(H, W)``, finite.
        masks: Ground truth of the same shape; ``> 0`` marks defective pixels.

    Returns:
        The average precision in ``[0, 1]``.

    Raises:
        ConfigError: Invalid input, or no defective pixel at all (AP undefined).

    Example:
        >>> maps = np.array([[[0.1, 0.4], [0.35, 0.8]]])
        >>> masks = np.array([[[0, 0], [1, 1]]], dtype=np.uint8)
        >>> round(pixel_auprc(maps, masks), 4)
        0.8333
    """
    scores, positive = _pixel_inputs(maps, masks)
    return _defined(_Pooled(scores, positive).average_precision(), "pixel AUPRC")


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pooled pixel-level area under the ROC curve (= ``sklearn.metrics.roc_auc_score`` on pixels).

    Args:
        maps: Anomaly maps, ``(N, H, W)`` or ``(H, W)``, finite.
        masks: Ground truth of the same shape; ``> 0`` marks defective pixels.

    Returns:
        The AUROC in ``[0, 1]``; tied scores count one half.

    Raises:
        ConfigError: Invalid input, or only one pixel class present (AUROC undefined).

    Example:
        >>> maps = np.array([[0.1, 0.4], [0.35, 0.8]])
        >>> masks = np.array([[False, False], [True, True]])
        >>> pixel_auroc(maps, masks)
        0.75
    """
    scores, positive = _pixel_inputs(maps, masks)
    return _defined(_Pooled(scores, positive).auroc(), "pixel AUROC")


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level area under the ROC curve (= ``sklearn.metrics.roc_auc_score``).

    Args:
        scores: One anomaly score per image, shape ``(N,)``, finite.
        labels: Shape ``(N,)``; ``> 0`` (e.g. 1 or True) means defective.

    Returns:
        The AUROC in ``[0, 1]``; tied scores count one half.

    Raises:
        ConfigError: Invalid input, or only good or only defective images (AUROC undefined).

    Example:
        >>> image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    values, positive = _image_inputs(scores, labels)
    return _defined(_Pooled(values, positive).auroc(), "image AUROC")


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    As the official MVTec AD evaluation (Bergmann et al., IJCV 2021; ``compute_pro`` +
    ``trapezoid``): the ground-truth regions are the 8-connected components of every mask; at a
    threshold ``t`` the PRO is the mean, over all regions of all images, of the fraction of the
    region's pixels scoring ``>= t``, and the FPR is the fraction of all normal pixels (those of
    good images and those outside the regions of defective images) scoring ``>= t``. The
    piecewise-linear curve through the points of all distinct thresholds, from ``(0, 0)`` to
    ``(1, 1)``, is integrated from FPR 0 to ``fpr_limit`` (the PRO at the limit interpolated
    linearly) and divided by ``fpr_limit``. Computed from one sort of the pixels, each defective
    pixel weighted by ``1 / size of its region``, not by looping over thresholds.

    Args:
        maps: Anomaly maps, ``(N, H, W)`` or ``(H, W)``, finite.
        masks: Ground truth of the same shape; ``> 0`` marks defective pixels.
        fpr_limit: Integration limit in ``(0, 1]``; 0.3 as in MVTec AD.

    Returns:
        The AUPRO in ``[0, 1]``.

    Raises:
        ConfigError: Invalid input or ``fpr_limit``, or no ground-truth region or no normal pixel
            (AUPRO undefined).

    Example:
        Two regions; the map finds the small one only, above every normal pixel, and ranks the
        large one below them, so the PRO stays at 0.5 over the whole FPR range:

        >>> masks = np.zeros((1, 6, 6), dtype=bool)
        >>> masks[0, 0, 0] = True
        >>> masks[0, 3:6, 3:6] = True
        >>> maps = np.where(masks, -1.0, np.linspace(0.0, 1.0, 36).reshape(1, 6, 6))
        >>> maps[0, 0, 0] = 2.0
        >>> aupro(maps, masks)
        0.5
    """
    limit = _check_fpr_limit(fpr_limit)
    scores, positive = _pixel_inputs(maps, masks)
    return _defined(_Pooled(scores, positive, regions=True).aupro(limit), "AUPRO")


def pro_curve(
    maps: ArrayLike, masks: ArrayLike, max_points: int | None = DEFAULT_MAX_POINTS
) -> tuple[FloatArray, FloatArray]:
    """The PRO curve (see :func:`aupro`) as ``(fpr, pro)`` arrays for plotting.

    The full curve (``max_points=None``) holds the vertices of the piecewise-linear curve that
    :func:`aupro` integrates, from ``(0, 0)`` to ``(1, 1)`` with FPR non-decreasing; collinear
    vertices the official code also lists (thresholds where only defective pixels join) are left
    out. With ``max_points`` the curve is thinned to at most that many vertices, spread evenly
    along its length (first and last kept): fine for plots, not for exact integration.

    Args:
        maps: Anomaly maps, ``(N, H, W)`` or ``(H, W)``, finite.
        masks: Ground truth of the same shape; ``> 0`` marks defective pixels.
        max_points: Largest number of points returned (``>= 4``), or ``None`` for all of them.

    Returns:
        ``(fpr, pro)``, two float64 arrays of equal length.

    Raises:
        ConfigError: Invalid input, or no ground-truth region or no normal pixel.

    Example:
        >>> masks = np.array([[[1, 0], [0, 0]]], dtype=np.uint8)
        >>> maps = np.array([[[0.9, 0.8], [0.1, 0.2]]])
        >>> fpr, pro = pro_curve(maps, masks)
        >>> fpr.tolist(), pro.tolist()
        ([0.0, 0.0, 0.3333333333333333, 0.6666666666666666, 1.0], [0.0, 1.0, 1.0, 1.0, 1.0])
    """
    limit = _check_max_points(max_points)
    scores, positive = _pixel_inputs(maps, masks)
    fpr, pro = _defined(_Pooled(scores, positive, regions=True).pro_vertices(), "PRO curve")
    picked = _subsample(fpr, pro, limit)
    return (fpr, pro) if picked is None else (fpr[picked], pro[picked])


def pixel_f1_max(maps: ArrayLike, masks: ArrayLike) -> tuple[float, float]:
    """The best pooled pixel F1 score over all thresholds, and the threshold reaching it.

    Read off the same sorted precision-recall counts as :func:`pixel_auprc`. Pixels scoring
    ``>= threshold`` are predicted defective; the threshold is one of the map values, and when
    several thresholds reach the best F1 the highest is returned.

    Args:
        maps: Anomaly maps, ``(N, H, W)`` or ``(H, W)``, finite.
        masks: Ground truth of the same shape; ``> 0`` marks defective pixels.

    Returns:
        ``(f1_max, threshold)``.

    Raises:
        ConfigError: Invalid input, or no defective pixel (F1 undefined).

    Example:
        >>> maps = np.array([[0.1, 0.4], [0.35, 0.8]])
        >>> masks = np.array([[0, 0], [1, 1]])
        >>> pixel_f1_max(maps, masks)
        (0.8, 0.35)
    """
    scores, positive = _pixel_inputs(maps, masks)
    return _defined(_Pooled(scores, positive).f1_max(), "pixel F1")


def f1_optimal_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """The image-score threshold with the best F1, and that F1.

    Note the order: ``(threshold, f1)``, the reverse of :func:`pixel_f1_max`. Images scoring
    ``>= threshold`` are predicted defective; ties between thresholds go to the highest.

    Args:
        scores: One anomaly score per image, shape ``(N,)``, finite.
        labels: Shape ``(N,)``; ``> 0`` means defective.

    Returns:
        ``(threshold, f1)``.

    Raises:
        ConfigError: Invalid input, or no defective image (F1 undefined).

    Example:
        >>> f1_optimal_threshold([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        (0.35, 0.8)
    """
    values, positive = _image_inputs(scores, labels)
    f1, threshold = _defined(_Pooled(values, positive).f1_max(), "image F1")
    return threshold, f1


def precision_recall_curve(
    maps_or_scores: ArrayLike, targets: ArrayLike, max_points: int | None = DEFAULT_MAX_POINTS
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Pooled precision-recall curve, in the layout of ``sklearn.metrics.precision_recall_curve``.

    With ``max_points=None`` (or few distinct scores) the result equals scikit-learn's: thresholds
    rising, recall falling, and a final ``(precision=1, recall=0)`` point without a threshold.
    Otherwise the curve is thinned to at most ``max_points`` points spread evenly along its length
    (first and last threshold and the final point kept), which is meant for plots only.

    Args:
        maps_or_scores: Scores of any shape (anomaly maps or image scores), pooled; finite.
        targets: Same shape; ``> 0`` marks defective samples.
        max_points: Largest number of points returned (``>= 4``), or ``None`` for all of them.

    Returns:
        ``(precision, recall, thresholds)`` as float64 arrays; ``thresholds`` is one shorter.

    Raises:
        ConfigError: Invalid input, or no defective sample.

    Example:
        >>> precision, recall, thresholds = precision_recall_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        >>> precision.round(3).tolist(), recall.tolist(), thresholds.tolist()
        ([0.5, 0.667, 0.5, 1.0, 1.0], [1.0, 1.0, 0.5, 0.5, 0.0], [0.1, 0.35, 0.4, 0.8])
    """
    limit = _check_max_points(max_points)
    values, positive = _curve_inputs(maps_or_scores, targets)
    pooled = _Pooled(values, positive)
    _require(pooled.n_pos > 0, "precision-recall curve")
    thresholds, tp, fp = pooled.confusion_at_thresholds()
    precision = tp / (tp + fp)
    recall = tp / pooled.n_pos
    picked = _subsample(recall, precision, None if limit is None else limit - 1)
    if picked is not None:
        precision, recall, thresholds = precision[picked], recall[picked], thresholds[picked]
    return (
        np.append(precision[::-1], 1.0),
        np.append(recall[::-1], 0.0),
        np.ascontiguousarray(thresholds[::-1]),
    )


def roc_curve(
    maps_or_scores: ArrayLike, targets: ArrayLike, max_points: int | None = DEFAULT_MAX_POINTS
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Pooled ROC curve, in the layout of ``sklearn.metrics.roc_curve``.

    With ``max_points=None`` (or few distinct scores) the result equals scikit-learn's
    ``roc_curve(..., drop_intermediate=False)``: thresholds falling, starting at ``(0, 0)`` with
    threshold ``inf``. Otherwise the curve is thinned to at most ``max_points`` points spread
    evenly along its length (first and last kept), which is meant for plots only.

    Args:
        maps_or_scores: Scores of any shape (anomaly maps or image scores), pooled; finite.
        targets: Same shape; ``> 0`` marks defective samples.
        max_points: Largest number of points returned (``>= 4``), or ``None`` for all of them.

    Returns:
        ``(fpr, tpr, thresholds)`` as float64 arrays of equal length.

    Raises:
        ConfigError: Invalid input, or only one class present.

    Example:
        >>> fpr, tpr, thresholds = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        >>> fpr.tolist(), tpr.tolist(), thresholds.tolist()
        ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0], [inf, 0.8, 0.4, 0.35, 0.1])
    """
    limit = _check_max_points(max_points)
    values, positive = _curve_inputs(maps_or_scores, targets)
    pooled = _Pooled(values, positive)
    _require(pooled.n_pos > 0 and pooled.n_neg > 0, "ROC curve")
    thresholds, tp, fp = pooled.confusion_at_thresholds()
    fpr = np.concatenate(([0.0], fp / pooled.n_neg))
    tpr = np.concatenate(([0.0], tp / pooled.n_pos))
    thresholds = np.concatenate(([np.inf], thresholds))
    picked = _subsample(fpr, tpr, limit)
    if picked is not None:
        fpr, tpr, thresholds = fpr[picked], tpr[picked], thresholds[picked]
    return fpr, tpr, thresholds


def compute_all(
    maps: ArrayLike | None,
    masks: ArrayLike | None,
    scores: ArrayLike | None,
    labels: ArrayLike | None,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
) -> dict[str, float | None]:
    """Every metric of the MVTec AD protocol at once, sorting the pixels only once.

    Undefined metrics are ``None``, never NaN, and raise nothing: all pixel metrics but
    ``pixel_auprc``/``pixel_f1_*`` need normal pixels too, all of them need a defective pixel;
    ``aupro`` needs a ground-truth region and a normal pixel; ``image_auroc`` needs good and
    defective images, ``image_f1_*`` a defective one. Pass ``maps=masks=None`` (or
    ``scores=labels=None``) when there is no pixel (or image) data: those metrics are ``None``.
    Invalid input still raises.

    Args:
        maps: Anomaly maps ``(N, H, W)`` or ``None``.
        masks: Ground-truth masks of the same shape (``> 0`` = defective) or ``None``.
        scores: Image scores ``(N,)`` or ``None``; same ``N`` as the maps when both are given.
        labels: Image labels ``(N,)`` (``> 0`` = defective) or ``None``.
        fpr_limit: AUPRO integration limit in ``(0, 1]``.

    Returns:
        A dict with the keys of :data:`METRIC_KEYS`: ``pixel_auprc``, ``pixel_auroc``,
        ``image_auroc``, ``aupro``, ``pixel_f1_max``, ``pixel_f1_threshold``, ``image_f1_max``,
        ``image_f1_threshold``.

    Raises:
        ConfigError: Invalid input (shapes, empty arrays, NaN/Inf, ``fpr_limit``, only one of a
            pair given, or a different number of maps and scores).

    Example:
        >>> masks = np.zeros((2, 2, 2), dtype=bool)
        >>> masks[1, 0, 0] = True
        >>> maps = np.array([[[0.1, 0.2], [0.0, 0.1]], [[0.9, 0.3], [0.1, 0.0]]])
        >>> result = compute_all(maps, masks, [0.2, 0.9], [0, 1])
        >>> result["pixel_auroc"], result["aupro"], result["image_f1_max"]
        (1.0, 1.0, 1.0)
        >>> compute_all(maps, np.zeros_like(masks), [0.2, 0.9], [0, 0])["image_auroc"] is None
        True
    """
    limit = _check_fpr_limit(fpr_limit)
    if (maps is None) != (masks is None):
        raise ConfigError("give both maps and masks, or neither")
    if (scores is None) != (labels is None):
        raise ConfigError("give both scores and labels, or neither")
    pixel = None if maps is None else _pixel_inputs(maps, masks)
    image = None if scores is None else _image_inputs(scores, labels)
    if pixel is not None and image is not None and pixel[0].shape[0] != image[0].shape[0]:
        raise ConfigError(
            f"maps hold {pixel[0].shape[0]} image(s) but scores hold {image[0].shape[0]}; "
            "they must describe the same images"
        )
    result: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    if pixel is not None:
        pooled = _Pooled(*pixel, regions=True)
        result["pixel_auprc"] = pooled.average_precision()
        result["pixel_auroc"] = pooled.auroc()
        result["aupro"] = pooled.aupro(limit)
        best = pooled.f1_max()
        if best is not None:
            result["pixel_f1_max"], result["pixel_f1_threshold"] = best
        del pooled
    if image is not None:
        pooled = _Pooled(*image)
        result["image_auroc"] = pooled.auroc()
        best = pooled.f1_max()
        if best is not None:
            result["image_f1_max"], result["image_f1_threshold"] = best
    return result
