"""Heat-map overlays: the image, its anomaly map in a perceptual colour map, the defect contour.

Example:
    >>> import numpy as np
    >>> img = np.zeros((64, 64, 3), np.uint8); amap = np.zeros((64, 64), np.float32)
    >>> overlay(img, amap, vmax=1.0).shape
    (64, 64, 3)
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

COLORMAP = "inferno"


def colorize(amap: np.ndarray, vmin: float = 0.0, vmax: float | None = None, cmap: str = COLORMAP) -> np.ndarray:
    """Anomaly map ``(H, W)`` -> uint8 RGB ``(H, W, 3)``; values clipped to ``[vmin, vmax]``.

    ``vmax=None`` uses the map's own maximum (relative colours: say so where you show them).
    """
    hi = float(amap.max()) if vmax is None else float(vmax)
    span = max(hi - vmin, 1e-12)
    norm = np.clip((amap.astype(np.float32) - vmin) / span, 0.0, 1.0)
    rgba = colormaps[cmap](norm, bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


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
    alpha: float = 0.5,
    contour_color: tuple[int, int, int] = (0, 255, 255),
) -> np.ndarray:
    """Blend the colourised map over the image; outline ``amap >= threshold`` when given.

    Args:
        image: uint8 RGB ``(h, w, 3)``; resized (bilinear) to the map's size if they differ.
        amap: ``(H, W)`` anomaly map.
        vmin, vmax: colour range (``vmax=None``: the map's maximum).
        threshold: draw the contour of the predicted defect region.
        alpha: weight of the heat map.
        contour_color: RGB of the contour.
    """
    h, w = amap.shape
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    heat = colorize(amap, vmin, vmax).astype(np.float32)
    out = (1 - alpha) * image.astype(np.float32) + alpha * heat
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if threshold is not None:
        width = max(1, round(max(h, w) / 300))
        out[contour(amap >= threshold, width)] = contour_color
    return out


def save_png(path: str, array: np.ndarray) -> None:
    """Write a uint8 RGB or grayscale array as PNG."""
    Image.fromarray(array).save(path, format="PNG")
