"""Approximate indexes: IVF (k-means inverted lists) and HNSW (a graph)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import faiss
import numpy as np

from patchknn.errors import ConfigError
from patchknn.index.base import IndexParams, MemoryBankIndex, faiss_threads


class IVFIndex(MemoryBankIndex):
    """faiss ``IndexIVFFlat``: k-means (seeded) inverted lists, ``nprobe`` of them searched."""

    kind = "ivf"

    def __init__(
        self, params: IndexParams | None = None, seed: int = 0, centroids: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.params = params or IndexParams()
        self.seed = int(seed)
        self.nlist = 0
        self._given = None if centroids is None else np.ascontiguousarray(centroids, dtype=np.float32)

    @staticmethod
    def auto_nlist(n: int) -> int:
        return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))

    @property
    def centroids(self) -> np.ndarray | None:
        """The ``(nlist, d)`` coarse centroids (saved with a model, so that a loaded model, or a
        shard holding part of the bank, probes exactly the same lists)."""
        if self._index is None:
            return None
        return self._quantizer.reconstruct_n(0, self._quantizer.ntotal)

    def _make(self, bank: np.ndarray) -> Any:
        n, d = bank.shape
        quantizer = faiss.IndexFlatL2(d)
        if self._given is not None:  # trained before (a loaded model, or one shard of a bank)
            if self._given.ndim != 2 or self._given.shape[1] != d or self._given.shape[0] < 1:
                raise ConfigError(f"IVF centroids must be (nlist, {d}), got shape {self._given.shape}")
            nlist = int(self._given.shape[0])
            quantizer.add(self._given)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
        else:
            nlist = self.params.nlist or self.auto_nlist(n)
            nlist = int(max(1, min(nlist, n)))
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
            index.cp.seed = self.seed
            # faiss prints a warning below 39 points per centroid; an explicit small nlist is the user's choice
            index.cp.min_points_per_centroid = 1
            index.train(bank)
        index.add(bank)
        index.nprobe = int(min(self.params.nprobe, nlist))
        self._quantizer = quantizer  # keep the quantizer alive with the index
        self.nlist = nlist
        return index


class HNSWIndex(MemoryBankIndex):
    """faiss ``IndexHNSWFlat``, built single-threaded in bank order (deterministic)."""

    kind = "hnsw"

    def __init__(self, params: IndexParams | None = None, seed: int = 0) -> None:
        super().__init__()
        self.params = params or IndexParams()
        self.seed = int(seed)

    def _make(self, bank: np.ndarray) -> Any:
        index = faiss.IndexHNSWFlat(bank.shape[1], int(self.params.hnsw_m))
        index.hnsw.efConstruction = int(self.params.hnsw_ef_construction)
        index.hnsw.efSearch = int(self.params.hnsw_ef_search)
        # level assignment draws from this generator; seed it when the binding allows
        with contextlib.suppress(AttributeError, TypeError):
            index.hnsw.rng = faiss.RandomGenerator(self.seed + 12345)
        # Parallel insertion makes the graph depend on thread timing: insert on one thread.
        with faiss_threads(1):
            index.add(bank)
        return index

    def search(self, queries: Any, k: int = 1) -> np.ndarray:
        self._check_query(queries, k)
        # efSearch below k would return fewer than k neighbours
        self._index.hnsw.efSearch = int(max(self.params.hnsw_ef_search, k))
        return super().search(queries, k)
