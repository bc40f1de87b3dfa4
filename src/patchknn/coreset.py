"""Memory-bank reduction: greedy k-center coreset subsampling (PatchCore, Roth et al. 2022).

The coreset keeps ``ceil(ratio * N)`` patches chosen so that every dropped patch is close to a kept
one: start from a random patch (seeded), then repeatedly add the patch farthest from everything
kept so far. Distances for the selection are computed after a Gaussian random projection to
``projection_dim`` dimensions (Johnson-Lindenstrauss: distances are roughly preserved, the
selection is cheaper); the kept patches themselves are the original rows.

The selection is the textbook one (the incremental min-distance update, with torch on the CPU),
computed lazily so that most updates are one large matrix product instead of a pass over the
whole bank per selected patch (see :func:`_lazy_greedy`; tested equal to the textbook loop). The
projection is done in chunks; the extra memory is the projected bank (``N x projection_dim``
float32) and a few vectors.

Example:
    >>> import numpy as np
    >>> bank = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    >>> idx = greedy_coreset(bank, ratio=0.05, projection_dim=8, seed=0)
    >>> len(idx), len(set(idx.tolist()))
    (50, 50)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from patchknn.errors import ConfigError

_CHUNK = 65536


def coreset_size(n: int, ratio: float) -> int:
    """Number of patches a coreset of ``ratio`` keeps out of ``n``: ``ceil(ratio * n)``, in [1, n]."""
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not 0.0 < ratio <= 1.0:
        raise ConfigError(f"coreset ratio must be in (0, 1], got {ratio!r}")
    # guard float round-off such as 0.07 * 100 = 7.000000000000001
    m = math.ceil(round(float(ratio) * n, 9))
    return int(min(max(m, 1), n))


def random_projection(bank: np.ndarray, projection_dim: int, seed: int = 0) -> torch.Tensor:
    """``bank @ R`` with ``R`` Gaussian ``(d, projection_dim) / sqrt(projection_dim)`` (seeded).

    When ``projection_dim >= d`` the bank is returned unprojected (as a tensor sharing memory).
    """
    x = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    n, d = x.shape
    if projection_dim >= d:
        return x
    gen = np.random.default_rng(seed)
    r = torch.from_numpy((gen.standard_normal((d, projection_dim)) / math.sqrt(projection_dim)).astype(np.float32))
    out = torch.empty((n, projection_dim), dtype=torch.float32)
    for i in range(0, n, _CHUNK):
        torch.matmul(x[i : i + _CHUNK], r, out=out[i : i + _CHUNK])
    return out


@torch.inference_mode()
def greedy_coreset(bank: np.ndarray, ratio: float, projection_dim: int = 128, seed: int = 0) -> np.ndarray:
    """Indices of a greedy k-center coreset of ``bank`` (in the order they were selected).

    Args:
        bank: ``(N, d)`` float32 memory bank.
        ratio: share of the rows to keep, in ``(0, 1]``; ``ceil(ratio * N)`` rows are kept.
        projection_dim: dimension of the random projection used for the distances
            (no projection when it is ``>= d``).
        seed: seeds the projection and the first centre.

    Returns:
        ``int64`` array of ``ceil(ratio * N)`` distinct row indices. ``ratio == 1`` returns
        ``arange(N)``.

    Raises:
        ConfigError: a bad ratio, projection dimension or bank.
    """
    bank = np.asarray(bank)
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ConfigError(f"coreset needs a non-empty (N, d) bank, got shape {bank.shape}")
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 1:
        raise ConfigError(f"projection_dim must be a positive integer, got {projection_dim!r}")
    n = int(bank.shape[0])
    m = coreset_size(n, ratio)
    if m >= n:
        return np.arange(n, dtype=np.int64)
    z = random_projection(bank, projection_dim, seed)
    first = int(np.random.default_rng([seed, 1]).integers(n))
    return _lazy_greedy(z, m, first)


@torch.inference_mode()
def extend_coreset(bank: np.ndarray, kept: np.ndarray, start: int, ratio: float, projection_dim: int = 128,
                   seed: int = 0) -> np.ndarray:
    """Rows of ``bank[start:]`` (new patches) to add to a coreset ``kept`` of ``bank[:start]``.

    The greedy k-center selection continued: ``ceil(ratio * (N - start))`` new rows, each the new
    row farthest from everything kept so far (the old kept rows and the new rows chosen before it),
    in the same random projection as :func:`greedy_coreset` (same ``projection_dim`` and ``seed``).
    A new patch far from the bank is kept first; one the bank already covers is kept last or not
    at all. (Not the coreset a fresh :func:`greedy_coreset` of the whole ``bank`` would keep: that
    starts from a random row and may drop old kept rows; this keeps every old row.)

    Returns:
        sorted ``int64`` row numbers in ``bank``, all ``>= start``.
    """
    bank = np.asarray(bank)
    kept = np.asarray(kept, dtype=np.int64)
    n_new = int(bank.shape[0]) - int(start)
    if n_new < 1 or kept.size == 0 or (kept.min() < 0 or kept.max() >= start):
        raise ConfigError(f"extend_coreset needs new rows after row {start} and kept rows before it")
    m = coreset_size(n_new, ratio)
    if m >= n_new:
        return np.arange(start, start + n_new, dtype=np.int64)
    z = random_projection(np.concatenate([bank[start:], bank[kept]]), projection_dim, seed)
    norms = (z * z).sum(1)
    min_d = torch.full((z.shape[0],), math.inf, dtype=torch.float32)
    for i in range(n_new, z.shape[0], 4096):  # distance of every new row to the old kept rows
        _apply_centres(z, norms, min_d, list(range(i, min(i + 4096, z.shape[0]))))
    min_d[n_new:] = -math.inf  # the old rows are kept already
    first = int(torch.argmax(min_d))
    return np.sort(_lazy_greedy(z, m, first, min_d=min_d)) + start


def _lazy_greedy(
    z: torch.Tensor, m: int, first: int, candidates: int = 8192, min_d: torch.Tensor | None = None
) -> np.ndarray:
    """Greedy k-center selection of ``m`` rows of ``z``, starting at row ``first``.

    The textbook algorithm updates every row's distance to the selected set after each selection:
    one pass over the whole bank per selected row, bound by memory bandwidth. Here the update is
    lazy and exact. Each row's stored distance is an upper bound of its true one (its distance to
    the first ``seen`` selected centres). The selection runs on the ``candidates`` rows with the
    largest distances, made exact; every other row's bound is at most ``tau``. While the best
    candidate's distance is at least ``tau`` it is the true farthest row; otherwise the candidates
    are chosen again: the rows with the largest bounds are brought up to date (the centres each
    missed, in one matrix product per group of rows: compute-bound), doubling their number until
    the ``candidates + 1`` largest exact distances are no smaller than every bound left stale. A row
    whose bound is below the selection's level is left alone until the level falls below it: on
    bottle's 334,400-row bank (10 %), half of the textbook loop's row-centre distances, for the same
    selection (``benchmarks/coreset.py``).
    ``min_d``: each row's squared distance to centres chosen before (:func:`extend_coreset`;
    ``-inf`` for those centres themselves), updated in place; default none chosen.
    """
    n = z.shape[0]
    norms = (z * z).sum(1)
    if min_d is None:
        min_d = torch.full((n,), math.inf, dtype=torch.float32)
    seen = torch.zeros(n, dtype=torch.int64)  # how many of the selected centres each min_d includes
    order = torch.empty(m, dtype=torch.int64)
    order[0] = first
    count = 1
    t = min(n, max(candidates, 1))
    while count < m:
        k = min(n, 4 * (t + 1))  # a first guess of how many rows to bring up to date; doubled while short
        while True:  # bring the rows with the largest bounds up to date until the top t + 1 are exact
            top_d, top = torch.topk(min_d, k, sorted=False)
            bound = float(top_d.min())  # no row outside `top` has a larger (upper) bound
            stale = top[seen[top] < count]
            if len(stale):
                _catch_up(z, norms, min_d, seen, order, count, stale)
            if k >= n or float(torch.topk(min_d[top], t + 1, sorted=False)[0].min()) >= bound:
                break
            k = min(n, 2 * k)
        if t < n:
            vals, pos = torch.topk(min_d[top], t + 1)
            cand, cand_d, tau = top[pos[:t]], vals[:t].clone(), float(vals[t])
        else:
            cand_d, cand, tau = min_d.clone(), torch.arange(n), -math.inf
        count = _select_among(z, norms, min_d, order, count, cand, cand_d, tau)
    return order.numpy()


def _select_among(z: torch.Tensor, norms: torch.Tensor, min_d: torch.Tensor, order: torch.Tensor, count: int,
                  cand: torch.Tensor, cand_d: torch.Tensor, tau: float) -> int:
    """Select from the candidate rows ``cand`` (exact distances ``cand_d``, updated in place) into
    ``order[count:]`` while the farthest of them is at least ``tau`` (no other row can be farther)
    and ``order`` is not full; returns the new count. Selected rows get ``min_d = -inf``."""
    zc, nc = z[cand], norms[cand]
    cand_list = cand.tolist()
    dist = torch.empty_like(cand_d)
    while count < order.shape[0]:
        jl = int(torch.argmax(cand_d))
        if not float(cand_d[jl]) >= tau:
            break  # a row outside the candidates may be farther: choose them again
        j = cand_list[jl]
        order[count] = j
        count += 1
        min_d[j] = -math.inf
        torch.addmv(nc, zc, z[j], alpha=-2.0, out=dist)
        dist.add_(norms[j])
        torch.minimum(cand_d, dist, out=cand_d)
        cand_d[jl] = -math.inf
    return count


def _catch_up(z: torch.Tensor, norms: torch.Tensor, min_d: torch.Tensor, seen: torch.Tensor, order: torch.Tensor,
              count: int, rows: torch.Tensor) -> None:
    """Apply to ``rows`` the selected centres ``order[seen[row]:count]`` each has missed (rows grouped by
    ``seen``), so that their ``min_d`` is exact; in place."""
    s = seen[rows]
    for v in torch.unique(s).tolist():
        r = rows[s == v]
        c = order[v:count]
        zc, cn = z[c], norms[c]
        step = max(1024, (1 << 22) // len(c))
        for i in range(0, len(r), step):
            rr = r[i : i + step]
            block = torch.addmm(cn[None, :], z[rr], zc.T, alpha=-2.0)
            min_d[rr] = torch.minimum(min_d[rr], block.amin(dim=1).add_(norms[rr]))
    seen[rows] = count


def _apply_centres(z: torch.Tensor, norms: torch.Tensor, min_d: torch.Tensor, centres: list[int]) -> None:
    """``min_d = min(min_d, squared distance to each centre)``, chunked over rows (in place)."""
    if not centres:
        return
    idx = torch.as_tensor(centres, dtype=torch.long)
    c, cn = z[idx], norms[idx]
    rows = max(1024, (1 << 22) // len(centres))
    for i in range(0, z.shape[0], rows):
        block = torch.addmm(cn[None, :], z[i : i + rows], c.T, alpha=-2.0)
        best = block.amin(dim=1).add_(norms[i : i + rows])
        torch.minimum(min_d[i : i + rows], best, out=min_d[i : i + rows])


__all__ = ["coreset_size", "extend_coreset", "greedy_coreset", "random_projection"]
