"""Bilinear resampling of 2-D arrays as PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``
does it, in numpy (no torch), so that the exported-model runtime and the package draw the same maps.

Example:
    >>> import numpy as np
    >>> resize_bilinear(np.array([[0.0, 1.0]]), (1, 4))
    array([[0.  , 0.25, 0.75, 1.  ]], dtype=float32)
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["bilinear_matrix", "resize_bilinear", "resize_last_two"]


@lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix of 1-D bilinear resampling with ``align_corners=False``.

    Row ``i`` samples the input at ``(i + 0.5) * n_in / n_out - 0.5`` (clamped at 0) from its two
    neighbours, exactly as PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``
    (no antialiasing) does along one axis; a 2-D resize is ``A_h @ grid @ A_w.T``.

    Example:
        >>> bilinear_matrix(2, 4)
        array([[1.  , 0.  ],
               [0.75, 0.25],
               [0.25, 0.75],
               [0.  , 1.  ]])
    """
    # the source coordinates and weights in float32, as PyTorch's CPU kernel computes them
    scale = np.float32(np.float32(n_in) / np.float32(n_out))
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float64)
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    mat.setflags(write=False)
    return mat


def resize_last_two(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(..., h, w)`` -> ``(..., *size)`` bilinearly (``align_corners=False``), in float64."""
    g = np.asarray(a, dtype=np.float64)
    rows = bilinear_matrix(g.shape[-2], int(size[0]))
    cols = bilinear_matrix(g.shape[-1], int(size[1]))
    return rows @ g @ cols.T


def resize_bilinear(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` -> ``size`` bilinearly (``align_corners=False``), float32; see :func:`bilinear_matrix`."""
    return resize_last_two(grid, size).astype(np.float32)
