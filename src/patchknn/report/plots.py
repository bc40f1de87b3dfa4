"""The report's plots, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

Each function takes the category data of :mod:`patchknn.report.collect` and returns PNG bytes,
or ``None`` when the data for that plot is undefined (e.g. no defective test image).

Example:
    >>> png = colorbar_png(0.0, 3.0, threshold=2.0)
    >>> png[:4] == b"\\x89PNG"
    True
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from patchknn.visualize import COLORMAP

GOOD_COLOR = "#2b8cbe"
BAD_COLOR = "#e34a33"
HELD_OUT_COLOR = "#636363"
THRESHOLD_COLOR = "#111111"
F1_COLOR = "#31a354"
SIZE = (3.3, 2.8)
DPI = 140


def _figure(size: tuple[float, float] = SIZE) -> tuple[Figure, Any]:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.tick_params(labelsize=7)
    ax.xaxis.label.set_size(8)
    ax.yaxis.label.set_size(8)
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _arr(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _operating_point(x: np.ndarray, y: np.ndarray, thresholds: np.ndarray, threshold: float | None):
    """The curve point whose threshold is the closest to ``threshold`` (``None`` if none)."""
    if threshold is None or thresholds.size == 0:
        return None
    finite = np.isfinite(thresholds)
    if not finite.any():
        return None
    idx = np.flatnonzero(finite)
    j = idx[np.argmin(np.abs(thresholds[idx] - threshold))]
    return float(x[j]), float(y[j])


def pr_png(data: dict[str, Any]) -> bytes | None:
    """Pixel-level precision-recall curve, with the calibrated threshold's operating point."""
    m = data.get("metrics", {})

    def extras(ax: Any, curve: dict[str, Any], r: np.ndarray, p: np.ndarray) -> None:
        paper = m.get("paper_pixel_auprc")
        if paper is not None:
            ax.plot([], [], " ", label=f"paper (Table 2) {paper:.3f}")
        base = m.get("pixel_positive_rate")
        if base is None:
            base = _positive_rate(data)
        if base is not None:
            ax.axhline(base, color="#999999", linestyle=":", linewidth=1, label=f"chance {base:.3f}")
        # thresholds are one shorter than the curve (the final (1, 0) point has none)
        point = _operating_point(r[:-1], p[:-1], _arr(curve["thresholds"]), data.get("threshold"))
        _mark(ax, point, "calibrated threshold")

    return _curve_png(data, ("pr", "recall", "precision"), f"pixel AUPRC {_f(m.get('pixel_auprc'))}", extras,
                      "Pixel precision-recall", "lower left", xlabel="recall (defective pixels found)",
                      ylabel="precision")


def roc_png(data: dict[str, Any]) -> bytes | None:
    """Pixel-level ROC curve (and the image-level one), with the calibrated operating point."""
    m = data.get("metrics", {})

    def extras(ax: Any, curve: dict[str, Any], fpr: np.ndarray, tpr: np.ndarray) -> None:
        image = data["curves"].get("image_roc")
        if image:
            ax.plot(_arr(image["fpr"]), _arr(image["tpr"]), color=GOOD_COLOR, linewidth=1.2, linestyle="--",
                    drawstyle="steps-post", label=f"image AUROC {_f(m.get('image_auroc'))}")
        ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1)
        point = _operating_point(fpr, tpr, _arr(curve["thresholds"]), data.get("threshold"))
        _mark(ax, point, "calibrated threshold (pixels)")

    return _curve_png(data, ("roc", "fpr", "tpr"), f"pixel AUROC {_f(m.get('pixel_auroc'))}", extras, "ROC",
                      "lower right", xlabel="false-positive rate", ylabel="true-positive rate")


def pro_png(data: dict[str, Any], fpr_limit: float = 0.3) -> bytes | None:
    """Per-region overlap (PRO) curve; the AUPRO integration range is shaded."""
    m = data.get("metrics", {})

    def extras(ax: Any, *_: Any) -> None:
        ax.axvspan(0, fpr_limit, color="#f0f0f0", zorder=0)
        ax.axvline(fpr_limit, color="#999999", linestyle=":", linewidth=1)

    return _curve_png(data, ("pro", "fpr", "pro"), f"AUPRO@{fpr_limit:g} {_f(m.get('aupro'))}", extras,
                      "Per-region overlap (PRO)", "lower right", xlabel="false-positive rate (normal pixels)",
                      ylabel="per-region overlap")


def histogram_png(data: dict[str, Any]) -> bytes | None:
    """Image scores of good vs defective test images (and the held-out normal training images),
    with the calibrated and the F1-optimal thresholds marked."""
    images = data.get("images") or []
    if not images:
        return None
    scores = np.array([x["score"] for x in images], dtype=np.float64)
    labels = np.array([x["label"] for x in images])
    held_out = np.array((data.get("calibration") or {}).get("image_scores") or [], dtype=np.float64)
    thr, f1_thr = data.get("threshold"), data.get("f1_threshold")
    every = np.concatenate([scores, held_out, [v for v in (thr, f1_thr) if v is not None]])
    lo, hi = float(every.min()), float(every.max())
    bins = np.linspace(lo, hi + 1e-9 if hi == lo else hi, 31)
    fig, ax = _figure()
    if (labels == 0).any():
        ax.hist(scores[labels == 0], bins=bins, color=GOOD_COLOR, alpha=0.6,
                label=f"good test ({int((labels == 0).sum())})")
    if (labels > 0).any():
        ax.hist(scores[labels > 0], bins=bins, color=BAD_COLOR, alpha=0.6,
                label=f"defective test ({int((labels > 0).sum())})")
    if held_out.size:
        ax.hist(held_out, bins=bins, histtype="step", color=HELD_OUT_COLOR, linewidth=1.4,
                label=f"held-out train ({held_out.size})")
    if thr is not None:
        ax.axvline(thr, color=THRESHOLD_COLOR, linewidth=1.6, label=f"calibrated {thr:.3g}")
    if f1_thr is not None:
        ax.axvline(f1_thr, color=F1_COLOR, linewidth=1.6, linestyle="--", label=f"F1-optimal {f1_thr:.3g}")
    return _finish(fig, ax, "Image scores", "best", xlabel="image score", ylabel="images",
                   legend={"frameon": True, "framealpha": 0.85, "edgecolor": "none"})


def colorbar_png(vmin: float, vmax: float, threshold: float | None = None, *, width: float = 4.0) -> bytes:
    """A horizontal colour bar of the gallery's heat-map scale, the threshold marked."""
    fig = Figure(figsize=(width, 0.75), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.03, 0.5, 0.94, 0.3))
    ax.imshow(np.linspace(0, 1, 256)[None, :], aspect="auto", cmap=COLORMAP, extent=(vmin, vmax, 0, 1))
    ax.set_yticks([])
    ax.tick_params(labelsize=7)
    if threshold is not None and vmin <= threshold <= vmax:
        ax.axvline(threshold, color="#00ffff", linewidth=2)
        ax.text(threshold, 1.05, "threshold", color="#333333", fontsize=7, ha="center", va="bottom",
                transform=ax.get_xaxis_transform())
    ax.set_xlabel("anomaly score (colours clip at both ends)", fontsize=7, labelpad=1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _curve_png(
    data: dict[str, Any], curve_xy: tuple[str, str, str], label: str, extras: Callable[..., None], title: str,
    legend_loc: str, **axes: Any,
) -> bytes | None:
    """The plot of a stored curve ``(name, x key, y key)``: its main line, what ``extras(ax, curve,
    x, y)`` adds, axes on [0, 1]; ``None`` when the report data have no such curve."""
    kind, x, y = curve_xy
    curve = (data.get("curves") or {}).get(kind)
    if not curve:
        return None
    xs, ys = _arr(curve[x]), _arr(curve[y])
    fig, ax = _figure()
    ax.plot(xs, ys, color=BAD_COLOR, linewidth=1.8, label=label)
    extras(ax, curve, xs, ys)
    return _finish(fig, ax, title, legend_loc, xlim=(0, 1), ylim=(0, 1.02), **axes)


def _mark(ax: Any, point: tuple[float, float] | None, label: str) -> None:
    """The calibrated threshold's operating point on a curve (when the curve reaches it)."""
    if point is not None:
        ax.plot(*point, "o", color=THRESHOLD_COLOR, markersize=6, label=label)


def _finish(fig: Any, ax: Any, title: str, legend_loc: str, *, legend: dict[str, Any] | None = None,
            **axes: Any) -> bytes:
    """Axes labels and limits, the title and the legend of every plot; the figure as PNG bytes."""
    ax.set(**axes)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc=legend_loc, **(legend or {"frameon": False}))
    return _png(fig)


def _positive_rate(data: dict[str, Any]) -> float | None:
    """Share of defective pixels, read off the PR curve's first point (recall 1 at the lowest
    threshold, where every pixel is predicted defective)."""
    curve = (data.get("curves") or {}).get("pr")
    if not curve or not curve["precision"] or curve["recall"][0] != 1.0:
        return None
    return curve["precision"][0]


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


__all__ = ["colorbar_png", "histogram_png", "pr_png", "pro_png", "roc_png"]
