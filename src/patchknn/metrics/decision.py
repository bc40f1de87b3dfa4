"""The decision at a threshold: image-level precision/recall/F1 and pooled pixel F1 of
``score >= threshold`` (what a calibrated threshold does on a labelled test set)."""

from __future__ import annotations

import numpy as np

__all__ = ["prf", "threshold_metrics"]


def threshold_metrics(
    maps: np.ndarray | None,
    masks: np.ndarray | None,
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float | None,
) -> dict[str, float | None]:
    """Image-level precision/recall/F1 and pooled pixel F1 of the decision ``score >= threshold``.

    Every value is ``None`` without a threshold; precision is ``None`` when nothing is predicted
    defective; recall and F1 are ``None`` without defective images (pixels).

    Example:
        >>> m = threshold_metrics(None, None, np.array([0.1, 0.5, 0.9]), np.array([0, 1, 1]), 0.6)
        >>> m["threshold_image_precision"], m["threshold_image_recall"]
        (1.0, 0.5)
    """
    keys = ("threshold_image_precision", "threshold_image_recall", "threshold_image_f1", "threshold_pixel_f1")
    out: dict[str, float | None] = dict.fromkeys(keys)
    if threshold is None:
        return out
    pred = np.asarray(scores) >= threshold
    truth = np.asarray(labels) > 0
    p, r, f = prf(int((pred & truth).sum()), int(pred.sum()), int(truth.sum()))
    out |= {"threshold_image_precision": p, "threshold_image_recall": r, "threshold_image_f1": f}
    if maps is not None and masks is not None:
        tp = fp = pos = 0
        for amap, mask in zip(maps, masks):  # one image at a time: no (N, H, W) bool temporaries
            hit = amap >= threshold
            gt = mask > 0
            tp += int(np.count_nonzero(hit & gt))
            fp += int(np.count_nonzero(hit & ~gt))
            pos += int(np.count_nonzero(gt))
        out["threshold_pixel_f1"] = prf(tp, tp + fp, pos)[2]
    return out


def prf(tp: int, predicted: int, positive: int) -> tuple[float | None, float | None, float | None]:
    precision = tp / predicted if predicted else None
    recall = tp / positive if positive else None
    if positive == 0:
        return precision, recall, None
    f1 = 2 * tp / (predicted + positive)
    return precision, recall, float(f1)
