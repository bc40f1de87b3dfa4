"""Exact k-NN for large, high-dimensional banks: a lower-bound screen in few dimensions, then an
exact float64 re-check of the few rows the screen cannot rule out (:class:`BoundedFlatIndex`).

Why not cluster pruning: on a real 597,408 x 711 bank (MVTec-layout magnetic_tile, the ``paper``
preset) the k-means clusters have radii (median 22) larger than the nearest-neighbour distances
(median 17), so the triangle-inequality bound of :class:`~patchknn.index.PrunedFlatIndex` rules out
only 1.6 % of the pairs, and its k-means costs minutes to build.

The screen: order the coordinates by decreasing variance (PCA output already is) and split every
vector ``x`` into a head ``x_h`` (its first ``p`` coordinates) and a tail ``x_t``. For every query
``q`` and bank row ``b``

    ||q - b||^2 = ||q_h - b_h||^2 + ||q_t - b_t||^2 >= ||q_h - b_h||^2 + (||q_t|| - ||b_t||)^2 =: LB

(reverse triangle inequality on the tail), and ``LB`` is the squared distance between the
``(p + 1)``-dimensional vectors ``(q_h, ||q_t||)`` and ``(b_h, ||b_t||)``: one float32 GEMM of
``p + 1`` instead of ``d`` columns computes it for a whole block. On the bank above, with
``p = 128`` of 711, a median 0.2 % of the rows have ``LB`` below the nearest neighbour's distance
(the default ``p`` is 320 there: fewer re-checks for a somewhat larger product).

The search, per block of queries (single-threaded blocks run in parallel): the bank's rows are
visited chunk by chunk; a chunk's ``LB`` is computed by the GEMM, every row whose ``LB`` (minus its
round-off bound ``E``) is not above the query's current ``k``-th best exact squared distance ``u``
is re-checked exactly (float64 differences ``sum((q - b)^2)``), and ``u`` shrinks as better rows
are found. The first chunk is a stride sample of the bank whose ``k + 3`` lowest-``LB`` rows are
re-checked first, so ``u`` is close to its final value from the start.

Exactness: a row is skipped only if ``LB_computed - E > u``. ``E`` bounds the float32 round-off of
``LB_computed`` (GEMM accumulation ``gamma_{p+1} ||q|| ||b||``, the rounded squared norms, the
rounded tail norms, the additions; see :meth:`BoundedFlatIndex._error_bound`), so the row's true
distance satisfies ``||q - b||^2 >= LB > u``. ``u`` is the ``k``-th smallest of exact distances of
``k`` distinct rows, so the skipped row has ``k`` rows strictly closer and is not among the
``k`` nearest. Every other row's distance is computed in float64 from the float32 vectors, so the
answer is the float64 scan's (rounded to float32 at the end), ties aside: when several rows are at
exactly the ``k``-th distance, which one is kept does not change the distances returned.
The distance returned for a neighbour is ``sqrt`` of that float64 value: it does not depend on the
block, chunk or thread that found it, so any split of the queries gives bit-identical answers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Bank rows per screened chunk (the ``(queries x rows)`` block stays within the CPU's L2 cache).
CHUNK_ROWS = 8192
#: Queries per block (one block per worker thread at a time).
BLOCK_QUERIES = 128
#: float32 unit round-off.
_U32 = 2.0**-24


def auto_head_dim(variances: np.ndarray, fraction: float = 0.45) -> int:
    """Head size ``p`` for coordinates sorted by decreasing variance: ``fraction`` of the dimensions
    (at least 128; for the float32 screen 45 %, measured on a 597,408 x 711 bank, one thread, 128
    queries: p = 192 / 256 / 320 took 2.95 / 2.01 / 1.79 s and re-checked 640 / 250 / 86 rows per
    query), and the whole vector (``p = d``: a plain scan with an exact re-check) for narrow banks."""
    d = len(variances)
    if d <= 192:
        return d
    return int(min(d, max(128, 16 * round(fraction * d / 16))))


class BoundedFlatIndex:
    """Exact search state of one bank (used by :class:`patchknn.index.ScreenedFlatIndex`).

    ``head_fraction``: the default head size, as a fraction of the dimensions (:func:`auto_head_dim`).

    Args:
        bank: ``(N, d)`` float32 (kept by reference, not copied).
        head_dim: ``p``; ``None`` = :func:`auto_head_dim`.
        chunk_rows: rows per screened chunk (``None``: :attr:`default_chunk_rows`).
    """

    head_fraction = 0.45
    #: Queries per block (:class:`~patchknn.index.ScreenedFlatIndex` splits a search into blocks).
    block_queries = BLOCK_QUERIES
    #: Bank rows per screened chunk when ``chunk_rows`` is not given.
    default_chunk_rows = CHUNK_ROWS

    def __init__(
        self,
        bank: np.ndarray,
        head_dim: int | None = None,
        chunk_rows: int | None = None,
        pilot_rows: int = 16384,
        chunk_argmin: bool = True,
    ) -> None:
        n, d = bank.shape
        self.bank = torch.from_numpy(bank)
        step = max(1, (1 << 24) // max(1, d))  # rows per pass: bounded float64 temporaries
        # column variances from a stride sample (the order only matters for speed, not exactness)
        sample = self.bank[:: max(1, n // 65536)].double()
        var = sample.var(0, unbiased=False)
        del sample
        self.columns = torch.argsort(var, descending=True, stable=True)  # most variance first
        p = int(head_dim) if head_dim is not None else auto_head_dim(var[self.columns].numpy(), self.head_fraction)
        self.head_dim = p = max(1, min(p, d))
        self.chunk_rows = max(64, int(chunk_rows if chunk_rows is not None else self.default_chunk_rows))
        # the rows in screening order: a stride sample (the pilot) first, then the rest
        self.chunk_argmin = chunk_argmin
        pilot = min(n, max(1024, pilot_rows))
        stride = max(1, n // pilot)
        first = torch.arange(0, n, stride)[:pilot]
        rest = torch.ones(n, dtype=torch.bool)
        rest[first] = False
        self.pilot = len(first)
        self.order = self._row_order(first, rest.nonzero()[:, 0], var)
        head_cols, tail_cols = self.columns[:p], self.columns[p:]
        self.aug = torch.empty((n, p + 1), dtype=torch.float32)
        self.aug_sq = torch.empty(n, dtype=torch.float32)  # ||b'||^2 (float32 of the float64 value)
        self.aug_sq64 = torch.empty(n, dtype=torch.float64)  # ||b'||^2 of the stored (float32) b'
        max_sq = 0.0
        for a in range(0, n, step):
            rows = self.bank.index_select(0, self.order[a : a + step])
            self.aug[a : a + step, :p] = rows.index_select(1, head_cols)
            r64 = rows.double().square_()
            sq = r64.sum(1)
            tail_sq = r64.index_select(1, tail_cols).sum(1) if len(tail_cols) else torch.zeros_like(sq)
            self.aug[a : a + step, p] = tail_sq.sqrt()
            a64 = self.aug[a : a + step].double()
            self.aug_sq64[a : a + step] = (a64 * a64).sum(1)
            self.aug_sq[a : a + step] = self.aug_sq64[a : a + step]
            max_sq = max(max_sq, float(sq.max()))
        self.max_norm = math.sqrt(max_sq)
        self.d = d

    def _row_order(self, pilot: torch.Tensor, rest: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
        """The bank rows in screening order: the pilot rows, then the rest (a subclass may sort
        within each part; any order gives the same answers). ``variances``: of the columns."""
        return torch.cat([pilot, rest])

    def query_screen(self, q64: torch.Tensor) -> torch.Tensor:
        """``q' = (q_h, ||q_t||)`` in float64 of float64 queries ``(m, d)`` (``(m, p + 1)``)."""
        p = self.head_dim
        qa = torch.empty((q64.shape[0], p + 1), dtype=torch.float64)
        qa[:, :p] = q64.index_select(1, self.columns[:p])
        qa[:, p] = q64.index_select(1, self.columns[p:]).square().sum(1).sqrt()
        return qa

    # ------------------------------------------------------------------------------ bounds
    def _error_bound(self, qnorm: torch.Tensor) -> torch.Tensor:
        """Per query: a bound on ``|LB_computed - LB|`` for every bank row (float64, ``(m,)``).

        With ``s = ||q|| + max ||b||`` (``||(x_h, ||x_t||)|| = ||x||``) and ``u = 2^-24``:
        the GEMM's dot product of ``p + 1`` terms errs by at most ``gamma_{p+1} ||q|| ||b||``
        (any summation order, ``gamma_n = n u / (1 - n u)``), doubled by the ``-2`` factor; the
        float32 roundings of ``||b'||^2``, ``||q||^2``, of the tail norms (``u ||x_t||`` each,
        entering ``(||q_t|| - ||b_t||)^2`` as at most ``2 u s^2 + u^2 s^2``) and of the two
        additions (``u`` times their magnitude, at most ``s^2`` each) add at most ``8 u s^2``.
        """
        n_terms = self.head_dim + 1
        gamma = n_terms * _U32 / (1 - n_terms * _U32)
        s = qnorm + self.max_norm
        return (2 * gamma + 10 * _U32) * s * s + 1e-30

    # ------------------------------------------------------------------------------ search
    @torch.inference_mode()
    def search_block(self, q: torch.Tensor, k: int, stats: dict[str, int] | None = None) -> torch.Tensor:
        """Exact squared distances ``(m, k)`` (float64, sorted) of one block of float32 queries."""
        m = q.shape[0]
        n = self.aug.shape[0]
        q64 = q.double()
        qsq64 = (q64 * q64).sum(1)
        qa = self.query_screen(q64).float()  # the head is exact in float32; the tail norm rounded
        qa_sq = (qa.double() ** 2).sum(1)  # ||q'||^2 in float64
        err = self._error_bound(qsq64.sqrt())
        best = torch.full((m, k), math.inf, dtype=torch.float64)
        rows_seen = 0
        start = 0
        first = True
        while start < n:
            stop = self.pilot if first else min(n, start + self.chunk_rows)
            # S = ||b'||^2 - 2 q'.b'  (LB = S + ||q'||^2)
            s = torch.addmm(self.aug_sq[start:stop][None, :], qa, self.aug[start:stop].T, alpha=-2.0)
            # re-check the lowest-LB rows of the chunk first (k + 3 in the pilot, 1 after): the
            # true neighbours usually have the lowest LB, so u is tight before the threshold
            kk = min(k + 3 if first else (1 if self.chunk_argmin else 0), stop - start)
            if kk:
                _, at = s.topk(kk, dim=1, largest=False, sorted=False) if kk > 1 else s.min(dim=1, keepdim=True)
                qi = torch.arange(m).repeat_interleave(kk)
                best = self._merge(best, qi, self._exact(q64, qi, at.reshape(-1) + start), k)
                s.scatter_(1, at, math.inf)  # those rows are done
                rows_seen += qi.numel()
            # keep every row with LB_computed - E <= u (threshold rounded up into float32)
            thr64 = best[:, k - 1] + err - qa_sq
            thr = thr64.float()
            thr = torch.where(thr.double() < thr64, torch.nextafter(thr, torch.tensor(math.inf)), thr)
            flat = torch.from_numpy(np.flatnonzero(s.numpy() <= thr.numpy()[:, None]))  # numpy's is faster
            if flat.numel():
                qi, ri = flat // (stop - start), flat % (stop - start)
                best = self._merge(best, qi, self._exact(q64, qi, ri + start), k)
                rows_seen += qi.numel()
            start = stop
            first = False
        if stats is not None:
            stats["queries"] = stats.get("queries", 0) + m
            stats["rechecked"] = stats.get("rechecked", 0) + rows_seen
            stats["screened"] = stats.get("screened", 0) + m * n
        return best

    def _exact(self, q64: torch.Tensor, qi: torch.Tensor, ri: torch.Tensor) -> torch.Tensor:
        """float64 ``||q - b||^2`` of the pairs (query ``qi``, screening-order row ``ri``)."""
        out = torch.empty(qi.numel(), dtype=torch.float64)
        step = max(1, (1 << 22) // max(1, self.d))  # bounded temporary memory
        bank_rows = self.order[ri]
        for a in range(0, qi.numel(), step):
            diff = self.bank.index_select(0, bank_rows[a : a + step]).double()
            diff.sub_(q64.index_select(0, qi[a : a + step]))
            out[a : a + step] = diff.square_().sum(1)
        return out

    @staticmethod
    def _merge(best: torch.Tensor, qi: torch.Tensor, vals: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` smallest of ``best`` (``(m, k)``) and the new distances ``vals`` of queries ``qi``."""
        m = best.shape[0]
        if k == 1:
            return best.scatter_reduce(0, qi[:, None], vals[:, None], "amin")
        order = torch.argsort(qi, stable=True)
        qi, vals = qi[order], vals[order]
        counts = torch.bincount(qi, minlength=m)
        offsets = torch.cumsum(counts, 0) - counts
        pos = torch.arange(qi.numel()) - offsets[qi]
        dense = torch.full((m, int(counts.max())), math.inf, dtype=torch.float64)
        dense[qi, pos] = vals
        merged = torch.cat([best, dense], 1)
        return merged.topk(k, dim=1, largest=False, sorted=True).values


__all__ = ["BLOCK_QUERIES", "CHUNK_ROWS", "BoundedFlatIndex", "auto_head_dim"]
