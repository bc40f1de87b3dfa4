"""The memory bank and its nearest-neighbour search (faiss).

Distances are Euclidean (faiss returns squared L2; we take the square root).

Example:
    >>> import numpy as np
    >>> bank = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    >>> index = MemoryBankIndex().build(bank)
    >>> d = index.search(bank[:3], k=1)
    >>> bool(np.allclose(d, 0, atol=1e-3))
    True
"""

from __future__ import annotations

import faiss
import numpy as np

from patchknn.errors import ConfigError, NotFittedError


class MemoryBankIndex:
    """Exact (flat) L2 search over a memory bank of patch vectors."""

    kind = "flat"

    def __init__(self) -> None:
        self._index: faiss.Index | None = None
        self.bank: np.ndarray | None = None

    def build(self, bank: np.ndarray) -> MemoryBankIndex:
        """Index ``bank`` ``(N, d)`` float32; returns ``self``."""
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ConfigError(f"memory bank must be a non-empty (N, d) array, got shape {bank.shape}")
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank)
        self._index = index
        self.bank = bank
        return self

    @property
    def size(self) -> int:
        return 0 if self.bank is None else int(self.bank.shape[0])

    def search(self, queries: np.ndarray, k: int = 1) -> np.ndarray:
        """Euclidean distances ``(M, k)`` from each query to its ``k`` nearest bank vectors."""
        if self._index is None:
            raise NotFittedError("the memory bank index is empty; fit the model first")
        if k > self.size:
            raise ConfigError(f"k={k} is larger than the memory bank ({self.size} patches)")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        sq, _ = self._index.search(q, k)
        return np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq)
