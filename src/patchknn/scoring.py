"""Scoring: patch distances on the grid -> anomaly map -> image score -> verdict.

The one home of the rules that turn nearest-neighbour distances into what a user sees, used by
:meth:`PatchKNN.predict_batch <patchknn.model.PatchKNN.predict_batch>` (and so by ``predict``,
``evaluate``, the server, ``score-archive`` and sharded search) and by the threshold calibration,
so that every path gives the same numbers.

* :func:`grid_to_map`: the ``(grid, grid)`` distances upsampled bilinearly to a size, then smoothed
  (``smoothing_sigma`` grid cells).
* :func:`image_score`: the image's score. It is always taken from the map at the model's input
  resolution (``image_size``), whatever size the map is drawn at for the user, so the score and
  the OK/NG verdict do not depend on ``output_size``.
* :func:`reweight`: PatchCore's re-weighting of the most anomalous patch (``image_score="reweighted"``).
* :func:`verdict`: ``"NG"`` when the score reaches the threshold.

Example:
    >>> import numpy as np
    >>> from patchknn.config import PatchKNNConfig
    >>> cfg = PatchKNNConfig(image_size=8, grid_size=2)
    >>> grid = np.array([[0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    >>> grid_to_map(grid, (8, 8), cfg).shape
    (8, 8)
    >>> image_score(grid, cfg)
    1.0
    >>> verdict(1.0, 0.5), verdict(0.2, 0.5), verdict(0.2, None)
    ('NG', 'OK', None)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from patchknn.config import PatchKNNConfig

__all__ = ["grid_to_map", "image_score", "reweight", "verdict"]


def grid_to_map(grid: np.ndarray, size: tuple[int, int], config: PatchKNNConfig) -> np.ndarray:
    """Upsample one ``(grid, grid)`` score map bilinearly to ``size`` and smooth it (if set).

    The smoothing's sigma is ``config.smoothing_sigma`` grid cells, scaled to ``size``.
    """
    t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    amap = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
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
    of the ``image_score_topk`` highest grid cells; ``reweighted``: the maximum times PatchCore's
    ``weight`` (from :func:`reweight`). ``amap`` may pass the map at the input size when the caller
    already has it (it must be ``grid_to_map(grid, (image_size, image_size), config)``).
    """
    if config.image_score == "topk_mean":
        flat = np.sort(np.asarray(grid).ravel())[::-1]
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


def verdict(score: float | None, threshold: float | None) -> str | None:
    """``"NG"`` when ``score >= threshold``, ``"OK"`` below it, ``None`` without either."""
    if score is None or threshold is None:
        return None
    return "NG" if score >= threshold else "OK"
