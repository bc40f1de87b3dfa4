"""Approximate indexes: IVF (k-means inverted lists) and HNSW (a graph)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import faiss
import numpy as np

from patchknn.errors import ConfigError
from patchknn.index.base import IndexParams, MemoryBankIndex, faiss_threads, sqrt_sorted

#: At most this many ``(queries x lists)`` coarse distances at a time (64 MB of float32).
_PROBE_BLOCK = 1 << 24


class IVFIndex(MemoryBankIndex):
    """faiss ``IndexIVFFlat``: k-means (seeded) inverted lists, ``nprobe`` of them searched.

    The lists a query visits are its ``nprobe`` nearest centroids, found here with one float32
    matrix product per block of queries (torch's, 2-3x faster than faiss' own quantizer on a wide
    bank: 7 against 16-19 ms per 784-patch image on magnetic_tile's 818 x 709 centroids, 2
    threads); faiss then scans those lists (``search_preassigned``, its lists scanned in parallel:
    ``parallel_mode=2``). The lists are the quantizer's own up to ties in float32 round-off
    (docs/speed.md); the distances returned are faiss' scan of them, as before.
    """

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
        index.parallel_mode = 2  # queries and lists in parallel: 22 instead of 46 ms per image (preassigned)
        self._quantizer = quantizer  # keep the quantizer alive with the index
        self.nlist = nlist
        import torch

        coarse = torch.from_numpy(quantizer.reconstruct_n(0, nlist))
        self._coarse = (coarse, (coarse * coarse).sum(1))
        return index

    def search(self, queries: Any, k: int = 1) -> np.ndarray:
        """Distances ``(M, k)`` to the ``k`` nearest rows in the ``nprobe`` lists nearest each query."""
        q = self._query_array(queries, k)
        if q.shape[0] == 0:
            return np.zeros((0, k), dtype=np.float32)
        lists, coarse = self._probe(q)
        sq, _ = self._index.search_preassigned(q, int(k), lists, coarse)
        return sqrt_sorted(sq)

    def _probe(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each query's ``nprobe`` nearest centroids: ``(ids int64, squared distances float32)``."""
        import torch

        centroids, norms = self._coarse
        nprobe = int(self._index.nprobe)
        ids = np.empty((q.shape[0], nprobe), dtype=np.int64)
        dist = np.empty((q.shape[0], nprobe), dtype=np.float32)
        step = max(1, _PROBE_BLOCK // centroids.shape[0])
        with torch.inference_mode():
            for a in range(0, q.shape[0], step):
                x = torch.from_numpy(q[a : a + step])
                d2 = torch.addmm(norms, x, centroids.T, alpha=-2.0).add_((x * x).sum(1, keepdim=True))
                near = torch.topk(d2, nprobe, dim=1, largest=False)
                ids[a : a + step] = near.indices.numpy()
                dist[a : a + step] = near.values.numpy()
        return ids, dist


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
