"""The memory bank index: its parameters, the search threads, and the exact flat index (faiss),
base of every other kind."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import faiss
import numpy as np

from patchknn.errors import ConfigError, NotFittedError

INDEX_KINDS = ("flat", "ivf", "hnsw")
#: From this bank size on, the exact CPU search is :class:`PrunedFlatIndex` (same results, less work).
PRUNED_MIN_BANK = 16384
#: From this dimension on (and PRUNED_MIN_BANK rows), the exact CPU search is
#: :class:`patchknn.index.screened.ScreenedFlatIndex`: cluster radii exceed neighbour distances in such
#: spaces (1.6 % of the pairs pruned on a 711-dim bank), a low-dimensional lower bound does better.
SCREENED_MIN_DIM = 256
#: Candidates beyond ``k`` that the faiss flat index re-checks in float64 (see ``MemoryBankIndex.search``).
RECHECK = 16


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
    ``torch.set_num_threads``) when torch is loaded, at most the CPUs this process may run on
    (all of them without torch: :mod:`patchknn.runtime`)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    torch = sys.modules.get("torch")  # the search itself needs no torch: never import it here
    if torch is None or not hasattr(torch, "get_num_threads"):
        return cpus
    return max(1, min(torch.get_num_threads(), cpus))


def set_search_threads(n: int | None = None) -> int:
    """Set faiss's OpenMP thread count (``None`` = :func:`default_threads`); returns it."""
    n = default_threads() if n is None else max(1, int(n))
    faiss.omp_set_num_threads(n)
    return n


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU operations on one thread inside the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_BLAS: list[Any] = []  # the threadpoolctl controller, made on first use (it scans the loaded libraries)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """numpy's BLAS on one thread inside the block (restored after): the numpy searches run one
    single-threaded block of queries per worker thread; a multi-threaded BLAS under them spins
    its threads against the workers (25x slower on 2 cores)."""
    if not _BLAS:
        from threadpoolctl import ThreadpoolController

        _BLAS.append(ThreadpoolController())
    with _BLAS[0].limit(limits=1, user_api="blas"):
        yield


def faiss_has_gpu() -> bool:
    """Whether this faiss build has GPU support and sees at least one GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return int(faiss.get_num_gpus()) > 0
    except Exception:  # noqa: BLE001 - a broken CUDA runtime means no GPU
        return False


def check_bank(bank: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(bank, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConfigError(f"memory bank must be a non-empty (N, d) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ConfigError("memory bank contains NaN or Inf")
    return arr


def sqrt_sorted(sq: np.ndarray) -> np.ndarray:
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
        self._pool: Any = None  # search threads of the torch-based exact searches (_thread_pool)
        self._pool_size = 0

    def build(self, bank: np.ndarray) -> MemoryBankIndex:
        """Index ``bank`` ``(N, d)`` float32; returns ``self``."""
        bank = check_bank(bank)
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

    def _check_query(self, queries: Any, k: int) -> None:
        if self._index is None:
            raise NotFittedError("the memory bank index is empty; fit the model first")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        if k > self.size:
            raise ConfigError(f"k={k} is larger than the memory bank ({self.size} patches)")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(f"queries must be (M, {self.dim}), got shape {tuple(queries.shape)}")

    def _query_array(self, queries: Any, k: int) -> np.ndarray:
        """Checked queries (numpy, or a torch tensor on any device) as a contiguous float32 array."""
        self._check_query(queries, k)
        if hasattr(queries, "detach"):  # a torch tensor (torch itself is not imported here)
            queries = queries.detach().cpu().numpy()
        return np.ascontiguousarray(queries, dtype=np.float32)

    def _query_tensor(self, queries: Any, k: int) -> Any:
        """Checked queries as a contiguous float32 CPU tensor (for the torch-based searches)."""
        import torch

        return torch.from_numpy(self._query_array(queries, k))

    def _thread_pool(self, threads: int) -> Any:
        """A pool of ``threads`` search threads, kept while its size is the one asked for."""
        if self._pool is None or self._pool_size != threads:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="patchknn-search")
            self._pool_size = threads
        return self._pool

    def search(self, queries: Any, k: int = 1) -> np.ndarray:
        """Euclidean distances ``(M, k)`` from each query to its ``k`` nearest bank vectors.

        The flat index re-checks faiss's ``k +`` :data:`RECHECK` nearest candidates in float64 and
        keeps the ``k`` smallest: faiss's float32 ``||q||^2 - 2 q.b + ||b||^2`` errs by about
        ``1e-7 ||q||^2``, more than the gaps between near-tied rows and than the smallest distances
        themselves on flat image backgrounds (``PrunedFlatIndex`` and ``ScreenedFlatIndex``, the
        large banks' exact searches, give the float64 scan's answer with a proven bound)."""
        q = self._query_array(queries, k)
        if q.shape[0] == 0:
            return np.zeros((0, k), dtype=np.float32)
        if self.kind != "flat" or self.bank is None:
            sq, _ = self._index.search(q, int(k))
            return sqrt_sorted(sq)
        depth = min(self.size, int(k) + RECHECK)
        _, ids = self._index.search(q, depth)
        ids = np.where(ids < 0, 0, ids)
        out = np.empty((q.shape[0], int(k)), dtype=np.float64)
        step = max(1, (1 << 22) // max(1, depth * q.shape[1]))  # bounded float64 temporaries
        for a in range(0, q.shape[0], step):
            diff = self.bank[ids[a : a + step]].astype(np.float64) - q[a : a + step, None, :].astype(np.float64)
            sq64 = np.einsum("mkd,mkd->mk", diff, diff)
            out[a : a + step] = np.sort(sq64, axis=1)[:, : int(k)]
        return np.sqrt(out).astype(np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, size={self.size}, dim={self.dim}, device={self.device!r})"


FlatIndex = MemoryBankIndex
