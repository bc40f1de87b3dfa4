"""Heat-map overlays: the image, its anomaly map in a perceptual colour map, the defect contour.

Colours should mean the same on every image of a model: pass the range of
:func:`color_scale` (from the model's normal-score statistics) as
``vmin``/``vmax``, or use :func:`model_scale`. ``vmax=None`` falls back to each map's own
maximum, which makes every image look anomalous; say so where you show such images.

Example:
    >>> import numpy as np
    >>> img = np.zeros((64, 64, 3), np.uint8); amap = np.zeros((64, 64), np.float32)
    >>> overlay(img, amap, vmax=1.0).shape
    (64, 64, 3)
    >>> mask = np.zeros((64, 64), bool)
    >>> comparison(img, amap, mask=mask, vmax=1.0, threshold=0.5).shape  # input | truth | map
    (64, 200, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

COLORMAP = "inferno"
PREDICTED_COLOR = (0, 255, 255)  # cyan: the predicted defect region (map >= threshold)
TRUTH_COLOR = (0, 230, 0)  # green: the ground-truth defect region
GAP = 4


def colorize(amap: np.ndarray, vmin: float = 0.0, vmax: float | None = None, cmap: str = COLORMAP) -> np.ndarray:
    """Anomaly map ``(H, W)`` -> uint8 RGB ``(H, W, 3)``; values clipped to ``[vmin, vmax]``.

    ``vmax=None`` uses the map's own maximum (relative colours: say so where you show them).
    """
    return np.ascontiguousarray(colormaps[cmap](normalize(amap, vmin, vmax), bytes=True)[..., :3])


def normalize(amap: np.ndarray, vmin: float = 0.0, vmax: float | None = None) -> np.ndarray:
    """``(amap - vmin) / (vmax - vmin)`` clipped to ``[0, 1]``, float32."""
    hi = float(amap.max()) if vmax is None else float(vmax)
    span = max(hi - vmin, 1e-12)
    return np.clip((amap.astype(np.float32) - vmin) / span, 0.0, 1.0)


def model_scale(model: Any, threshold: float | None = None) -> tuple[float, float] | None:
    """The colour range of a fitted :class:`~patchknn.model.PatchKNN` (``None``: uncalibrated)."""
    thr = threshold if threshold is not None else getattr(model, "threshold_", None)
    return color_scale(getattr(model, "fit_info_", None), thr)


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary pixels of a binary mask."""
    mask = mask.astype(bool)
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    *,
    vmin: float = 0.0,
    vmax: float | None = None,
    threshold: float | None = None,
    alpha: float = 0.65,
    alpha_min: float | None = 0.0,
    contour_color: tuple[int, int, int] = PREDICTED_COLOR,
) -> np.ndarray:
    """Blend the colourised map over the image; outline ``amap >= threshold`` when given.

    Args:
        image: uint8 RGB ``(h, w, 3)`` (or grayscale ``(h, w)``); resized (bilinear) to the map's
            size if they differ.
        amap: ``(H, W)`` anomaly map.
        vmin, vmax: colour range (``vmax=None``: the map's maximum).
        threshold: draw the contour of the predicted defect region.
        alpha: weight of the heat map where it is hottest.
        alpha_min: weight of the heat map where it is coldest; the weight grows linearly between
            the two, so normal regions keep the look of the image. ``None`` = ``alpha`` everywhere.
        contour_color: RGB of the contour.
    """
    h, w = amap.shape
    image = _rgb(image, (h, w))
    norm = normalize(amap, vmin, vmax)
    heat = colormaps[COLORMAP](norm, bytes=True)[..., :3].astype(np.float32)
    lo = alpha if alpha_min is None else alpha_min
    weight = (lo + (alpha - lo) * norm)[..., None]
    out = (1 - weight) * image.astype(np.float32) + weight * heat
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if threshold is not None:
        out[contour(amap >= threshold, _line_width(h, w))] = contour_color
    return out


def truth_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    color: tuple[int, int, int] = TRUTH_COLOR,
    alpha: float = 0.35,
) -> np.ndarray:
    """The image with the ground-truth defect region tinted and outlined (an empty mask: the image)."""
    h, w = mask.shape
    out = _rgb(image, (h, w)).astype(np.float32)
    region = mask.astype(bool)
    out[region] = (1 - alpha) * out[region] + alpha * np.array(color, np.float32)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    out[contour(region, _line_width(h, w))] = color
    return out


def mask_image(mask: np.ndarray) -> np.ndarray:
    """A binary mask as a uint8 grayscale image (0 = normal, 255 = defect)."""
    return np.where(mask.astype(bool), np.uint8(255), np.uint8(0))


def side_by_side(panels: Sequence[np.ndarray], gap: int = GAP, background: int = 255) -> np.ndarray:
    """Panels of equal height (RGB or grayscale) next to each other, ``gap`` pixels apart."""
    rgb = [_rgb(p, None) for p in panels]
    h = max(p.shape[0] for p in rgb)
    rgb = [p if p.shape[0] == h else _rgb(p, (h, round(p.shape[1] * h / p.shape[0]))) for p in rgb]
    width = sum(p.shape[1] for p in rgb) + gap * (len(rgb) - 1)
    out = np.full((h, width, 3), background, np.uint8)
    x = 0
    for p in rgb:
        out[:, x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def comparison(
    image: np.ndarray,
    amap: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    vmin: float = 0.0,
    vmax: float | None = None,
    threshold: float | None = None,
    gap: int = GAP,
) -> np.ndarray:
    """``input | ground truth | heat-map overlay`` side by side (no ground-truth panel without ``mask``).

    The ground truth is tinted green; the predicted region (``amap >= threshold``) outlined cyan.
    """
    h, w = amap.shape
    base = _rgb(image, (h, w))
    panels = [base]
    if mask is not None:
        panels.append(truth_overlay(base, mask))
    panels.append(overlay(base, amap, vmin=vmin, vmax=vmax, threshold=threshold))
    return side_by_side(panels, gap=gap)


def save_png(path: Any, array: np.ndarray) -> None:
    """Write a uint8 RGB or grayscale array as PNG."""
    Image.fromarray(array).save(str(path), format="PNG", optimize=True)


def save_prediction_files(
    output: Path,
    stem: str,
    prediction: Any,
    image: np.ndarray,
    *,
    scale: tuple[float, float] | None,
    maps: bool = True,
    overlays: bool = True,
) -> dict[str, str | None]:
    """Write what ``patchknn predict`` writes for one scored image, named ``stem``, under ``output``.

    ``maps/STEM.npy`` (the anomaly map) and, when the prediction has a threshold, ``masks/STEM.png``
    (the binary defect mask) with ``maps``; ``overlays/STEM.png`` (the heat map over ``image``, on the
    colour ``scale`` of :func:`model_scale`, ``None`` = each map's own range, the predicted region
    outlined) with ``overlays``. Returns ``{"map", "overlay", "mask"}``: each path relative to
    ``output``, or ``None`` where nothing was written.

    Args:
        output: the results folder (subfolders are made as needed).
        stem: the file name without suffix, unique among the images written there.
        prediction: a :class:`~patchknn.scoring.Prediction` without error.
        image: the decoded image (uint8 RGB), resized to the map's size for the overlay.
    """
    written: dict[str, str | None] = {"map": None, "overlay": None, "mask": None}
    amap = prediction.anomaly_map
    if maps:
        (output / "maps").mkdir(parents=True, exist_ok=True)
        np.save(output / "maps" / f"{stem}.npy", amap, allow_pickle=False)
        written["map"] = f"maps/{stem}.npy"
    if overlays:
        (output / "overlays").mkdir(parents=True, exist_ok=True)
        vmin, vmax = scale if scale is not None else (0.0, None)
        save_png(output / "overlays" / f"{stem}.png", overlay(image, amap, vmin=vmin, vmax=vmax,
                                                              threshold=prediction.threshold))
        written["overlay"] = f"overlays/{stem}.png"
    if maps and prediction.mask is not None:
        (output / "masks").mkdir(parents=True, exist_ok=True)
        save_png(output / "masks" / f"{stem}.png", mask_image(prediction.mask))
        written["mask"] = f"masks/{stem}.png"
    return written


# ------------------------------------------------------------------------------------ helpers
def _rgb(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 RGB, resized (bilinear) to ``size = (h, w)`` when given and different."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    elif image.shape[2] == 4:
        image = image[..., :3]
    if size is not None and image.shape[:2] != tuple(size):
        h, w = size
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(image)


def _line_width(h: int, w: int) -> int:
    return max(1, round(max(h, w) / 300))


__all__ = [
    "COLORMAP",
    "colorize",
    "comparison",
    "contour",
    "mask_image",
    "model_scale",
    "normalize",
    "overlay",
    "save_png",
    "save_prediction_files",
    "side_by_side",
    "truth_overlay",
]


#: The reference value (the threshold) sits at this fraction of the colour range.
REFERENCE_POSITION = 2.0 / 3.0


def color_scale(
    fit_info: dict[str, Any] | None, threshold: float | None = None
) -> tuple[float, float] | None:
    """A colour range ``(vmin, vmax)`` that means the same on every image of a model.

    ``vmin`` is the median patch score of held-out normal images (typical normal texture is
    dark); the reference value, the decision threshold (``threshold`` when given, else the
    calibrated one, else the 99th percentile of held-out normal image scores), sits at 2/3 of the
    range, so the predicted defect outline is always drawn at the same colour. Without
    calibration statistics: ``(0, 1.5 * threshold)`` when a threshold is given, else ``None``
    (the caller must fall back to a per-image scale and say so).
    """
    cal = (fit_info or {}).get("calibration") or {}
    patch, image = cal.get("patch") or {}, cal.get("image") or {}
    ref = threshold if threshold is not None else cal.get("threshold")
    if ref is None:
        ref = image.get("q99")
    if ref is None:
        return None
    vmin = float(patch.get("q50", 0.0))
    if not vmin < ref:
        vmin = 0.0 if ref > 0 else float(ref) - 1.0
    vmax = vmin + (float(ref) - vmin) / REFERENCE_POSITION
    return vmin, vmax
