"""The pooled, sorted scores of the defective and normal samples that every metric reads off
(binary searches instead of a loop over thresholds), and AUPRO's region weights."""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

FloatArray = NDArray[np.floating[Any]]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]

REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
REGION_STRUCTURE[1] = True


# -- input checks ------------------------------------------------------------------------------


def group_starts(sorted_values: np.ndarray) -> IntArray:
    """Index of the first element of each run of equal values in an ascending array."""
    if sorted_values.size == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.empty(sorted_values.size, dtype=bool)
    change[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=change[1:])
    return np.flatnonzero(change)


def region_weights(positive: BoolArray) -> tuple[FloatArray, int]:
    """``1 / region size`` for each defective pixel (in C order) and the number of regions.

    Regions are the 8-connected components of each image's mask (``scipy.ndimage.label`` with a 3x3
    ones structure, as in the official MVTec AD evaluation); images never connect to each other.
    """
    labels, n_regions = ndimage.label(positive, structure=REGION_STRUCTURE)
    region_of_pixel = labels[positive]
    del labels
    sizes = np.bincount(region_of_pixel, minlength=n_regions + 1)
    return 1.0 / sizes[region_of_pixel], int(n_regions)


class Pooled:
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
            weights, self.n_regions = region_weights(positive)
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
        starts = group_starts(self.pos)
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
        pos_values = self.pos[group_starts(self.pos)]
        neg_values = self.neg[group_starts(self.neg)]
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
        starts = first + group_starts(neg[first:])
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


def subsample(x: FloatArray, y: FloatArray, max_points: int | None) -> IntArray | None:
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
