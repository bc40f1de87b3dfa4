"""Exact search that skips clusters of the bank that cannot hold a query's neighbours."""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
import torch

from patchknn.index.base import MemoryBankIndex, default_threads, sqrt_sorted


class PrunedFlatIndex(MemoryBankIndex):
    """Exact search that skips the parts of the bank that cannot hold a query's neighbours.

    The bank is split into ``nlist`` clusters (seeded k-means), each with its centre ``c`` and
    radius ``R`` (largest distance of a member to ``c``). By the triangle inequality no member of
    a cluster is closer to ``q`` than ``||q - c|| - R``. A query is first compared with the members
    of its nearest cluster, which bounds its k-th neighbour distance by some ``u``; then only the
    clusters with ``||q - c|| - R < u`` are searched. The result is the exact k-NN, as from
    :class:`MemoryBankIndex` (the bound has a safety margin for round-off; distances are computed
    between vectors centred on the cluster centre, which is more precise than faiss's
    ``||q||^2 - 2 q.b + ||b||^2`` on raw vectors). On clustered data such as patch features most
    of the bank is skipped for most queries: on MVTec bottle about 5-8 % of the distances of the
    flat search are computed. Anomalous patches, far from everything, get close to a full scan.

    Query blocks run in parallel, one single-threaded block per thread: the many small matrix
    products scale better that way than with threads inside each product.
    """

    kind = "flat"

    def __init__(self, nlist: int = 0, seed: int = 0, threads: int | None = None) -> None:
        super().__init__()
        self.nlist = int(nlist)
        self.seed = int(seed)
        self.threads = threads
        self.stats = {"queries": 0, "pairs": 0}

    @staticmethod
    def auto_nlist(n: int) -> int:
        return int(max(1, min(n // 256, 4096)))

    def _make(self, bank: np.ndarray) -> Any:
        n, d = bank.shape
        nlist = int(max(1, min(self.nlist or self.auto_nlist(n), n)))
        if nlist > 1:
            km = faiss.Kmeans(d, nlist, niter=8, seed=self.seed, max_points_per_centroid=64, min_points_per_centroid=1)
            km.train(bank)
            _, assign = km.index.search(bank, 1)
            assign = assign[:, 0].astype(np.int64)
            centres = np.asarray(km.centroids, dtype=np.float32)
            used = np.unique(assign)  # drop empty clusters
            remap = np.full(nlist, -1, dtype=np.int64)
            remap[used] = np.arange(len(used))
            assign, centres = remap[assign], centres[used]
        else:
            assign = np.zeros(n, dtype=np.int64)
            centres = bank.mean(0, keepdims=True, dtype=np.float64).astype(np.float32)
        order = np.argsort(assign, kind="stable")
        sorted_assign = assign[order]
        offsets = np.searchsorted(sorted_assign, np.arange(len(centres) + 1))
        members = torch.from_numpy(bank[order])
        members -= torch.from_numpy(centres)[torch.from_numpy(sorted_assign)]  # centred on their cluster
        norms = (members * members).sum(1)
        owner = torch.from_numpy(sorted_assign)
        radius = torch.zeros(len(centres), dtype=torch.float64)
        radius.scatter_reduce_(0, owner, norms.double().sqrt(), "amax")
        c64 = torch.from_numpy(centres).double()
        return {
            "members": members,
            "owner": owner,
            "norms": norms,
            "centres": torch.from_numpy(centres),
            "centres64": c64,
            "centre_norms64": (c64 * c64).sum(1),
            "radius": radius * (1 + 1e-6),
            "offsets": offsets.tolist(),
            "scale": float((c64 * c64).sum(1).max().sqrt()) + float(radius.max()),
        }

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 1) -> np.ndarray:
        q = self._query_tensor(queries, k)
        m = q.shape[0]
        if m == 0:
            return np.zeros((0, k), dtype=np.float32)
        threads = min(self.threads or default_threads(), max(1, m // 256))
        if threads == 1:
            return sqrt_sorted(self._search_block(q, k).numpy())
        pool = self._thread_pool(threads)
        intra = torch.get_num_threads()
        try:
            blocks = torch.tensor_split(q, threads)
            results = list(pool.map(lambda blk: self._search_block(blk, k, single=True), blocks))
        finally:
            torch.set_num_threads(intra)  # MKL's thread count is process-wide: restore it here
        return sqrt_sorted(torch.cat(results).numpy())

    @torch.inference_mode()
    def _search_block(self, q: torch.Tensor, k: int, single: bool = False) -> torch.Tensor:
        """Squared distances ``(m, k)``, sorted, of one block of queries."""
        if single:
            torch.set_num_threads(1)  # for this worker thread (OpenMP settings are per thread)
        ix = self._index
        m = q.shape[0]
        q64 = q.double()
        dc = torch.addmm(ix["centre_norms64"][None, :], q64, ix["centres64"].T, alpha=-2.0)
        dc = dc.add_((q64 * q64).sum(1, keepdim=True)).clamp_(min=0.0).sqrt_()
        best = torch.full((m, k), math.inf)
        best_at = torch.zeros((m, k), dtype=torch.long)  # member rows of the neighbours
        done = torch.zeros_like(dc, dtype=torch.bool)
        rows = torch.arange(m)
        # pass 1: the nearest cluster, then the next nearest until k members have been seen
        order = dc.argsort(dim=1) if k > 1 else dc.argmin(dim=1, keepdim=True)
        step = 0
        todo = rows
        while len(todo):
            lists = order[todo, step]
            self._scan(q, best, best_at, todo, lists, k)
            done[todo, lists] = True
            step += 1
            todo = todo[torch.isinf(best[todo, k - 1])] if step < order.shape[1] else todo[:0]
        # pass 2: every other cluster whose lower bound is below the k-th distance found so far
        bound = best[:, k - 1].double().clamp(min=0.0).sqrt()
        slack = 1e-4 * bound + 1e-6 * ix["scale"]
        need = (dc - ix["radius"][None, :]) <= (bound + slack)[:, None]
        need &= ~done
        lists, qidx = need.T.nonzero(as_tuple=True)
        self._scan(q, best, best_at, qidx, lists, k)
        self.stats["queries"] += m
        # the neighbours' distances again, as differences (no cancellation in ||q||^2 - 2 q.b + ||b||^2)
        diff = (q[:, None, :] - ix["centres"][ix["owner"][best_at]]).sub_(ix["members"][best_at])
        exact = (diff * diff).sum(-1)
        return exact.sort(dim=1).values if k > 1 else exact

    def _scan(
        self,
        q: torch.Tensor,
        best: torch.Tensor,
        best_at: torch.Tensor,
        qidx: torch.Tensor,
        lists: torch.Tensor,
        k: int,
    ) -> None:
        """Compare query ``qidx[i]`` with the members of cluster ``lists[i]``; merge into ``best``
        (squared distances) and ``best_at`` (their member rows)."""
        if len(qidx) == 0:
            return
        ix = self._index
        order = torch.argsort(lists, stable=True)
        lists, qidx = lists[order], qidx[order]
        counts = torch.bincount(lists, minlength=len(ix["offsets"]) - 1).tolist()
        offsets, members, norms, centres = ix["offsets"], ix["members"], ix["norms"], ix["centres"]
        start = 0
        for j, cnt in enumerate(counts):
            if cnt == 0:
                continue
            qs = qidx[start : start + cnt]
            start += cnt
            lo, hi = offsets[j], offsets[j + 1]
            qc = q[qs].sub_(centres[j])
            # ||b||^2 - 2 q.b, in the cluster's centred frame; ||q||^2 is added after the reduction
            part = torch.addmm(norms[lo:hi][None, :], qc, members[lo:hi].T, alpha=-2.0)
            qcn = (qc * qc).sum(1)
            self.stats["pairs"] += cnt * (hi - lo)
            if k == 1:
                val, at = part.min(dim=1)
                val = val.add_(qcn)
                better = val < best[qs, 0]
                qb = qs[better]
                best[qb, 0] = val[better]
                best_at[qb, 0] = at[better] + lo
            else:
                kk = min(k, hi - lo)
                val, at = part.topk(kk, dim=1, largest=False, sorted=False)
                val = val.add_(qcn[:, None])
                merged, pos = torch.cat([best[qs], val], 1).topk(k, dim=1, largest=False)
                best[qs] = merged
                best_at[qs] = torch.cat([best_at[qs], at + lo], 1).gather(1, pos)
