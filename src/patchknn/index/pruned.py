"""Exact search that skips clusters of the bank that cannot hold a query's neighbours (numpy + faiss's
k-means; no torch, so :mod:`patchknn.runtime` runs the very same search as the torch model)."""

from __future__ import annotations

import threading
from typing import Any

import faiss
import numpy as np

from patchknn.index.base import MemoryBankIndex, default_threads, single_threaded_blas

#: float32 unit round-off.
U32 = 2.0**-24
#: At most this many queries per block (one block per worker thread at a time). The queries are
#: split into as few equal blocks as the threads and this cap allow: the per-cluster work is a
#: Python loop over the clusters a block touches, so larger blocks cost less per query (bottle's
#: 163,856 x 201 bank, 12,544 queries = one predict batch of 16 images, CPU time per query with
#: blocks of 1,024 / 2,048 / 4,096 / 6,272 / 8,192: 0.154 / 0.119 / 0.098 / 0.088 / 0.094 ms).
BLOCK_QUERIES = 8192


def merge_smallest(best: np.ndarray, new: np.ndarray, k: int) -> np.ndarray:
    """Row-wise the ``k`` smallest of ``best`` ``(m, k)`` and ``new`` ``(m, j)``, sorted."""
    both = np.concatenate([best, new], axis=1)
    if both.shape[1] > k:
        both = np.partition(both, k - 1, axis=1)[:, :k]
    return np.sort(both, axis=1)


def smallest_per_query(m: int, qi: np.ndarray, vals: np.ndarray, k: int) -> np.ndarray:
    """``(m, k)`` sorted: for each query the ``k`` smallest of the values ``vals`` of its pairs
    (queries ``qi``; every query has at least ``k`` pairs)."""
    order = np.lexsort((vals, qi))
    qi, vals = qi[order], vals[order]
    starts = np.searchsorted(qi, np.arange(m))
    return vals[starts[:, None] + np.arange(k)[None, :]]


class PrunedFlatIndex(MemoryBankIndex):
    """Exact search that skips the parts of the bank that cannot hold a query's neighbours.

    The bank is split into ``nlist`` clusters (seeded k-means), each with its centre ``c`` and
    radius ``R`` (largest distance of a member to ``c``). By the triangle inequality no member of
    a cluster is closer to ``q`` than ``||q - c|| - R``. A query is first compared with the members
    of its nearest cluster, which bounds its k-th neighbour distance by some ``u``; then only the
    clusters with ``||q - c|| - R <= u`` are searched. On clustered data such as patch features most
    of the bank is skipped for most queries (on MVTec bottle about 5-8 % of the distances of the
    flat search are computed). Anomalous patches, far from everything, get close to a full scan.

    Exactness: distances are first computed in float32 as ``||b'||^2 - 2 q'.b' + ||q'||^2`` between
    vectors centred on the cluster centre (one matrix product per cluster), and their round-off is
    bounded: ``|v - ||q - b||^2| <= E = (2 gamma_d + 10 u) (||q'|| + R)^2`` (``gamma_d = d u / (1 - d u)``
    for the dot products and the squared norms, ``u = 2^-24`` for the centring and the additions, with
    a factor 2 to spare). ``ub``, the ``k``-th smallest ``v + E`` of distinct rows seen, bounds the
    true ``k``-th distance from above; every row with ``v - E <= ub`` is re-checked in float64
    (``sum((q - b)^2)`` of the float32 vectors) and the ``k`` smallest are returned: the float64
    scan's answer, as :class:`~patchknn.index.screened.ScreenedFlatIndex` gives. (Choosing the
    nearest row by the float32 value alone picks the wrong one of near-ties on flat backgrounds:
    1e-4 of the map's maximum on bottle.) The answer of a query depends on nothing but the query,
    so any split of the queries gives bit-identical results.

    Query blocks run in parallel on ``threads`` threads (numpy and BLAS release the GIL).
    """

    kind = "flat"

    def __init__(self, nlist: int = 0, seed: int = 0, threads: int | None = None) -> None:
        super().__init__()
        self.nlist = int(nlist)
        self.seed = int(seed)
        self.threads = threads
        self.stats = {"queries": 0, "pairs": 0, "rechecked": 0}
        self._stats_lock = threading.Lock()

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
        owner = assign[order]
        offsets = np.searchsorted(owner, np.arange(len(centres) + 1))
        members = bank[order] - centres[owner]  # centred on their cluster (float32)
        m64 = members.astype(np.float64)
        radius = np.zeros(len(centres), dtype=np.float64)
        np.maximum.at(radius, owner, np.sqrt(np.einsum("nd,nd->n", m64, m64)))
        del m64
        c64 = centres.astype(np.float64)
        # (-2 b', ||b'||^2): one product gives ||b'||^2 - 2 q'.b' for the query rows (q', 1)
        aug = np.empty((n, d + 1), dtype=np.float32)
        np.multiply(members, -2.0, out=aug[:, :d])  # exact (a power of two)
        aug[:, d] = np.einsum("nd,nd->n", members, members)
        del members
        return {
            "aug": aug,
            "order": order,
            "centres": centres,
            "centres64": c64,
            "centre_norms64": np.einsum("ld,ld->l", c64, c64),
            "radius": radius * (1 + 1e-6),
            "offsets": offsets.tolist(),
            "scale": float(np.sqrt(np.einsum("ld,ld->l", c64, c64).max())) + float(radius.max()),
            "err_factor": 2 * ((d + 1) * U32 / (1 - (d + 1) * U32)) + 10 * U32,
        }

    def search(self, queries: Any, k: int = 1) -> np.ndarray:
        q = self._query_array(queries, k)
        m = q.shape[0]
        if m == 0:
            return np.zeros((0, k), dtype=np.float32)
        threads = self.threads or default_threads()
        # a block's (queries x clusters) float64 bounds within 128 MB (a few such arrays per block),
        # and as many blocks per thread
        cap = max(1024, min(BLOCK_QUERIES, (1 << 24) // len(self._index["centres"])))
        parts = min(m, threads * -(-m // (cap * threads)))
        blocks = np.array_split(q, parts)
        threads = min(threads, len(blocks))
        with single_threaded_blas():
            if threads == 1:
                results = [self._search_block(b, int(k)) for b in blocks]
            else:
                results = list(self._thread_pool(threads).map(lambda b: self._search_block(b, int(k)), blocks))
        return np.sqrt(np.concatenate(results)).astype(np.float32)

    def _search_block(self, q: np.ndarray, k: int) -> np.ndarray:
        """Exact squared distances ``(m, k)`` (float64, sorted) of one block of queries."""
        ix = self._index
        m = q.shape[0]
        q64 = q.astype(np.float64)
        dc = ix["centre_norms64"][None, :] - 2.0 * (q64 @ ix["centres64"].T)
        dc += np.einsum("md,md->m", q64, q64)[:, None]
        dc = np.sqrt(np.maximum(dc, 0.0))
        ub = np.full((m, k), np.inf)  # k smallest upper bounds (v + E) of distinct rows, sorted
        done = np.zeros(dc.shape, dtype=bool)
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (query, member row, v - E)
        pairs = [0]  # distances computed by this block
        # pass 1: the nearest cluster, then the next nearest until k members have been seen
        order = np.argsort(dc, axis=1, kind="stable") if k > 1 else dc.argmin(axis=1)[:, None]
        todo = np.arange(m)
        step = 0
        while len(todo):
            lists = order[todo, step]
            self._scan(q, ub, found, todo, lists, k, pairs)
            done[todo, lists] = True
            step += 1
            todo = todo[np.isinf(ub[todo, k - 1])] if step < order.shape[1] else todo[:0]
        # pass 2: every other cluster whose lower bound is not above the k-th upper bound
        bound = np.sqrt(ub[:, k - 1]) + 1e-6 * ix["scale"]  # + the float64 round-off of dc
        need = (dc - ix["radius"][None, :]) <= bound[:, None]
        need &= ~done
        lists, qidx = np.nonzero(need.T)
        self._scan(q, ub, found, qidx, lists, k, pairs)
        # the float64 re-check of every row that may be among the k nearest
        qi = np.concatenate([f[0] for f in found])
        rows = np.concatenate([f[1] for f in found])
        low = np.concatenate([f[2] for f in found])
        keep = low <= ub[qi, k - 1]
        qi, rows = qi[keep], ix["order"][rows[keep]]
        exact = np.empty(len(qi), dtype=np.float64)
        step = max(1, (1 << 22) // max(1, q.shape[1]))  # bounded temporary memory
        bank = self.bank
        assert bank is not None
        for a in range(0, len(qi), step):
            diff = bank[rows[a : a + step]].astype(np.float64) - q64[qi[a : a + step]]
            exact[a : a + step] = np.einsum("nd,nd->n", diff, diff)
        with self._stats_lock:  # blocks run in worker threads
            self.stats["queries"] += m
            self.stats["rechecked"] += len(qi)
            self.stats["pairs"] += pairs[0]
        return smallest_per_query(m, qi, exact, k)

    def _scan(
        self,
        q: np.ndarray,
        ub: np.ndarray,
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
        qidx: np.ndarray,
        lists: np.ndarray,
        k: int,
        pairs: list[int],
    ) -> None:
        """Compare query ``qidx[i]`` with the members of cluster ``lists[i]``: update the upper
        bounds ``ub`` and add the rows that may be among the k nearest to ``found``."""
        if len(qidx) == 0:
            return
        ix = self._index
        srt = np.argsort(lists, kind="stable")
        lists, qidx = lists[srt], qidx[srt]
        counts = np.bincount(lists, minlength=len(ix["offsets"]) - 1)
        offsets, aug, centres = ix["offsets"], ix["aug"], ix["centres"]
        radius, factor = ix["radius"], ix["err_factor"]
        d = centres.shape[1]
        start = 0
        for j in np.flatnonzero(counts):
            cnt = int(counts[j])
            qs = qidx[start : start + cnt]
            start += cnt
            lo, hi = offsets[j], offsets[j + 1]
            qa = np.empty((cnt, d + 1), dtype=np.float32)
            np.subtract(q[qs], centres[j], out=qa[:, :d])
            qa[:, d] = 1.0
            qcn = np.einsum("md,md->m", qa[:, :d], qa[:, :d]).astype(np.float64)  # its round-off is in E
            # v = ||b'||^2 - 2 q'.b' in float32; v + ||q'||^2 is within E of the squared distance
            v = qa @ aug[lo:hi].T
            err = factor * (np.sqrt(qcn) * (1 + 1e-6) + radius[j]) ** 2
            pairs[0] += cnt * (hi - lo)
            if k == 1:
                ub[qs, 0] = np.minimum(ub[qs, 0], v.min(axis=1) + qcn + err)
            else:
                kk = min(k, hi - lo)
                low = np.partition(v, kk - 1, axis=1)[:, :kk] if kk < hi - lo else v
                ub[qs] = merge_smallest(ub[qs], low + (qcn + err)[:, None], k)
            # rows with v + ||q'||^2 - E <= ub may be among the k nearest (threshold rounded up)
            thr64 = ub[qs, k - 1] + err - qcn
            thr = thr64.astype(np.float32)
            thr = np.where(thr.astype(np.float64) < thr64, np.nextafter(thr, np.float32(np.inf)), thr)
            flat = np.flatnonzero(v <= thr[:, None])  # faster than a 2-D nonzero
            r, c = np.divmod(flat, hi - lo)
            found.append((qs[r], c + lo, v[r, c] + (qcn - err)[r]))
