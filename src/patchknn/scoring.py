"""Scoring: patch distances on the grid -> anomaly map -> image score -> verdict.

The one home of the rules that turn nearest-neighbour distances into what a user sees, used by
:meth:`PatchKNN.predict_batch <patchknn.model.PatchKNN.predict_batch>` (and so by ``predict``,
``evaluate``, the server, ``score-archive`` and sharded search) and by the threshold calibration,
so that every path gives the same numbers.

* :func:`score_map`: the ``(grid, grid)`` distances upsampled bilinearly to a size, then smoothed
  (``smoothing_sigma`` grid cells): the map the image score is taken from. Pure numpy/scipy (no
  torch), so the exported-model runtime (:mod:`patchknn.runtime`) shares it: the bilinear resize
  is two interpolation matrices that equal ``torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)`` (:mod:`patchknn.resample`).
* :func:`grid_to_map`: the anomaly map the user sees: :func:`score_map`, or with ``guided_filter``
  the upsampled grid redrawn along the image's edges (:mod:`patchknn.guided`).
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
from typing import Any, Literal

import numpy as np
from scipy.ndimage import gaussian_filter

from patchknn.config import PatchKNNConfig
from patchknn.errors import ConfigError
from patchknn.guided import guided_filter
from patchknn.resample import bilinear_matrix, resize_bilinear

__all__ = [
    "OutputSize",
    "Prediction",
    "grid_to_map",
    "score_map",
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


def score_map(grid: np.ndarray, size: tuple[int, int], config: PatchKNNConfig) -> np.ndarray:
    """The map that the image score is taken from: ``grid`` (after :func:`fill_border`) upsampled
    bilinearly to ``size`` and smoothed (``config.smoothing_sigma`` grid cells, scaled to ``size``).

    It is also the anomaly map unless ``config.guided_filter`` is set (:func:`grid_to_map`). It is
    monotone in the grid's values (the held-out calibration's bounds rely on it: :mod:`patchknn.heldout`).
    ``config`` may be any object with the scoring fields (``smoothing_sigma``, ``image_size``,
    ``image_score``, ``image_score_topk``, ``border_cells``, ``guided_filter``, ``guided_eps``): the
    exported-model runtime passes its saved options (a file saved before an option existed has none:
    that option is off).
    """
    grid = fill_border(grid, getattr(config, "border_cells", 0))
    amap = resize_bilinear(grid, size)
    if config.smoothing_sigma > 0:
        g = grid.shape[0]
        sigma = (config.smoothing_sigma * size[0] / g, config.smoothing_sigma * size[1] / g)
        amap = gaussian_filter(amap, sigma=sigma, mode="nearest", truncate=4.0)
    return np.ascontiguousarray(amap, dtype=np.float32)


def grid_to_map(
    grid: np.ndarray,
    size: tuple[int, int],
    config: PatchKNNConfig,
    guide: np.ndarray | None = None,
    peak: float | None = None,
) -> np.ndarray:
    """The anomaly map of one ``(grid, grid)`` score grid at ``size``.

    Without ``config.guided_filter``: :func:`score_map`. With it, the map's outline follows the
    image: ``grid`` (after :func:`fill_border`) is upsampled bilinearly to the model's input size
    and passed through :func:`patchknn.guided.guided_filter` with ``guide`` (the image as the model
    saw it, uint8 ``(3, S, S)``), radius ``guided_filter`` grid cells, ``guided_eps``, its
    coefficients computed at twice the grid's resolution (He and Sun's fast guided filter); no
    Gaussian smoothing (the filter smooths where the image is flat). The result is then brought to
    the peak of :func:`score_map` at the input size (``peak``, computed when not given), as an
    unguided map has it: values above the peak are cut to it, and a map whose maximum falls short
    of it is stretched (its minimum kept) until its maximum is the peak. So, with ``image_score="max"``,
    the map's maximum is the image score and the region ``map >= threshold`` (at the input size) is
    empty exactly when the verdict is OK, as without the filter. That map is finally resized
    bilinearly to ``size``.
    """
    radius = float(getattr(config, "guided_filter", 0.0))
    if radius <= 0:
        return score_map(grid, size, config)
    if guide is None:
        raise ValueError("guided_filter needs the image the map belongs to (guide=), as the model saw it")
    s = int(config.image_size)
    g = np.asarray(grid).shape[-1]
    top = float(score_map(grid, (s, s), config).max()) if peak is None else float(peak)
    base = resize_bilinear(fill_border(grid, getattr(config, "border_cells", 0)), (s, s))
    amap = guided_filter(
        np.asarray(guide), base, radius=max(1, round(radius * s / g)),
        eps=float(getattr(config, "guided_eps", 1e-4)), subsample=max(1, s // (2 * g)),
    )
    lo, hi = float(amap.min()), float(amap.max())
    if hi >= top:
        amap = np.minimum(amap, np.float32(top))
    elif hi > lo:
        amap = (lo + (amap - lo) * ((top - lo) / (hi - lo))).astype(np.float32)
    else:  # a flat map
        amap = np.full_like(amap, top)
    return amap if tuple(size) == (s, s) else resize_bilinear(amap, size)


def image_score(
    grid: np.ndarray, config: PatchKNNConfig, weight: float = 1.0, amap: np.ndarray | None = None
) -> float:
    """The image's score from its ``(grid, grid)`` distances.

    ``max`` (the paper): the maximum of the map at the model's input size; ``topk_mean``: the mean
    of the ``image_score_topk`` highest grid cells (after :func:`fill_border`); ``reweighted``: the
    maximum times PatchCore's ``weight`` (from :func:`reweight`). ``amap`` may pass the map at the
    input size when the caller already has it (it must be ``score_map(grid, (image_size, image_size), config)``).
    """
    if config.image_score == "topk_mean":
        flat = np.sort(np.asarray(fill_border(grid, getattr(config, "border_cells", 0))).ravel())[::-1]
        return float(flat[: config.image_score_topk].mean())
    if amap is None:
        amap = score_map(grid, (config.image_size, config.image_size), config)
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
    guides: Any = None,
) -> list[Prediction]:
    """``(B, grid, grid)`` patch distances (and PatchCore weights) -> one :class:`Prediction` each.

    The score is taken from :func:`score_map` at ``config.image_size`` whatever ``output_size`` is,
    so the score and verdict never depend on the size a map is drawn at (nor on the guided filter).
    ``guides``: the batch's images as the model saw them, uint8 ``(B, 3, S, S)`` (anything numpy
    converts), needed with ``config.guided_filter`` (:func:`grid_to_map`). A map or score that is
    not finite gives a :class:`Prediction` with ``error`` set (the caller decides whether that stops).
    """
    s = config.image_size
    guided = float(getattr(config, "guided_filter", 0.0)) > 0
    if guided and (guides is None or len(guides) != len(grids)):
        raise ValueError(f"guided_filter needs the batch's {len(grids)} images as guides")
    out = []
    for j, grid in enumerate(grids):
        name = names[j] if names is not None else f"<image {j}>"
        base = score_map(grid, (s, s), config)
        score = image_score(grid, config, float(weights[j]), amap=base)
        size = resolve_size(output_size, s, sizes[j] if sizes is not None else (s, s))
        if guided:
            amap = grid_to_map(grid, size, config, guide=np.asarray(guides[j]), peak=float(base.max()))
        else:
            amap = base if size == (s, s) else score_map(grid, size, config)
        if not (np.isfinite(score) and np.isfinite(amap).all()):  # never a silent NaN
            out.append(Prediction(name, None, None, None, error=NON_FINITE))
            continue
        out.append(Prediction(name, amap, score, threshold))
    return out
