"""The memory bank and its nearest-neighbour search (faiss, or torch on a GPU).

:func:`build_index` is the factory: it takes the memory bank ``(N, d)`` and an index kind

* ``"flat"``: exact search (the paper). On the CPU a faiss ``IndexFlatL2`` for small banks; from
  :data:`PRUNED_MIN_BANK` vectors on, :class:`PrunedFlatIndex` for narrow banks (it skips the
  clusters of the bank that cannot hold a query's neighbours, bounds from the triangle inequality:
  6-10x less time on MVTec bottle, 201 dims) and, from :data:`SCREENED_MIN_DIM` dimensions on,
  :class:`patchknn.exact.ScreenedFlatIndex` (a low-dimensional lower bound with a proven round-off
  margin, then a float64 re-check: the float64 scan's answer; there cluster radii exceed the
  neighbour distances and cluster pruning skips almost nothing). On a CUDA device the plain faiss
  flat index on the GPU when this faiss build has GPU support, otherwise an exact chunked
  ``||q||^2 - 2 q.b + ||b||^2`` search with torch on that device (:class:`TorchFlatIndex`).
* ``"ivf"``: faiss ``IndexIVFFlat`` (inverted lists; approximate unless ``nprobe >= nlist``). The
  k-means training is seeded, so the same bank and seed give the same index.
* ``"hnsw"``: faiss ``IndexHNSWFlat`` (graph; approximate). Vectors are inserted one thread at a
  time in bank order, so the graph, and every search result, is deterministic.

Every index keeps the bank it was built from (``.bank``, float32 ``(N, d)``; a saved model stores
only that and rebuilds the index on load) and answers ``.search(queries, k)`` with Euclidean
distances ``(M, k)`` in increasing order (faiss returns squared L2; we take the square root).

Example:
    >>> import numpy as np
    >>> bank = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    >>> index = build_index(bank, "flat")
    >>> d = index.search(bank[:3], k=1)
    >>> bool(np.allclose(d, 0, atol=1e-3))
    True
    >>> build_index(bank, "hnsw", IndexParams(hnsw_ef_search=100)).search(bank[:3], k=1).shape
    (3, 1)
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import faiss
import numpy as np
import torch

from patchknn.errors import ConfigError, NotFittedError

INDEX_KINDS = ("flat", "ivf", "hnsw")
#: From this bank size on, the exact CPU search is :class:`PrunedFlatIndex` (same results, less work).
PRUNED_MIN_BANK = 16384
#: From this dimension on (and PRUNED_MIN_BANK rows), the exact CPU search is
#: :class:`patchknn.exact.ScreenedFlatIndex`: cluster radii exceed neighbour distances in such
#: spaces (1.6 % of the pairs pruned on a 711-dim bank), a low-dimensional lower bound does better.
SCREENED_MIN_DIM = 256


@dataclass(frozen=True)
class IndexParams:
    """Parameters of the approximate indexes (ignored by ``"flat"``).

    Attributes:
        nlist: IVF inverted lists; 0 = ``4 * sqrt(N)`` (at most ``N // 39``, faiss's minimum of
            training points per centroid, and at least 1). Never more than the bank size.
        nprobe: IVF lists visited per query (``nprobe >= nlist`` = exact).
        hnsw_m: HNSW graph degree.
        hnsw_ef_search: HNSW search breadth (larger = closer to exact, slower).
        hnsw_ef_construction: HNSW build breadth.
    """

    nlist: int = 0
    nprobe: int = 8
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    hnsw_ef_construction: int = 64

    @classmethod
    def from_config(cls, config: Any) -> IndexParams:
        """From a :class:`~patchknn.config.PatchKNNConfig` (``index_nlist``, ``index_nprobe``, ...)."""
        return cls(
            nlist=int(config.index_nlist),
            nprobe=int(config.index_nprobe),
            hnsw_m=int(config.hnsw_m),
            hnsw_ef_search=int(config.hnsw_ef_search),
        )

    @classmethod
    def coerce(cls, params: IndexParams | Mapping[str, Any] | None) -> IndexParams:
        if params is None:
            return cls()
        if isinstance(params, IndexParams):
            return params
        if isinstance(params, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(params) - known)
            if unknown:
                raise ConfigError(f"unknown index parameter(s) {unknown}; known: {sorted(known)}")
            return cls(**{k: int(v) for k, v in params.items()})
        raise ConfigError(f"index params must be an IndexParams or a mapping, got {type(params).__name__}")


# ----------------------------------------------------------------------------------- threads
def default_threads() -> int:
    """Threads for the search: torch's intra-op thread count (respects ``OMP_NUM_THREADS`` and
    ``torch.set_num_threads``), at most the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus))


def set_search_threads(n: int | None = None) -> int:
    """Set faiss's OpenMP thread count (``None`` = :func:`default_threads`); returns it."""
    n = default_threads() if n is None else max(1, int(n))
    faiss.omp_set_num_threads(n)
    return n


@contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU operations on one thread inside the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def faiss_has_gpu() -> bool:
    """Whether this faiss build has GPU support and sees at least one GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return int(faiss.get_num_gpus()) > 0
    except Exception:  # noqa: BLE001 - a broken CUDA runtime means no GPU
        return False


def _check_bank(bank: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(bank, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConfigError(f"memory bank must be a non-empty (N, d) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ConfigError("memory bank contains NaN or Inf")
    return arr


def _sqrt_sorted(sq: np.ndarray) -> np.ndarray:
    sq = np.asarray(sq, dtype=np.float32)
    return np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq)


# ---------------------------------------------------------------------------------- indexes
class MemoryBankIndex:
    """Exact (flat) L2 search over a memory bank with faiss on the CPU; base of the other kinds.

    ``MemoryBankIndex().build(bank)`` is the exact index; use :func:`build_index` for the others.
    """

    kind = "flat"
    device = "cpu"

    def __init__(self) -> None:
        self._index: Any = None
        self.bank: np.ndarray | None = None

    def build(self, bank: np.ndarray) -> MemoryBankIndex:
        """Index ``bank`` ``(N, d)`` float32; returns ``self``."""
        bank = _check_bank(bank)
        self._index = self._make(bank)
        self.bank = bank
        return self

    def _make(self, bank: np.ndarray) -> Any:
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank)
        return index

    @property
    def size(self) -> int:
        return 0 if self.bank is None else int(self.bank.shape[0])

    @property
    def dim(self) -> int:
        return 0 if self.bank is None else int(self.bank.shape[1])

    def _check_query(self, queries: np.ndarray | torch.Tensor, k: int) -> None:
        if self._index is None:
            raise NotFittedError("the memory bank index is empty; fit the model first")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        if k > self.size:
            raise ConfigError(f"k={k} is larger than the memory bank ({self.size} patches)")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(f"queries must be (M, {self.dim}), got shape {tuple(queries.shape)}")

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 1) -> np.ndarray:
        """Euclidean distances ``(M, k)`` from each query to its ``k`` nearest bank vectors."""
        self._check_query(queries, k)
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().cpu().numpy()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.shape[0] == 0:
            return np.zeros((0, k), dtype=np.float32)
        sq, _ = self._index.search(q, int(k))
        return _sqrt_sorted(sq)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, size={self.size}, dim={self.dim}, device={self.device!r})"


FlatIndex = MemoryBankIndex


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
        with _faiss_threads(1):
            index.add(bank)
        return index

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 1) -> np.ndarray:
        self._check_query(queries, k)
        # efSearch below k would return fewer than k neighbours
        self._index.hnsw.efSearch = int(max(self.params.hnsw_ef_search, k))
        return super().search(queries, k)


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
        self._pool: Any = None
        self._pool_size = 0

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
        self._check_query(queries, k)
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().cpu().numpy()
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        m = q.shape[0]
        if m == 0:
            return np.zeros((0, k), dtype=np.float32)
        threads = min(self.threads or default_threads(), max(1, m // 256))
        if threads == 1:
            return _sqrt_sorted(self._search_block(q, k).numpy())
        if self._pool is None or self._pool_size != threads:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="patchknn-search")
            self._pool_size = threads
        intra = torch.get_num_threads()
        try:
            blocks = torch.tensor_split(q, threads)
            results = list(self._pool.map(lambda blk: self._search_block(blk, k, single=True), blocks))
        finally:
            torch.set_num_threads(intra)  # MKL's thread count is process-wide: restore it here
        return _sqrt_sorted(torch.cat(results).numpy())

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


class FaissGpuIndex(MemoryBankIndex):
    """A flat or IVF faiss index copied to a GPU (faiss builds with GPU support only)."""

    def __init__(self, inner: MemoryBankIndex, device: torch.device) -> None:
        super().__init__()
        self.inner = inner
        self.kind = inner.kind
        self.device = str(device)
        self._gpu = device.index or 0

    def _make(self, bank: np.ndarray) -> Any:
        cpu_index = self.inner._make(bank)
        if not isinstance(cpu_index, faiss.Index):  # e.g. a PrunedFlatIndex's structure: not copyable
            raise ConfigError(f"{type(self.inner).__name__} has no faiss GPU form; use a flat or IVF faiss index")
        self._res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._res, self._gpu, cpu_index)


class TorchFlatIndex(MemoryBankIndex):
    """Exact search with torch: ``||q||^2 - 2 q.b + ||b||^2``, chunked, on any torch device.

    The GPU path when faiss has no GPU support. Chunks keep the ``(queries x bank)`` block within
    ``block_elements`` floats.
    """

    kind = "flat"

    def __init__(self, device: str | torch.device = "cpu", block_elements: int = 1 << 24) -> None:
        super().__init__()
        self.device = str(torch.device(device))
        self.block_elements = int(block_elements)

    def _make(self, bank: np.ndarray) -> Any:
        dev = torch.device(self.device)
        b = torch.from_numpy(bank).to(dev)
        norms = (b * b).sum(1)
        return (b, norms)

    @torch.inference_mode()
    def search(self, queries: np.ndarray | torch.Tensor, k: int = 1) -> np.ndarray:
        self._check_query(queries, k)
        b, bn = self._index
        dev = b.device
        q_all = torch.as_tensor(queries, dtype=torch.float32).to(dev)
        m, n = q_all.shape[0], b.shape[0]
        if m == 0:
            return np.zeros((0, k), dtype=np.float32)
        q_step = min(m, 8192)
        b_step = max(k, self.block_elements // q_step)
        out = []
        for qs in range(0, m, q_step):
            q = q_all[qs : qs + q_step]
            qn = (q * q).sum(1, keepdim=True)
            best: torch.Tensor | None = None
            for bs in range(0, n, b_step):
                d2 = torch.addmm(bn[bs : bs + b_step][None, :], q, b[bs : bs + b_step].T, alpha=-2.0)
                d2.add_(qn)
                if k == 1:
                    part = d2.min(dim=1, keepdim=True).values
                    best = part if best is None else torch.minimum(best, part)
                else:
                    kk = min(k, d2.shape[1])
                    part = d2.topk(kk, dim=1, largest=False).values
                    best = part if best is None else torch.cat([best, part], 1).topk(k, dim=1, largest=False).values
            assert best is not None
            out.append(best.sort(dim=1).values.cpu())
        return _sqrt_sorted(torch.cat(out).numpy())


# ---------------------------------------------------------------------------------- factory
def build_index(
    bank: np.ndarray,
    kind: str = "flat",
    params: IndexParams | Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    centroids: np.ndarray | None = None,
) -> MemoryBankIndex:
    """Build the search index of a memory bank.

    Args:
        bank: ``(N, d)`` float32 memory bank (kept as ``.bank``).
        kind: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``.
        params: :class:`IndexParams` (or a mapping of its fields) for IVF/HNSW.
        seed: seeds IVF's k-means and HNSW's level assignment.
        device: ``"cpu"`` or a CUDA device. On CUDA: faiss GPU indexes when faiss has GPU
            support (flat, IVF); otherwise the exact torch search on the GPU for ``"flat"``, and
            the CPU (with a warning) for IVF and HNSW. HNSW always searches on the CPU.
        threads: faiss OpenMP threads (``None`` = torch's thread count, see :func:`default_threads`).
        centroids: IVF only: coarse centroids trained before (see :attr:`IVFIndex.centroids`);
            ``None`` = train them on ``bank``.

    Returns:
        A :class:`MemoryBankIndex` (``.bank``, ``.size``, ``.search(queries, k)``).
    """
    if kind not in INDEX_KINDS:
        raise ConfigError(f"index must be one of {INDEX_KINDS}, got {kind!r}")
    p = IndexParams.coerce(params)
    dev = torch.device(device)
    set_search_threads(threads)

    def cpu_index() -> MemoryBankIndex:
        if kind == "ivf":
            return IVFIndex(p, seed, centroids)
        if kind == "hnsw":
            return HNSWIndex(p, seed)
        if len(bank) >= PRUNED_MIN_BANK and bank.shape[1] >= SCREENED_MIN_DIM:
            from patchknn.exact import ScreenedFlatIndex  # imports this module

            return ScreenedFlatIndex(threads=threads)
        if len(bank) >= PRUNED_MIN_BANK:
            return PrunedFlatIndex(seed=seed, threads=threads)
        return MemoryBankIndex()

    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(dev)!r} requested but no CUDA device is available; use device='cpu'")
        if kind in ("flat", "ivf") and faiss_has_gpu():
            # the plain faiss flat index on the GPU (the CPU's pruned/screened exact search is a
            # CPU structure faiss cannot copy; a full GPU scan is fast anyway)
            inner = MemoryBankIndex() if kind == "flat" else cpu_index()
            return FaissGpuIndex(inner, dev).build(bank)
        if kind == "flat":
            return TorchFlatIndex(dev).build(bank)
        reason = "has no GPU support" if not hasattr(faiss, "StandardGpuResources") else "sees no GPU"
        if kind == "hnsw":
            reason = "has no GPU HNSW index"
        warnings.warn(
            f"faiss {reason}: the {kind!r} search runs on the CPU; use index='flat' for an exact "
            "search on the GPU (torch), or install a faiss build with GPU support",
            RuntimeWarning,
            stacklevel=2,
        )
    elif dev.type != "cpu":
        raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {str(dev)!r}")
    return cpu_index().build(bank)


__all__ = [
    "INDEX_KINDS",
    "FaissGpuIndex",
    "FlatIndex",
    "HNSWIndex",
    "IVFIndex",
    "IndexParams",
    "MemoryBankIndex",
    "PRUNED_MIN_BANK",
    "PrunedFlatIndex",
    "TorchFlatIndex",
    "build_index",
    "default_threads",
    "faiss_has_gpu",
    "set_search_threads",
    "single_threaded",
]
