"""What the report page needs from an evaluation, saved while the arrays are in memory.

``patchknn evaluate --report DIR`` calls :class:`ReportCollector` after each category
(``evaluate(on_category=...)``). It keeps what the page needs and nothing that needs the maps
again, so ``patchknn report DIR/results.json`` can rebuild the page later::

    DIR/
      index.html                  the page (rebuilt by `patchknn report DIR/results.json`)
      results.json                the results document of `patchknn evaluate`
      assets/<category>.json      curves (thinned), test image scores, calibration statistics,
                                  colour scale, gallery entries
      assets/<category>/*.png     gallery images: input | ground truth | heat-map overlay

Plots are drawn from the JSON when the page is written and embedded in it (base64 PNG); gallery
images are files referenced relatively, so the page works offline as long as the folder stays
together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchknn import metrics
from patchknn.errors import PatchKNNError
from patchknn.execution import progress_bar
from patchknn.report.layout import (
    ASSETS,
    DATA_FORMAT,
    DATA_VERSION,
    safe_name,
)

CURVE_POINTS = 400
GALLERY_HEIGHT = 256


class ReportCollector:
    """Callable for ``evaluate(on_category=...)``: writes ``assets/<category>.json`` and gallery PNGs.

    Args:
        directory: the report folder (created).
        per_kind: gallery images per kind (false positives, misses, detections).
        progress: progress bars (only when stderr is a terminal).

    Example:
        >>> collector = ReportCollector("report")                                   # doctest: +SKIP
        >>> results = evaluate(root, ["bottle"], config, on_category=collector)     # doctest: +SKIP
        >>> collector.finish(results)                                               # doctest: +SKIP
        PosixPath('report/index.html')
    """

    def __init__(self, directory: str | Path, *, per_kind: int = 4, progress: bool = True) -> None:
        self.directory = Path(directory)
        self.per_kind = per_kind
        self.progress = progress
        self.categories: list[str] = []
        (self.directory / ASSETS).mkdir(parents=True, exist_ok=True)

    def __call__(self, ev: Any) -> None:
        self.add(ev)

    def add(self, ev: Any) -> Path:
        """Save the report data of one :class:`~patchknn.evaluation.CategoryEvaluation`."""
        data = category_data(ev, self.directory, per_kind=self.per_kind, progress=self.progress)
        path = self.directory / ASSETS / f"{safe_name(ev.category)}.json"
        path.write_text(json.dumps(data, indent=1, allow_nan=False))
        self.categories.append(ev.category)
        return path

    def finish(self, results: dict[str, Any], *, title: str | None = None) -> Path:
        """Write ``results.json`` and ``index.html`` into the folder; returns the page's path."""
        from patchknn.report.html import write_report

        results_path = self.directory / "results.json"
        results_path.write_text(json.dumps(results, indent=2))
        return write_report(results_path, self.directory / "index.html", title=title, progress=self.progress)


def category_data(ev: Any, directory: Path, *, per_kind: int = 4, progress: bool = True) -> dict[str, Any]:
    """The JSON-ready report data of one category (writes its gallery PNGs under ``directory``)."""
    from patchknn.visualize import model_scale

    row = ev.metrics
    maps, masks, scores, labels = ev.maps, ev.masks, ev.scores, ev.labels
    threshold = ev.model.threshold_
    f1_threshold = row.get("image_f1_threshold")
    scale = model_scale(ev.model)
    scale_source = "model"
    if scale is None:
        scale, scale_source = _test_scale(maps, scores, labels), "test"
    # the outline in the gallery: the calibrated threshold, else the F1-optimal one (labels needed)
    outline, outline_kind = (threshold, "calibrated") if threshold is not None else (f1_threshold, "f1_optimal")

    with progress_bar(4, f"report {ev.category}: curves", progress, unit="it") as bar:
        curves = _curves(maps, masks, scores, labels, bar)
    names = [f"{s.defect}/{Path(s.path).name}" for s in ev.samples]
    gallery = _gallery(ev, names, outline, scale, directory, per_kind, progress)
    cal = dict(ev.model.fit_info_.get("calibration") or {})
    return {
        "format": DATA_FORMAT,
        "version": DATA_VERSION,
        "category": ev.category,
        "metrics": row,
        "threshold": threshold,
        "threshold_method": ev.model.config.threshold_method,
        "f1_threshold": f1_threshold,
        "outline_threshold": outline,
        "outline_kind": outline_kind,
        "calibration": cal,
        "color_scale": {"vmin": scale[0], "vmax": scale[1], "source": scale_source},
        "curves": curves,
        "images": [
            {"name": n, "defect": s.defect, "label": int(lab), "score": float(sc)}
            for n, s, lab, sc in zip(names, ev.samples, labels, scores)
        ],
        "gallery": gallery,
    }


# ------------------------------------------------------------------------------------ curves
def _curves(maps: np.ndarray, masks: np.ndarray, scores: np.ndarray, labels: np.ndarray, bar: Any) -> dict:
    out: dict[str, Any] = {"pr": None, "roc": None, "pro": None, "image_roc": None}
    try:
        p, r, t = metrics.precision_recall_curve(maps, masks, max_points=CURVE_POINTS)
        out["pr"] = {"precision": _r(p), "recall": _r(r), "thresholds": _r(t)}
    except PatchKNNError:
        pass
    bar.update(1)
    try:
        fpr, tpr, t = metrics.roc_curve(maps, masks, max_points=CURVE_POINTS)
        out["roc"] = {"fpr": _r(fpr), "tpr": _r(tpr), "thresholds": _r(np.where(np.isfinite(t), t, np.nan))}
    except PatchKNNError:
        pass
    bar.update(1)
    try:
        fpr, pro = metrics.pro_curve(maps, masks, max_points=CURVE_POINTS)
        out["pro"] = {"fpr": _r(fpr), "pro": _r(pro)}
    except PatchKNNError:
        pass
    bar.update(1)
    try:
        fpr, tpr, _ = metrics.roc_curve(scores, labels, max_points=CURVE_POINTS)
        out["image_roc"] = {"fpr": _r(fpr), "tpr": _r(tpr)}
    except PatchKNNError:
        pass
    bar.update(1)
    return out


def _r(values: np.ndarray) -> list[float | None]:
    """Rounded floats for JSON (NaN -> None)."""
    return [None if not np.isfinite(v) else float(f"{v:.6g}") for v in np.asarray(values, dtype=np.float64)]


def _test_scale(maps: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """A fixed colour scale when the model is uncalibrated: from the good test images (else all)."""
    good = labels == 0
    ref_maps = maps[good] if good.any() else maps
    vmin = float(np.median(ref_maps[:: max(1, len(ref_maps) // 16)]))
    ref = float(np.quantile(scores[good], 0.99)) if good.any() else float(np.quantile(scores, 0.5))
    if not ref > vmin:
        ref = vmin + 1.0
    return vmin, vmin + (ref - vmin) * 1.5


# ----------------------------------------------------------------------------------- gallery
def select_gallery(
    scores: np.ndarray, labels: np.ndarray, overlap: np.ndarray, per_kind: int
) -> dict[str, list[int]]:
    """Indices of the worst false positives, worst misses and best detections.

    False positives: good images by descending score. Misses: defective images by ascending
    score. Detections: defective images by descending ``overlap`` (IoU of the predicted region
    with the truth; score breaks ties), leaving out those already shown as misses.

    Example:
        >>> s = np.array([0.9, 0.1, 0.5, 0.8, 0.7]); y = np.array([0, 0, 1, 1, 1])
        >>> select_gallery(s, y, np.array([0, 0, 0.1, 0.6, 0.3]), 1)
        {'false_positives': [0], 'misses': [2], 'detections': [3]}
    """
    good = np.flatnonzero(labels == 0)
    bad = np.flatnonzero(labels > 0)
    fps = good[np.argsort(-scores[good], kind="stable")][:per_kind]
    misses = bad[np.argsort(scores[bad], kind="stable")][:per_kind]
    rest = np.setdiff1d(bad, misses)
    order = np.lexsort((-scores[rest], -overlap[rest]))
    dets = rest[order][:per_kind]
    return {
        "false_positives": [int(i) for i in fps],
        "misses": [int(i) for i in misses],
        "detections": [int(i) for i in dets],
    }


def _gallery(
    ev: Any,
    names: list[str],
    outline: float | None,
    scale: tuple[float, float],
    directory: Path,
    per_kind: int,
    progress: bool,
) -> dict[str, list[dict[str, Any]]]:
    from patchknn.data import load_image
    from patchknn.visualize import comparison, save_png

    maps, masks, scores, labels = ev.maps, ev.masks, ev.scores, ev.labels
    overlap = np.zeros(len(scores))
    if outline is not None:
        for i in np.flatnonzero(labels > 0):
            pred, gt = maps[i] >= outline, masks[i] > 0
            union = np.count_nonzero(pred | gt)
            overlap[i] = np.count_nonzero(pred & gt) / union if union else 0.0
    chosen = select_gallery(np.asarray(scores), np.asarray(labels), overlap, per_kind)
    folder = directory / ASSETS / safe_name(ev.category)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    total = sum(len(v) for v in chosen.values())
    out: dict[str, list[dict[str, Any]]] = {}
    with progress_bar(total, f"report {ev.category}: gallery", progress, unit="it") as bar:
        for kind, indices in chosen.items():
            entries = []
            for rank, i in enumerate(indices, 1):
                image = load_image(ev.samples[i].path)
                panel = comparison(
                    image, maps[i], mask=masks[i], vmin=scale[0], vmax=scale[1], threshold=outline
                )
                panel = _fit_height(panel, GALLERY_HEIGHT)
                file = folder / f"{kind}-{rank}-{safe_name(str(Path(names[i]).with_suffix('')))}.png"
                save_png(file, panel)
                flagged = None if outline is None else bool(scores[i] >= outline)
                entries.append(
                    {
                        "file": file.relative_to(directory).as_posix(),
                        "name": names[i],
                        "label": int(labels[i]),
                        "score": float(scores[i]),
                        "verdict": None if flagged is None else ("NG" if flagged else "OK"),
                        "iou": None if labels[i] == 0 or outline is None else round(float(overlap[i]), 4),
                    }
                )
                bar.update(1)
            out[kind] = entries
    return out


def _fit_height(panel: np.ndarray, height: int) -> np.ndarray:
    if panel.shape[0] <= height:
        return panel
    width = round(panel.shape[1] * height / panel.shape[0])
    return np.asarray(Image.fromarray(panel).resize((width, height), Image.Resampling.LANCZOS))
