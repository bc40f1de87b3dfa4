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

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from patchknn.errors import ConfigError
from patchknn.metrics.checks import (
    check_fpr_limit,
    check_max_points,
    curve_inputs,
    defined,
    image_inputs,
    pixel_inputs,
    require,
)
from patchknn.metrics.pooled import Pooled, subsample

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
    scores, positive = pixel_inputs(maps, masks)
    return defined(Pooled(scores, positive).average_precision(), "pixel AUPRC")


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
    scores, positive = pixel_inputs(maps, masks)
    return defined(Pooled(scores, positive).auroc(), "pixel AUROC")


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
    values, positive = image_inputs(scores, labels)
    return defined(Pooled(values, positive).auroc(), "image AUROC")


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
    limit = check_fpr_limit(fpr_limit)
    scores, positive = pixel_inputs(maps, masks)
    return defined(Pooled(scores, positive, regions=True).aupro(limit), "AUPRO")


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
    limit = check_max_points(max_points)
    scores, positive = pixel_inputs(maps, masks)
    fpr, pro = defined(Pooled(scores, positive, regions=True).pro_vertices(), "PRO curve")
    picked = subsample(fpr, pro, limit)
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
    scores, positive = pixel_inputs(maps, masks)
    return defined(Pooled(scores, positive).f1_max(), "pixel F1")


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
    values, positive = image_inputs(scores, labels)
    f1, threshold = defined(Pooled(values, positive).f1_max(), "image F1")
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
    limit = check_max_points(max_points)
    values, positive = curve_inputs(maps_or_scores, targets)
    pooled = Pooled(values, positive)
    require(pooled.n_pos > 0, "precision-recall curve")
    thresholds, tp, fp = pooled.confusion_at_thresholds()
    precision = tp / (tp + fp)
    recall = tp / pooled.n_pos
    picked = subsample(recall, precision, None if limit is None else limit - 1)
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
    limit = check_max_points(max_points)
    values, positive = curve_inputs(maps_or_scores, targets)
    pooled = Pooled(values, positive)
    require(pooled.n_pos > 0 and pooled.n_neg > 0, "ROC curve")
    thresholds, tp, fp = pooled.confusion_at_thresholds()
    fpr = np.concatenate(([0.0], fp / pooled.n_neg))
    tpr = np.concatenate(([0.0], tp / pooled.n_pos))
    thresholds = np.concatenate(([np.inf], thresholds))
    picked = subsample(fpr, tpr, limit)
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
    limit = check_fpr_limit(fpr_limit)
    if (maps is None) != (masks is None):
        raise ConfigError("give both maps and masks, or neither")
    if (scores is None) != (labels is None):
        raise ConfigError("give both scores and labels, or neither")
    pixel = None if maps is None else pixel_inputs(maps, masks)
    image = None if scores is None else image_inputs(scores, labels)
    if pixel is not None and image is not None and pixel[0].shape[0] != image[0].shape[0]:
        raise ConfigError(
            f"maps hold {pixel[0].shape[0]} image(s) but scores hold {image[0].shape[0]}; "
            "they must describe the same images"
        )
    result: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    if pixel is not None:
        pooled = Pooled(*pixel, regions=True)
        result["pixel_auprc"] = pooled.average_precision()
        result["pixel_auroc"] = pooled.auroc()
        result["aupro"] = pooled.aupro(limit)
        best = pooled.f1_max()
        if best is not None:
            result["pixel_f1_max"], result["pixel_f1_threshold"] = best
        del pooled
    if image is not None:
        pooled = Pooled(*image)
        result["image_auroc"] = pooled.auroc()
        best = pooled.f1_max()
        if best is not None:
            result["image_f1_max"], result["image_f1_threshold"] = best
    return result
