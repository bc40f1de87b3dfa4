"""The guided filter (He, Sun and Tang, "Guided Image Filtering", ECCV 2010 / TPAMI 2013): an
anomaly map upsampled from the coarse patch grid, redrawn so that its edges follow the image's.

The patch grid has one cell per 8 pixels (``best``: 40 x 40 cells on a 320 px input), so its bilinear
upsampling draws every defect as a blurred blob: a thin crack or a small blowhole spills over its
neighbours, a broken edge is rounded off. The guided filter fits, in every ``(2r+1)^2`` window, the
map as an affine function of the image's colour (``q = a . I + b``, ridge-regularised by ``eps``) and
averages the fits: where the image has an edge inside a raised region the map takes it, where the
image is flat the map is a box average of itself. Measured in docs/accuracy.md ("The map's outline
from the image"): every defect kind of both real categories gains pixel AUPRC.

Pure numpy/scipy (no torch), so the exported-model runtime shares it. The colour version solves a
3x3 system per pixel in closed form; a grey image (its three channels equal) reduces to the grey
filter with ``eps / 3``. Computed in float64 (the covariances are differences of nearly equal box
means), returned as float32.

Example:
    >>> import numpy as np
    >>> guide = np.zeros((3, 32, 32), np.uint8); guide[:, :, 12:20] = 200  # a bright defect, columns 12-19
    >>> src = np.zeros((32, 32), np.float32); src[:, 8:24] = 1.0           # the coarse map spills over it
    >>> out = guided_filter(guide, src, radius=4, eps=1e-4)
    >>> out.shape, out.dtype.name
    ((32, 32), 'float32')
    >>> bool(out[16, 12] - out[16, 11] > 0.1)  # the map steps at the defect's edge
    True
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

from patchknn.resample import resize_last_two

__all__ = ["guided_filter"]


def _box(a: np.ndarray, radius: int) -> np.ndarray:
    """The mean over each ``(2r+1) x (2r+1)`` window of the last two axes (mirrored at the edges)."""
    size = (1,) * (a.ndim - 2) + (2 * radius + 1, 2 * radius + 1)
    return uniform_filter(a, size=size, mode="reflect")


def _coefficients(g: np.ndarray, p: np.ndarray, radius: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The window-averaged affine coefficients ``(a, b)`` of ``p`` on the guide ``g`` ((3, H, W) or (H, W))."""
    mean_p = _box(p, radius)
    if g.ndim == 2:
        mean_i = _box(g, radius)
        a = (_box(g * p, radius) - mean_i * mean_p) / (_box(g * g, radius) - mean_i**2 + eps)
        return _box(a, radius), _box(mean_p - a * mean_i, radius)
    mean_i = _box(g, radius)  # (3, H, W)
    cov_ip = _box(g * p, radius) - mean_i * mean_p
    pairs = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
    s = {ij: _box(g[ij[0]] * g[ij[1]], radius) - mean_i[ij[0]] * mean_i[ij[1]] for ij in pairs}
    s00, s01, s02, s11, s12, s22 = (s[ij] for ij in pairs)
    s00, s11, s22 = s00 + eps, s11 + eps, s22 + eps
    # The inverse of the symmetric 3x3 covariance by its adjugate, per pixel.
    c00, c01, c02 = s11 * s22 - s12 * s12, s02 * s12 - s01 * s22, s01 * s12 - s02 * s11
    c11, c12, c22 = s00 * s22 - s02 * s02, s01 * s02 - s00 * s12, s00 * s11 - s01 * s01
    det = s00 * c00 + s01 * c01 + s02 * c02
    v0, v1, v2 = cov_ip
    a = np.stack([c00 * v0 + c01 * v1 + c02 * v2, c01 * v0 + c11 * v1 + c12 * v2, c02 * v0 + c12 * v1 + c22 * v2])
    a /= det
    return _box(a, radius), _box(mean_p - (a * mean_i).sum(0), radius)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float, subsample: int = 1) -> np.ndarray:
    """``src`` (an ``(H, W)`` map) filtered with ``guide``'s edges.

    Args:
        guide: the image, uint8 ``(3, H, W)`` (channels first, as the model's batches) or ``(H, W)``
            grey; scaled to ``[0, 1]``.
        src: the map to filter, ``(H, W)``.
        radius: the window's half side in pixels (>= 1).
        eps: the regularisation, in squared intensity units of the ``[0, 1]`` guide: a window whose
            image variance is well below ``eps`` is smoothed, one well above it keeps the image's edge.
        subsample: compute the coefficients at ``1 / subsample`` of the resolution and apply them,
            resized bilinearly, at the full one (He and Sun's fast guided filter); 1 = exact.

    Returns:
        The filtered map, float32 ``(H, W)``.
    """
    p = np.asarray(src, dtype=np.float64)
    g = np.asarray(guide, dtype=np.float64) / 255.0
    if g.shape[-2:] != p.shape or g.ndim not in (2, 3) or (g.ndim == 3 and g.shape[0] != 3):
        raise ValueError(f"guide of shape {g.shape} for a map of shape {p.shape}: expected (3, H, W) or (H, W)")
    if radius < 1 or not eps > 0:
        raise ValueError(f"radius must be >= 1 and eps > 0, got {radius}, {eps}")
    if subsample == 1:
        a, b = _coefficients(g, p, radius, eps)
    else:
        low = (max(1, round(p.shape[0] / subsample)), max(1, round(p.shape[1] / subsample)))
        a, b = _coefficients(resize_last_two(g, low), resize_last_two(p, low), max(1, round(radius / subsample)), eps)
        a, b = resize_last_two(a, p.shape), resize_last_two(b, p.shape)
    return ((a * g).sum(0) + b if g.ndim == 3 else a * g + b).astype(np.float32)
