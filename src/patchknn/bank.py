"""The memory bank stage of fitting: normal patch features -> PCA -> bank -> coreset -> index.

PatchCore's stages, in the order the paper applies them: the PCA is fitted from the streamed
moments of every normal patch (``pca_variance``; ``None`` keeps the raw features), every patch is
projected (the full bank, rows ``[i * grid**2, (i + 1) * grid**2)`` = training image ``i``), a
greedy k-center coreset keeps ``coreset_ratio`` of the rows (optional), and the kept rows are
indexed for search by the index builder the estimator passes in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchknn.config import PatchKNNConfig
from patchknn.coreset import greedy_coreset
from patchknn.errors import ConfigError
from patchknn.features import TrainingStore
from patchknn.index import single_threaded
from patchknn.reduction import PCA

__all__ = ["MemoryBank", "build_memory_bank"]


@dataclass
class MemoryBank:
    """The result of :func:`build_memory_bank`.

    Attributes:
        pca: the fitted PCA (``None`` without one).
        full: every normal patch in the index's space, ``(n_images * grid**2, d)``.
        kept: the coreset's row numbers in ``full`` (sorted), ``None`` without a coreset.
        index: the search index over the kept rows.
        seconds: ``pca_seconds``, ``coreset_seconds``, ``index_seconds``.
    """

    pca: PCA | None
    full: np.ndarray
    kept: np.ndarray | None
    index: Any
    seconds: dict[str, float]


def build_memory_bank(
    store: TrainingStore, config: PatchKNNConfig, make_index: Callable[[np.ndarray], Any]
) -> MemoryBank:
    """PCA, bank, coreset and index from the features in ``store`` (which is released after use)."""
    t0 = time.perf_counter()
    pca = None
    if config.pca_variance is None:
        bank = store.vectors()
    else:
        # one thread: the eigensolver's many small parallel steps run up to 10x slower on 2
        # threads than on one as soon as anything else wants the CPU
        with single_threaded():
            pca = PCA.from_moments(store.moments, float(config.pca_variance))
        bank = store.projected(pca)
        store.release()
    t_pca = time.perf_counter()
    kept: np.ndarray | None = None
    if config.coreset_ratio < 1.0:
        kept = np.sort(greedy_coreset(bank, config.coreset_ratio, config.coreset_dim, config.seed))
    t_core = time.perf_counter()
    index_bank = bank if kept is None else bank[kept]
    if config.k > index_bank.shape[0]:
        raise ConfigError(f"k={config.k} is larger than the memory bank ({index_bank.shape[0]} patches)")
    index = make_index(index_bank)
    seconds = {
        "pca_seconds": round(t_pca - t0, 3),
        "coreset_seconds": round(t_core - t_pca, 3),
        "index_seconds": round(time.perf_counter() - t_core, 3),
    }
    return MemoryBank(pca, bank, kept, index, seconds)
