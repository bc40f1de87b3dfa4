"""The exact screened search with an int8 screen (:class:`QuantizedBounds`): the lower bound of
:mod:`patchknn.index.bounds` computed by an integer matrix product (``torch._int_mm``, exact
int32 accumulation; VNNI on x86), with a proven bound on its quantisation error, then the float32
bound and the float64 re-check of the rows it cannot rule out. Same answers as the float64 scan.

Why: on a 597,408 x 709 bank (magnetic_tile, ``paper`` preset) the float32 screen is a matrix
product over every bank row for every query; the int8 product does the same work 2.6x faster on
this CPU (1 thread: 0.68 s against 1.80 s for 256 queries with a 385-column screen), for some
extra candidates to check (about 900 per query instead of 80), which a float32 bound of those
pairs alone brings back to the float32 screen's few.

The int8 screen. The screen vector of a bank row is ``b' = (b_h, ||b_t||)`` (``p + 1`` columns,
:class:`~patchknn.index.bounds.BoundedFlatIndex`). Each column ``j`` has a scale
``s_j = max_rows |b'_j| / 127`` and a row is stored as ``B = round(b' / s)`` (int8) with its
residual ``Δb = b' - s B`` (``||Δb||`` and ``||B||`` kept per row, in float64). For a query
``q' = (q_h, ||q_t||)`` let ``w = s q'`` (elementwise), ``Q = round(w / α)`` (int8) and
``Δw = w - α Q``. Exactly,

    q'.b' = w.B + q'.Δb = α Q.B + Δw.B + q'.Δb,    |Δw.B + q'.Δb| <= ||Δw|| ||B|| + ||q'|| ||Δb|| =: η

so ``LB = ||q'||^2 + ||b'||^2 - 2 q'.b' >= ||q'||^2 + ||b'||^2 - 2 α Q.B - 2 η`` with ``Q.B`` an exact
integer. The rows' ``||b'||^2`` enter the same product: ``G = round(||b'||^2 / γ)`` is stored as a
few extra int8 columns (digits of ``-G``, each in ``[-127, 0]``) matched by the query's integer
``κ = γ / (2 α)`` (``α`` is chosen so that ``κ`` is an integer in ``[1, 127]``), so one product gives
``R' = Q.B - κ G`` and a row is kept if ``R' >= T`` for the query's integer threshold ``T`` (one
comparison per pair, no other pass over the product). ``T`` uses per-chunk maxima of ``||B||``,
``||Δb||`` and ``||b'||^2`` (the rows are sorted by about ``||B||``, so chunks are homogeneous) and
the rounding of ``G`` (``|||b'||^2 - γ G| <= γ / 2``); the kept pairs are then tested with their own ``η`` and exact
``||b'||^2``, then with the float32 bound of :class:`BoundedFlatIndex` (``E``), and the survivors
are re-checked in float64. Every test only drops pairs whose lower bound exceeds the query's
current ``k``-th exact distance ``u``; the slack terms (float64 rounding of the scales and norms,
float32 rounding of the stored tail norm: a relative ``1e-6`` of ``||q||^2 + ||b||^2``) are added to
the bound, never subtracted.

A query whose ``κ`` would fall below 1 (a vector far larger than the bank's, e.g. an extreme
anomaly) is screened in float32 as before; the answers do not depend on which screen ran.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from patchknn.index.bounds import BoundedFlatIndex

#: Most int8 columns that hold the rows' squared norms (``γ`` is chosen coarse enough).
MAX_DIGITS = 16
#: Relative slack on ``||q||^2 + ||b||^2`` for the float64 roundings of the scales and norms and
#: the float32 rounding of the stored tail norms (each well below 1e-6).
_SLACK = 1e-6
#: Bank rows per chunk of the int8 screen (see :attr:`QuantizedBounds.block_queries`).
INT8_CHUNK_ROWS = 2048


class Encoded(NamedTuple):
    """A block of queries for the int8 screen: ``codes`` ``(Q, κ...)`` int8, ``alpha`` = ``γ / (2κ)``,
    ``kappa`` (below 1: outside the int8 range), ``dw`` = ``||Δw||``, ``qsq`` / ``qnorm`` = ``||q||^2`` /
    ``||q||``, and the float32 screen's ``qa32`` (``q'``), ``qa_sq`` and ``err32`` (twice its ``E``)."""

    q64: torch.Tensor
    codes: torch.Tensor
    alpha: torch.Tensor
    kappa: torch.Tensor
    dw: torch.Tensor
    qsq: torch.Tensor
    qnorm: torch.Tensor
    qa32: torch.Tensor
    qa_sq: torch.Tensor
    err32: torch.Tensor


@functools.cache
def int8_matmul_available() -> bool:
    """Whether this torch has the CPU int8 matrix product (``torch._int_mm``)."""
    try:
        a = torch.ones((2, 8), dtype=torch.int8)
        return bool(torch._int_mm(a, a.t())[0, 0] == 8)
    except (AttributeError, RuntimeError):
        return False


#: Widest code (columns) whose sums oneDNN's float32 output holds exactly: it accumulates the queries
#: shifted to ``uint8`` (``Q + 128 <= 255``) and may convert that sum to float32 before taking off the
#: shift's share, so ``cols x 255 x 127 < 2^24`` (measured: 38 of 16,384 sums off by 1 at 1,039 columns).
ONEDNN_MAX_COLUMNS = (1 << 24) // (255 * 127)


def _onednn_product(
    qcodes: torch.Tensor, packed: torch.Tensor, ones: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """``qcodes @ codes.T`` by oneDNN's int8 linear layer (AMX or VNNI): the queries as ``uint8`` with
    zero point 128 (so ``Q`` itself is multiplied), unit scales, float32 output, which holds the
    integer sums exactly for at most :data:`ONEDNN_MAX_COLUMNS` columns."""
    shifted = (qcodes.to(torch.int16) + 128).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(
        shifted, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


@functools.cache
def int8_backend() -> str:
    """``"onednn"`` on a CPU with AMX (``torch.cpu._is_amx_tile_supported``), where oneDNN's int8 linear
    layer (``torch.ops.onednn.qlinear_pointwise``) runs on the AMX tiles and gives the exact products
    of a probe: 1.3-1.7x ``torch._int_mm`` on one thread at the screen's shape (docs/search.md);
    ``"int_mm"`` elsewhere. Either gives the same integers, so the choice never changes an answer,
    only the time; it depends on the CPU alone, not on a timing."""
    if not int8_matmul_available():
        return "int_mm"
    try:
        if not torch.cpu._is_amx_tile_supported():
            return "int_mm"
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (64, ONEDNN_MAX_COLUMNS), dtype=torch.int8, generator=gen)
        q[0], q[1] = -127, 127  # the extremes of the codes: the largest sums, an off-by-one zero point
        w = torch.randint(-127, 128, (256, ONEDNN_MAX_COLUMNS), dtype=torch.int8, generator=gen)
        w[0], w[1] = 127, -127
        packed = torch.ops.onednn.qlinear_prepack(w, list(q.shape))
        got = _onednn_product(q, packed, torch.ones(len(w)), torch.zeros(len(w), dtype=torch.int64))
        exact = torch.equal(got.to(torch.int32), torch._int_mm(q, w.t())) and got.dtype == torch.float32
    except (AttributeError, RuntimeError, TypeError):
        return "int_mm"
    return "onednn" if exact else "int_mm"


class QuantizedBounds(BoundedFlatIndex):
    """Exact search state of one bank with the int8 screen (see the module docstring).

    Args: as :class:`~patchknn.index.bounds.BoundedFlatIndex`. The default head is 55 % of the
    dimensions (the int8 product is cheap, the stages after it are not: on the 597,408 x 709 bank,
    one thread, CPU time per query with p = 320 / 384 / 448 / 512: 3.66 / 3.27 / 3.44 / 3.29 ms,
    re-checking 163 / 78 / 43 / 27 rows; the float32 screen at its default p = 320: 4.7-5.8 ms).
    """

    head_fraction = 0.55
    # smaller chunks, larger blocks than the float32 screen's: the (queries x rows) int32 product stays
    # in the L2 cache for the threshold pass, and each chunk's codes serve more queries (magnetic_tile
    # bank, 512 queries, 1 thread, CPU ms per query: chunk 8192 / block 128: 2.93-3.16, 4096 / 256:
    # 2.68, 2048 / 256: 2.50-2.63, 2048 / 512: 2.91, 1024 / 256: 2.79)
    block_queries = 256
    default_chunk_rows = INT8_CHUNK_ROWS

    def __init__(self, bank: np.ndarray, head_dim: int | None = None, chunk_rows: int | None = None,
                 pilot_rows: int = 16384) -> None:
        super().__init__(bank, head_dim, chunk_rows, pilot_rows, chunk_argmin=False)
        n, p1 = self.aug.shape
        step = max(1, (1 << 22) // p1)
        self.scales = (self.aug.abs().amax(0).double() / 127).clamp_min(1e-30)  # s_j
        # γ: a bank row as a query would get κ ≈ 100 (a fine α); G = ||b'||^2 / γ in digits of 127,
        # at most MAX_DIGITS of them (a heavy-tailed bank gets a coarser γ, not a wider product)
        sample = self.aug[:: max(1, n // 65536)].double() * self.scales
        self.gamma = float(max(1.6 * float(sample.abs().amax(1).median()),
                               float(self.aug_sq64.max()) / (127 * MAX_DIGITS), 1e-30))
        del sample
        self.g_int = torch.round(self.aug_sq64 / self.gamma)
        self.digits = digits = max(1, math.ceil(float(self.g_int.max()) / 127))
        self.bnorm = torch.empty(n, dtype=torch.float64)  # ||B||
        self.resid = torch.empty(n, dtype=torch.float64)  # ||Δb||
        self.codes: torch.Tensor | None = torch.empty((n, p1 + digits), dtype=torch.int8)  # (B, digits of -G)
        for a in range(0, n, step):
            b64 = self.aug[a : a + step].double()
            code = torch.round(b64 / self.scales)
            self.codes[a : a + step, :p1] = code.to(torch.int8)
            self.bnorm[a : a + step] = code.norm(dim=1)
            self.resid[a : a + step] = (b64 - code * self.scales).norm(dim=1)
            rem = self.g_int[a : a + step].clone()
            for i in range(digits):
                part = rem.clamp(max=127)
                self.codes[a : a + step, p1 + i] = (-part).to(torch.int8)
                rem -= part
        bounds = sorted({0, self.pilot, *range(self.pilot, n, self.chunk_rows), n})
        self.bounds = list(zip(bounds[:-1], bounds[1:]))
        self.chunk_bnorm = [float(self.bnorm[a:b].max()) for a, b in self.bounds]
        self.chunk_resid = [float(self.resid[a:b].max()) for a, b in self.bounds]
        self.chunk_sq = [float(self.aug_sq64[a:b].max()) for a, b in self.bounds]
        self.backend = int8_backend() if self.codes.shape[1] <= ONEDNN_MAX_COLUMNS else "int_mm"
        self._packed: list[torch.Tensor] = []
        if self.backend == "onednn":  # the chunks in oneDNN's own layout, once
            shape = [self.block_queries, self.codes.shape[1]]
            pack = torch.ops.onednn.qlinear_prepack
            self._packed = [pack(self.codes[a:b].contiguous(), shape) for a, b in self.bounds]
            self._unit = torch.ones(max(b - a for a, b in self.bounds))
            self._zero = torch.zeros(len(self._unit), dtype=torch.int64)
            self.codes = None  # held in the packed chunks now (magnetic_tile's bank: 0.24 GB)

    def product(self, qcodes: torch.Tensor, chunk: int) -> torch.Tensor:
        """``R' = Q.B - κ G`` of a block of query codes with the rows of chunk ``chunk``: exact
        integers (int32 from ``torch._int_mm``, or float32 from oneDNN, which holds them exactly)."""
        a, b = self.bounds[chunk]
        if self.backend == "onednn":
            n = b - a
            return _onednn_product(qcodes, self._packed[chunk], self._unit[:n], self._zero[:n])
        assert self.codes is not None
        return torch._int_mm(qcodes, self.codes[a:b].t())

    def _row_order(self, pilot: torch.Tensor, rest: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
        """Each part sorted by ``||b'||`` with the columns scaled by their spread (about ``||B||``, from
        the sampled variances:
        chunks of similar ``||B||`` have tight chunk bounds; the order only matters for speed)."""
        p, n = self.head_dim, len(pilot) + len(rest)
        inv = 1.0 / variances.clamp_min(1e-30)
        weight = inv.clone()  # head columns: 1 / var; tail columns: 1 / (sum of the tail's variances)
        weight[self.columns[p:]] = 1.0 / float(variances[self.columns[p:]].sum().clamp_min(1e-30))
        weight = weight.float()
        key = torch.empty(n, dtype=torch.float32)
        step = max(1, (1 << 22) // self.bank.shape[1])
        for a in range(0, n, step):
            key[a : a + step] = self.bank[a : a + step].square() @ weight
        return torch.cat([pilot[torch.argsort(key[pilot], stable=True)], rest[torch.argsort(key[rest], stable=True)]])

    def encode(self, q: torch.Tensor) -> Encoded:
        """The int8 codes and bound terms of a block of float32 queries ``(m, d)``."""
        m = q.shape[0]
        q64 = q.double()
        qa = self.query_screen(q64)
        w = qa * self.scales
        kappa = torch.floor(self.gamma * 127 / (2 * w.abs().amax(1).clamp_min(1e-300))).clamp(max=127)
        alpha = self.gamma / (2 * kappa.clamp(min=1))
        codes = torch.round(w / alpha[:, None])
        qcodes = torch.cat([codes, kappa.clamp(min=1)[:, None].expand(m, self.digits)], 1).to(torch.int8)
        qsq = (q64 * q64).sum(1)
        qa32 = qa.float()
        return Encoded(
            q64=q64, codes=qcodes, alpha=alpha, kappa=kappa, dw=(w - codes * alpha[:, None]).norm(dim=1),
            qsq=qsq, qnorm=qsq.sqrt(), qa32=qa32, qa_sq=(qa32.double() ** 2).sum(1),
            err32=2 * self._error_bound(qsq.sqrt()),
        )

    def chunk_threshold(self, enc: Encoded, chunk: int, u: torch.Tensor) -> torch.Tensor:
        """Per query, the int32 ``T`` such that a row of chunk ``chunk`` whose lower bound is not
        above ``u`` has ``R' >= T`` (``η`` from the chunk's largest ``||B||`` and ``||Δb||``, ``-κ/2``
        for the rounding of ``G``, rounded down, minus 1)."""
        eta = enc.dw * self.chunk_bnorm[chunk] + enc.qnorm * self.chunk_resid[chunk]
        slack = _SLACK * (enc.qsq + self.chunk_sq[chunk]) + 1e-30  # >= every row's pair slack
        thr = torch.floor((enc.qsq - 2 * eta - u - slack) / (2 * enc.alpha) - enc.kappa / 2) - 1
        return thr.clamp(min=-(2**31) + 1, max=2**31 - 1).to(torch.int32)

    def pair_lower_bound(self, enc: Encoded, qi: torch.Tensor, ri: torch.Tensor, prod: torch.Tensor) -> torch.Tensor:
        """A lower bound on ``||q - b||^2`` of the pairs (query ``qi``, screening-order row ``ri``)
        from their int8 product ``prod`` (``R'``): ``Q.B`` exact, the pair's own ``η``."""
        dot = prod.double() + enc.kappa[qi] * self.g_int[ri]
        eta = enc.dw[qi] * self.bnorm[ri] + enc.qnorm[qi] * self.resid[ri]
        low = enc.qsq[qi] + self.aug_sq64[ri] - 2 * enc.alpha[qi] * dot - 2 * eta
        return low - (_SLACK * (enc.qsq[qi] + self.aug_sq64[ri]) + 1e-30)

    def _float32_kept(
        self, enc: Encoded, qi: torch.Tensor, ri: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs whose float32 lower bound (minus twice the float32 screen's ``E``, a margin:
        this stage adds in float64, with fewer roundings than the screen's product) is <= ``u``;
        computed in pieces of bounded memory."""
        keep = torch.empty(qi.numel(), dtype=torch.bool)
        step = max(1, (1 << 22) // self.aug.shape[1])
        for a in range(0, qi.numel(), step):
            q_, r_ = qi[a : a + step], ri[a : a + step]
            dot = (self.aug.index_select(0, r_) * enc.qa32.index_select(0, q_)).sum(1).double()
            low = self.aug_sq.index_select(0, r_).double() - 2 * dot + enc.qa_sq[q_] - enc.err32[q_]
            keep[a : a + step] = low <= u[q_]
        return qi[keep], ri[keep]

    @torch.inference_mode()
    def search_block(self, q: torch.Tensor, k: int, stats: dict[str, int] | None = None) -> torch.Tensor:
        """Exact squared distances ``(m, k)`` (float64, sorted) of one block of float32 queries."""
        enc = self.encode(q)
        wide = enc.kappa < 1
        if bool(wide.any()):  # far outside the bank's range: the float32 screen for those
            out = torch.empty((q.shape[0], k), dtype=torch.float64)
            out[wide] = super().search_block(q[wide], k, stats)
            if bool((~wide).any()):
                out[~wide] = self.search_block(q[~wide], k, stats)
            return out
        m = q.shape[0]
        best = torch.full((m, k), math.inf, dtype=torch.float64)
        counts = {"screened": m * self.aug.shape[0], "int8_kept": 0, "pair_kept": 0, "rechecked": 0}
        for ci, (a, b) in enumerate(self.bounds):
            prod = self.product(enc.codes, ci)  # R' = Q.B - κ G (exact integers)
            if ci == 0:  # the pilot: re-check its k + 3 best rows first, so u is tight early
                kk = min(k + 3, b - a)
                at = prod.topk(kk, dim=1).indices
                qi = torch.arange(m).repeat_interleave(kk)
                best = self._merge(best, qi, self._exact(enc.q64, qi, at.reshape(-1) + a), k)
                counts["rechecked"] += qi.numel()
                prod.scatter_(1, at, -(2**31))  # exact in int32 and in float32
            u = best[:, k - 1]
            thr = self.chunk_threshold(enc, ci, u)
            limit = thr.numpy()
            if prod.dtype == torch.float32:  # |R'| < 2^24, so the clipped threshold compares the same, exactly
                limit = np.clip(limit, -(1 << 24), 1 << 24).astype(np.float32)
            flat = torch.from_numpy(np.flatnonzero(prod.numpy() >= limit[:, None]))  # numpy's is 3x faster
            if not flat.numel():
                continue
            counts["int8_kept"] += flat.numel()
            qi, ri = flat // (b - a), flat % (b - a) + a
            keep = self.pair_lower_bound(enc, qi, ri, prod.view(-1)[flat]) <= u[qi]
            qi, ri = qi[keep], ri[keep]
            qi, ri = self._float32_kept(enc, qi, ri, u)
            counts["pair_kept"] += qi.numel()
            if qi.numel():
                best = self._merge(best, qi, self._exact(enc.q64, qi, ri), k)
                counts["rechecked"] += qi.numel()
        if stats is not None:
            stats["queries"] = stats.get("queries", 0) + m
            for key, val in counts.items():
                stats[key] = stats.get(key, 0) + val
        return best


__all__ = [
    "INT8_CHUNK_ROWS",
    "ONEDNN_MAX_COLUMNS",
    "Encoded",
    "QuantizedBounds",
    "int8_backend",
    "int8_matmul_available",
]
