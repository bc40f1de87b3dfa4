"""PCA with an explained-variance cut, fitted from streamed moments (exact, not randomised).

The normal patches arrive batch by batch; :class:`MomentAccumulator` keeps their count, sum and
scatter matrix in float64 so the PCA is the exact eigen-decomposition of the covariance of all
patches, without holding a second copy of them.

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32)
    >>> acc = MomentAccumulator(8); acc.update(x)
    >>> pca = PCA.from_moments(acc, variance=0.95)
    >>> pca.transform(x).shape[1] <= 8
    True
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import blas

from patchknn.errors import ConfigError


class MomentAccumulator:
    """Running count, mean shift, sum and scatter of row vectors (numerically stable).

    Rows are centred on a fixed shift (the first batch's mean) before the float32 outer products,
    which are added to float64 accumulators. The outer products are a symmetric rank-k update
    (BLAS ``ssyrk``: half the work of a general matrix product); only the upper triangle is
    accumulated and the matrix is mirrored when it is read.
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.scatter = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, rows: torch.Tensor | np.ndarray) -> None:
        x = torch.as_tensor(rows, dtype=torch.float32).reshape(-1, self.dim)
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x.double().mean(0).float()
        xc_t = x - self.shift
        self.sum += xc_t.sum(0).double()  # float32 partial sums of one batch of centred rows
        xc = xc_t.numpy()
        # xc.T is Fortran-ordered (D, N): ssyrk(trans=0) gives its upper triangle of xc.T @ xc, no copy
        upper = blas.ssyrk(1.0, xc.T, trans=0, lower=0)
        self.scatter += torch.from_numpy(np.triu(upper)).double()
        self.n += x.shape[0]

    @property
    def scatter_matrix(self) -> torch.Tensor:
        """The full symmetric ``(D, D)`` scatter of the centred rows (float64)."""
        upper = self.scatter
        return upper + upper.T - torch.diag(torch.diagonal(upper))

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 1 or self.shift is None:
            raise ConfigError("PCA needs at least one patch vector")
        mean_c = self.sum / self.n
        cov = self.scatter_matrix / self.n - torch.outer(mean_c, mean_c)
        cov = (cov + cov.T) / 2
        return mean_c + self.shift.double(), cov


class PCA:
    """A fitted PCA: ``transform(x) = (x - mean) @ components.T``.

    Attributes:
        mean: ``(D,)`` float32.
        components: ``(d, D)`` float32, rows ordered by decreasing variance.
        explained_variance_ratio: ``(d,)`` share of the total variance of each kept component.
        mean_tensor, components_tensor: the same ``mean`` and ``components`` as torch tensors
            (sharing their memory), for projecting inside torch code.
    """

    def __init__(self, mean: np.ndarray, components: np.ndarray, explained_variance_ratio: np.ndarray):
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.components = np.ascontiguousarray(components, dtype=np.float32)
        self.explained_variance_ratio = np.asarray(explained_variance_ratio, dtype=np.float64)
        self.mean_tensor = torch.from_numpy(self.mean)
        self.components_tensor = torch.from_numpy(self.components)

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def from_moments(cls, acc: MomentAccumulator, variance: float) -> PCA:
        """Keep the fewest leading components whose variance shares sum to at least ``variance``.

        With zero total variance (e.g. identical constant images) one component is kept: every
        patch then maps to the same point and all distances are 0.
        """
        if not 0.0 < variance <= 1.0:
            raise ConfigError(f"pca_variance must be in (0, 1], got {variance}")
        mean, cov = acc.mean_and_covariance()
        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.flip(0).clamp_min(0.0)
        evecs = evecs.flip(1)
        total = float(evals.sum())
        if not np.isfinite(total):
            raise ConfigError("PCA: the patch features contain NaN or Inf")
        max_rank = max(1, min(acc.n - 1, acc.dim))
        if total <= 0.0:
            n_keep = 1
            ratio = np.zeros(1)
        else:
            ratio = (evals / total).numpy()
            cum = np.cumsum(ratio)
            # fewest components with cumulative ratio >= variance (tolerate float round-off at 1.0)
            n_keep = int(np.searchsorted(cum, variance - 1e-12, side="left")) + 1
            n_keep = min(n_keep, max_rank)
        comps = evecs[:, :n_keep].T.contiguous()
        # deterministic signs: the largest-magnitude entry of each component is positive
        idx = comps.abs().argmax(dim=1)
        signs = torch.sign(comps[torch.arange(n_keep), idx])
        signs[signs == 0] = 1
        comps = comps * signs[:, None]
        return cls(mean.numpy(), comps.numpy(), ratio[:n_keep])

    def transform(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``(N, D)`` -> ``(N, d)`` float32 tensor."""
        t = torch.as_tensor(x, dtype=torch.float32)
        return (t - self.mean_tensor) @ self.components_tensor.T
