"""The memory bank and its nearest-neighbour search (faiss, or torch on a GPU).

:func:`build_index` is the factory: it takes the memory bank ``(N, d)`` and an index kind

* ``"flat"``: exact search (the paper). On the CPU a faiss ``IndexFlatL2`` for small banks; from
  :data:`PRUNED_MIN_BANK` vectors on, :class:`PrunedFlatIndex` for narrow banks (it skips the
  clusters of the bank that cannot hold a query's neighbours, bounds from the triangle inequality,
  and re-checks in float64 every row its round-off bound cannot rule out: the float64 scan's
  answer) and, from :data:`SCREENED_MIN_DIM` dimensions on,
  :class:`patchknn.index.screened.ScreenedFlatIndex` (a low-dimensional lower bound with a proven round-off
  margin, computed by an int8 matrix product with a proven quantisation margin where torch has
  one, then a float64 re-check: the float64 scan's answer too; there cluster radii exceed the
  neighbour distances and cluster pruning skips almost nothing). The CPU searches need no torch
  (numpy, faiss), except the screened one: where torch is not loaded (:mod:`patchknn.runtime`) the
  pruned search serves wide banks as well, with the same answers. On a CUDA device the plain faiss
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

import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from patchknn.errors import ConfigError
from patchknn.index.approximate import HNSWIndex, IVFIndex
from patchknn.index.base import (
    INDEX_KINDS,
    PRUNED_MIN_BANK,
    SCREENED_MIN_DIM,
    FlatIndex,
    IndexParams,
    MemoryBankIndex,
    default_threads,
    faiss_has_gpu,
    set_search_threads,
    single_threaded,
)
from patchknn.index.pruned import PrunedFlatIndex

if TYPE_CHECKING:
    from patchknn.index.gpu import FaissGpuIndex, TorchFlatIndex
    from patchknn.index.screened import ScreenedFlatIndex

_TORCH_BASED = {"FaissGpuIndex": "gpu", "TorchFlatIndex": "gpu", "ScreenedFlatIndex": "screened"}


def __getattr__(name: str) -> Any:
    # the GPU and the screened searches use torch: imported on first use, so the CPU search
    # (flat, pruned, IVF, HNSW) runs where torch is not installed (patchknn.runtime)
    if name in _TORCH_BASED:
        import importlib

        return getattr(importlib.import_module(f"patchknn.index.{_TORCH_BASED[name]}"), name)
    raise AttributeError(f"module 'patchknn.index' has no attribute {name!r}")


# ---------------------------------------------------------------------------------- factory
def build_index(
    bank: np.ndarray,
    kind: str = "flat",
    params: IndexParams | Mapping[str, Any] | None = None,
    seed: int = 0,
    device: Any = "cpu",
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
    set_search_threads(threads)

    def cpu_index() -> MemoryBankIndex:
        if kind == "ivf":
            return IVFIndex(p, seed, centroids)
        if kind == "hnsw":
            return HNSWIndex(p, seed)
        # the screened search runs on torch: where torch is not loaded (patchknn.runtime) the
        # pruned one, which is exact as well (both give the float64 scan's answer)
        if len(bank) >= PRUNED_MIN_BANK and bank.shape[1] >= SCREENED_MIN_DIM and sys.modules.get("torch"):
            from patchknn.index.screened import ScreenedFlatIndex

            return ScreenedFlatIndex(threads=threads)
        if len(bank) >= PRUNED_MIN_BANK:
            return PrunedFlatIndex(seed=seed, threads=threads)
        return MemoryBankIndex()

    if str(device) == "cpu":
        return cpu_index().build(bank)
    import torch

    from patchknn.index.gpu import FaissGpuIndex, TorchFlatIndex

    dev = torch.device(device)
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
    "SCREENED_MIN_DIM",
    "ScreenedFlatIndex",
    "TorchFlatIndex",
    "build_index",
    "default_threads",
    "faiss_has_gpu",
    "set_search_threads",
    "single_threaded",
]
