"""Scoring: patch distances on the grid -> anomaly map -> image score -> verdict.

The one home of the rules that turn nearest-neighbour distances into what a user sees, used by
:meth:`PatchKNN.predict_batch <patchknn.model.PatchKNN.predict_batch>` (and so by ``predict``,
``evaluate``, the server, ``score-archive`` and sharded search) and by the threshold calibration,
so that every path gives the same numbers.

* :func:`grid_to_map`: the ``(grid, grid)`` distances upsampled bilinearly to a size, then smoothed
  (``smoothing_sigma`` grid cells). Pure numpy/scipy (no torch), so the exported-model runtime
  (:mod:`patchknn.runtime`) shares it: the bilinear resize is two interpolation matrices that
  equal ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.
* :func:`fill_border`: the outer ``border_cells`` rings of the grid take their nearest inner
  cell's value (before the map and the score are formed).
* :func:`image_score`: the image's score. It is always taken from the map at the model's input
  resolution (``image_size``), whatever size the map is drawn at for the user, so the score and
  the OK/NG verdict do not depend on ``output_size``.
* :func:`reweight`: PatchCore's re-weighting of the most anomalous patch (``image_score="reweighted"``).
* :func:`verdict`: ``"NG"`` when the score reaches the threshold.
* :func:`predictions`: all of the above for a batch, as :class:`Prediction` objects.

Example:
    >>> import numpy as np
    >>> from patchknn.config import PatchKNNConfig
    >>> cfg = PatchKNNConfig(image_size=32, grid_size=2)
    >>> grid = np.array([[0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    >>> grid_to_map(grid, (32, 32), cfg).shape
    (32, 32)
    >>> image_score(grid, cfg)
    1.0
    >>> verdict(1.0, 0.5), verdict(0.2, 0.5), verdict(0.2, None)
    ('NG', 'OK', None)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from scipy.ndimage import gaussian_filter

from patchknn.config import PatchKNNConfig
from patchknn.errors import ConfigError

__all__ = [
    "OutputSize",
    "Prediction",
    "grid_to_map",
    "patch_grid",
    "image_score",
    "bilinear_matrix",
    "fill_border",
    "predictions",
    "resize_bilinear",
    "resolve_size",
    "reweight",
    "verdict",
]


OutputSize = int | tuple[int, int] | Literal["input", "original"] | None
NON_FINITE = (
    "the anomaly map contains NaN or infinite values (numerical overflow in the backbone, or a "
    "damaged model); no score is given"
)


@dataclass
class Prediction:
    """The result for one image.

    Attributes:
        source: the file path, or ``"<array i>"`` / ``"<image i>"`` for in-memory inputs.
        anomaly_map: ``(H, W)`` float32 anomaly scores (distance to normal) at the output size.
        score: image anomaly score (by default the maximum of ``anomaly_map``).
        threshold: the decision threshold in force, or ``None`` when the model has none.
        error: with ``on_error="skip"``, why the image could not be scored (map and score are None).
    """

    source: str
    anomaly_map: np.ndarray | None
    score: float | None
    threshold: float | None = None
    error: str | None = None

    @property
    def is_anomalous(self) -> bool | None:
        """``True`` (NG) when the score reaches the threshold; ``None`` without a threshold."""
        if self.threshold is None or self.score is None:
            return None
        return bool(self.score >= self.threshold)

    @property
    def verdict(self) -> str | None:
        """``"NG"``, ``"OK"``, or ``None`` when there is no threshold (or an error)."""
        return verdict(self.score, self.threshold)

    @property
    def mask(self) -> np.ndarray | None:
        """Binary defect mask ``anomaly_map >= threshold``; ``None`` without a threshold."""
        if self.threshold is None or self.anomaly_map is None:
            return None
        return self.anomaly_map >= self.threshold


def resolve_size(output_size: OutputSize, image_size: int, original: tuple[int, int]) -> tuple[int, int]:
    """The map size for ``output_size`` (see :meth:`PatchKNN.predict <patchknn.model.PatchKNN.predict>`)."""
    if output_size is None or output_size == "input":
        return (image_size, image_size)
    if output_size == "original":
        return (int(original[0]), int(original[1]))
    if isinstance(output_size, int):
        return (output_size, output_size)
    if isinstance(output_size, tuple) and len(output_size) == 2:
        return (int(output_size[0]), int(output_size[1]))
    raise ConfigError(f"output_size must be None, 'input', 'original', an int or (H, W); got {output_size!r}")


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


def resize_bilinear(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` -> ``size`` bilinearly (``align_corners=False``), float32; see :func:`bilinear_matrix`."""
    g = np.asarray(grid, dtype=np.float64)
    rows = bilinear_matrix(g.shape[0], int(size[0]))
    cols = bilinear_matrix(g.shape[1], int(size[1]))
    return (rows @ g @ cols.T).astype(np.float32)


def fill_border(grid: np.ndarray, cells: int) -> np.ndarray:
    """``grid`` (``(..., h, w)``) with its outer ``cells`` rings replaced by the nearest inner
    cell's value (edge replication of the inner ``(h - 2 cells, w - 2 cells)`` block); ``grid``
    itself when ``cells`` is 0. Monotone in the grid's values (each cell is a copy of one cell).

    Example:
        >>> fill_border(np.arange(16.0).reshape(4, 4), 1)
        array([[ 5.,  5.,  6.,  6.],
               [ 5.,  5.,  6.,  6.],
               [ 9.,  9., 10., 10.],
               [ 9.,  9., 10., 10.]])
    """
    cells = int(cells)
    if cells <= 0:
        return grid
    g = np.asarray(grid)
    h, w = g.shape[-2:]
    if 2 * cells >= min(h, w):
        raise ConfigError(f"border_cells {cells} leaves no inner cell of a {h}x{w} grid")
    rows = np.clip(np.arange(h), cells, h - 1 - cells)
    cols = np.clip(np.arange(w), cells, w - 1 - cells)
    return g[..., rows[:, None], cols[None, :]]


def grid_to_map(grid: np.ndarray, size: tuple[int, int], config: PatchKNNConfig) -> np.ndarray:
    """Upsample one ``(grid, grid)`` score map bilinearly to ``size`` and smooth it (if set).

    The outer ``config.border_cells`` rings first take their nearest inner cell's value
    (:func:`fill_border`). The smoothing's sigma is ``config.smoothing_sigma`` grid cells, scaled
    to ``size``. ``config`` may be any object with the scoring fields (``smoothing_sigma``,
    ``image_size``, ``image_score``, ``image_score_topk``, ``border_cells``): the exported-model
    runtime passes its saved options (a file saved before ``border_cells`` existed has none: 0).
    """
    grid = fill_border(grid, getattr(config, "border_cells", 0))
    amap = resize_bilinear(grid, size)
    if config.smoothing_sigma > 0:
        g = grid.shape[0]
        sigma = (config.smoothing_sigma * size[0] / g, config.smoothing_sigma * size[1] / g)
        amap = gaussian_filter(amap, sigma=sigma, mode="nearest", truncate=4.0)
    return np.ascontiguousarray(amap, dtype=np.float32)


def image_score(
    grid: np.ndarray, config: PatchKNNConfig, weight: float = 1.0, amap: np.ndarray | None = None
) -> float:
    """The image's score from its ``(grid, grid)`` distances.

    ``max`` (the paper): the maximum of the map at the model's input size; ``topk_mean``: the mean
    of the ``image_score_topk`` highest grid cells (after :func:`fill_border`); ``reweighted``: the
    maximum times PatchCore's ``weight`` (from :func:`reweight`). ``amap`` may pass the map at the
    input size when the caller already has it (it must be ``grid_to_map(grid, (image_size, image_size), config)``).
    """
    if config.image_score == "topk_mean":
        flat = np.sort(np.asarray(fill_border(grid, getattr(config, "border_cells", 0))).ravel())[::-1]
        return float(flat[: config.image_score_topk].mean())
    if amap is None:
        amap = grid_to_map(grid, (config.image_size, config.image_size), config)
    top = float(amap.max())
    return top * float(weight) if config.image_score == "reweighted" else top


def reweight(grids: np.ndarray, rows: np.ndarray, bank: np.ndarray, topk: int) -> np.ndarray:
    """PatchCore's eq. 7, one weight per image.

    ``w = 1 - softmax(||q - m||, m in N_b(m*))[m*]`` for the image's most anomalous patch ``q``,
    its nearest bank patch ``m*`` and the ``b = topk`` bank patches nearest ``m*``.

    Args:
        grids: ``(B, grid, grid)`` patch distances.
        rows: ``(B, grid*grid, d)`` the searched patch vectors.
        bank: ``(N, d)`` float32 memory bank.
        topk: ``b``, the size of ``m*``'s neighbourhood.
    """
    import faiss

    bank = np.ascontiguousarray(bank, dtype=np.float32)
    b = min(int(topk), bank.shape[0])
    out = np.ones(grids.shape[0], dtype=np.float64)
    for j in range(grids.shape[0]):
        q = np.ascontiguousarray(rows[j, int(np.argmax(grids[j]))][None], dtype=np.float32)
        _, nearest = faiss.knn(q, bank, 1)
        m_star = np.ascontiguousarray(bank[nearest[0, :1]])
        _, support = faiss.knn(m_star, bank, b)
        ids = support[0]
        # m* first, whatever ties faiss returned
        ids = np.concatenate([nearest[0, :1], ids[ids != nearest[0, 0]]])[:b]
        d = np.sqrt(((bank[ids].astype(np.float64) - q.astype(np.float64)) ** 2).sum(axis=1))
        e = np.exp(d - d.max())  # softmax of the distances (stable); m* is the nearest, e[0] the least
        out[j] = 1.0 - e[0] / e.sum()
    return out


def patch_grid(rows: np.ndarray, index: Any, config: PatchKNNConfig) -> np.ndarray:
    """``(B, grid*grid, d)`` searched vectors -> ``(B, grid, grid)`` patch scores: the mean distance
    to the ``k`` nearest bank rows (``index.search``). A patch whose vector is not finite scores NaN
    (faiss answers such a query with a huge finite distance), so no silent score comes of it."""
    b, p, d = rows.shape
    flat = np.ascontiguousarray(rows.reshape(b * p, d), dtype=np.float32)
    scores = index.search(flat, config.k).mean(axis=1, dtype=np.float64).astype(np.float32)
    scores[~np.isfinite(flat).all(axis=1)] = np.nan
    return scores.reshape(b, config.grid_size, config.grid_size)


def verdict(score: float | None, threshold: float | None) -> str | None:
    """``"NG"`` when ``score >= threshold``, ``"OK"`` below it, ``None`` without either."""
    if score is None or threshold is None:
        return None
    return "NG" if score >= threshold else "OK"


def predictions(
    grids: np.ndarray,
    weights: np.ndarray,
    config: PatchKNNConfig,
    *,
    names: Sequence[str] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    output_size: OutputSize = None,
    threshold: float | None = None,
) -> list[Prediction]:
    """``(B, grid, grid)`` patch distances (and PatchCore weights) -> one :class:`Prediction` each.

    The score is taken from the map at ``config.image_size`` whatever ``output_size`` is, so the
    score and verdict never depend on the size a map is drawn at. A map or score that is not
    finite gives a :class:`Prediction` with ``error`` set (the caller decides whether that stops).
    """
    s = config.image_size
    out = []
    for j, grid in enumerate(grids):
        name = names[j] if names is not None else f"<image {j}>"
        base = grid_to_map(grid, (s, s), config)
        score = image_score(grid, config, float(weights[j]), amap=base)
        size = resolve_size(output_size, s, sizes[j] if sizes is not None else (s, s))
        amap = base if size == (s, s) else grid_to_map(grid, size, config)
        if not (np.isfinite(score) and np.isfinite(amap).all()):  # never a silent NaN
            out.append(Prediction(name, None, None, None, error=NON_FINITE))
            continue
        out.append(Prediction(name, amap, score, threshold))
    return out
