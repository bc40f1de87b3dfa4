"""Search on a GPU: faiss' GPU indexes, or an exact torch search."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

from patchknn.errors import ConfigError
from patchknn.index.base import MemoryBankIndex, sqrt_sorted


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
        return sqrt_sorted(torch.cat(out).numpy())
