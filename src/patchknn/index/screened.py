"""The exact ``"flat"`` search of large, wide banks on the CPU (:class:`ScreenedFlatIndex`): a
lower bound in few dimensions screens the bank, and the few rows it cannot rule out are re-checked
in float64 (:mod:`patchknn.index.bounds` proves the bound; :mod:`patchknn.index.quantized` computes
the same screen with an int8 matrix product and a proven quantisation bound, the default where
torch has it). The answers are the float64 scan's either way.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from patchknn.index.base import MemoryBankIndex, default_threads
from patchknn.index.bounds import BLOCK_QUERIES, CHUNK_ROWS, BoundedFlatIndex, auto_head_dim
from patchknn.index.quantized import MAX_DIGITS, QuantizedBounds, int8_matmul_available

#: The screens: ``"int8"`` (:class:`QuantizedBounds`) and ``"float32"`` (:class:`BoundedFlatIndex`).
SCREENS = ("int8", "float32")


class ScreenedFlatIndex(MemoryBankIndex):
    """The exact ``"flat"`` index of large banks on the CPU (see the module docstring).

    Same interface and results as :class:`~patchknn.index.MemoryBankIndex` (``.bank``,
    ``.search(queries, k)`` -> sorted Euclidean distances); blocks of queries run in parallel on
    ``threads`` threads, each single-threaded (many mid-sized products scale better that way).
    ``stats`` counts the screened and the exactly re-checked (query, row) pairs (and, with the
    int8 screen, the pairs each stage kept). ``screen``: ``"int8"`` (default where torch has the CPU
    int8 product) or ``"float32"``; the same answers, bit for bit.
    """

    kind = "flat"

    def __init__(
        self, head_dim: int | None = None, threads: int | None = None, chunk_rows: int | None = None,
        screen: str | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.threads = threads
        self.chunk_rows = None if chunk_rows is None else int(chunk_rows)  # None: the screen's own
        if screen is None:
            screen = "int8" if int8_matmul_available() else "float32"
        if screen not in SCREENS:
            raise ValueError(f"screen must be one of {SCREENS}, got {screen!r}")
        self.screen = screen
        self.stats: dict[str, int] = {}
        self._stats_lock = threading.Lock()

    def _make(self, bank: np.ndarray) -> Any:
        # int8: exact int32 sums need 127^2 x (columns) < 2^31 (any bank below ~133,000 dims)
        int8 = self.screen == "int8" and 127 * 127 * (bank.shape[1] + 1 + MAX_DIGITS) < 2**31
        return (QuantizedBounds if int8 else BoundedFlatIndex)(bank, self.head_dim, self.chunk_rows)

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 1) -> np.ndarray:
        q = self._query_tensor(queries, k)
        m = q.shape[0]
        if m == 0:
            return np.zeros((0, k), dtype=np.float32)
        blocks = list(torch.split(q, self._index.block_queries))
        threads = min(self.threads or default_threads(), len(blocks))
        stats: list[dict[str, int]] = [{} for _ in blocks]

        def run(i: int) -> torch.Tensor:
            torch.set_num_threads(1)  # this worker thread only (OpenMP settings are per thread)
            return self._index.search_block(blocks[i], int(k), stats[i])

        intra = torch.get_num_threads()
        try:
            if threads == 1:
                results = [run(i) for i in range(len(blocks))]
            else:
                results = list(self._thread_pool(threads).map(run, range(len(blocks))))
        finally:
            torch.set_num_threads(intra)  # MKL's thread count is process-wide: restore it here
        with self._stats_lock:  # search() may be called from several threads at once
            for st in stats:
                for key, val in st.items():
                    self.stats[key] = self.stats.get(key, 0) + val
        return torch.cat(results).sqrt_().float().numpy()


__all__ = [
    "BLOCK_QUERIES", "CHUNK_ROWS", "SCREENS", "BoundedFlatIndex", "QuantizedBounds", "ScreenedFlatIndex",
    "auto_head_dim",
]
