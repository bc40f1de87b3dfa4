"""Held-out scoring for the threshold: the cross-validation folds over the training images, and an
exact search that leaves a group's own bank rows out (with a coreset, the replacements that keep
the other images' patches covered). Used by :mod:`patchknn.threshold`.

Scoring every held-out patch exactly would cost as much as predicting the images; :func:`score_group`
prunes the search without changing any score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from patchknn import scoring
from patchknn.errors import ConfigError

if TYPE_CHECKING:
    from patchknn.model import PatchKNN

__all__ = [
    "N_GROUPS",
    "SAMPLE",
    "STRIDE",
    "ExactSearch",
    "Folds",
    "PositionBound",
    "fold_groups",
    "score_group",
    "select_images",
]

#: Number of cross-validation groups the calibration images are split into.
N_GROUPS = 4
#: Upper bounds come from a random 1/STRIDE of the held-out bank rows; the patch statistics from
#: a random 1/SAMPLE of the patches, searched exactly (see :func:`score_group`).
STRIDE = 8
SAMPLE = 32


def select_images(n_images: int, max_images: int, seed: int) -> list[int]:
    """Which fitted images to calibrate on: all, or ``max_images`` of them picked at random."""
    if max_images >= n_images:
        return list(range(n_images))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_images, size=max_images, replace=False))


def fold_groups(n_images: int, max_images: int, seed: int) -> list[list[int]]:
    """The calibration images (:func:`select_images`) split into the cross-validation groups
    (at most :data:`N_GROUPS`; image ``chosen[i]`` is in group ``i % n_groups``)."""
    chosen = select_images(n_images, max_images, seed)
    n_groups = min(N_GROUPS, len(chosen))
    return [chosen[j::n_groups] for j in range(n_groups)]


class Folds:
    """The cross-validation folds of :func:`calibrate`: iterating gives, per group of held-out
    images, ``(group, searcher, excluded, queries)``: the exact search over the rows the group is
    scored against (``excluded`` flags the searcher's rows to leave out) and the group's patches.

    Without a coreset the group is scored against every bank row of the other images. With one,
    against the kept rows of the other images plus the replacements of :func:`group_rows`. With
    ``train_flips`` an image's block of bank rows holds its grid and then its flipped copies'
    grids: its own grid is scored, and the whole block is left out with it.
    """

    def __init__(
        self,
        model: PatchKNN,
        bank: np.ndarray,
        n_images: int,
        bank_rows: np.ndarray | None,
        index_bank: np.ndarray | None,
    ) -> None:
        cfg = model.config
        self.cells = cfg.grid_size**2
        self.copies = cfg.grids_per_image  # grids per image in the bank (train_flips)
        self.block = block = cfg.rows_per_image  # bank rows per image
        if bank.shape[0] != n_images * block:
            raise ConfigError(f"calibrate: the bank has {bank.shape[0]} rows, expected {n_images} x {block}")
        self.k, self.bank, self.grid = cfg.k, bank, cfg.grid_size
        self._positions: PositionBound | None = None
        self.chosen = select_images(n_images, cfg.calibration_images, cfg.seed)
        self.groups = fold_groups(n_images, cfg.calibration_images, cfg.seed)
        if bank_rows is None:
            rows, row_image = bank, np.arange(bank.shape[0]) // block
            self.bank_rows = None
        else:
            self.bank_rows = np.asarray(bank_rows, dtype=np.int64)
            rows = bank[self.bank_rows] if index_bank is None else index_bank
            row_image = self.bank_rows // block
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.excluded = [np.isin(row_image, group) for group in self.groups]
        self.too_small = min(int((~ex).sum()) for ex in self.excluded) < cfg.k
        self.searcher = ExactSearch(self.rows, cfg.k)
        self.n_substitutes: list[int] = []
        if self.bank_rows is not None and not self.too_small:
            # a coreset row stands for the patches of many images: see group_rows
            self.full = ExactSearch(bank, 1)
            self.image_of = np.arange(bank.shape[0]) // block
            self.radius = coverage_radius(bank, self.searcher, rng_seed=cfg.seed)

    def bound(self, group: list[int]) -> Callable[[np.ndarray], np.ndarray] | None:
        """Upper bounds of the held-out ``group``'s queries for :func:`score_group`: without a
        coreset, from the other images' rows at the same and the 8 neighbouring grid positions
        (:class:`PositionBound`); ``None`` with one (its rows are not a grid of each image)."""
        if self.bank_rows is not None:
            return None
        if self._positions is None:  # one "image" per grid: each image's and its flipped copies'
            self._positions = PositionBound(self.bank, self.bank.shape[0] // self.cells, self.grid)
        excluded = np.isin(np.arange(self._positions.n_images) // self.copies, group)
        return lambda queries: self._positions(queries, excluded, self.k)  # type: ignore[union-attr]

    def __iter__(self) -> Any:
        cells, bank, block = self.cells, self.bank, self.block
        for group, held_out in zip(self.groups, self.excluded):
            queries = np.ascontiguousarray(  # each image's own grid: the first of its block
                np.concatenate([bank[i * block : i * block + cells] for i in group]), dtype=np.float32
            )
            if self.bank_rows is None:
                yield group, self.searcher, held_out, queries
                continue
            extra = group_rows(
                bank, self.rows, self.bank_rows, held_out, self.full, np.isin(self.image_of, group), self.radius
            )
            self.n_substitutes.append(int(extra.size))
            searcher = ExactSearch(np.concatenate([self.rows[~held_out], bank[extra]]), self.k)
            yield group, searcher, np.zeros(searcher.rows.shape[0], dtype=bool), queries


def score_group(
    model: PatchKNN,
    searcher: ExactSearch,
    excluded: np.ndarray,
    queries: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    exact: bool,
    bound: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores of ``n`` held-out images (``queries`` = their patches) against the bank rows
    of ``searcher`` not ``excluded``, and a sample of their exact patch scores.

    Scoring every patch exactly costs as much as predicting the images. Instead (unless ``exact``
    or the score is not monotone in the patch scores), every patch first gets an *upper bound*:
    the mean distance to its k nearest rows among a random 1/:data:`STRIDE` of the held-out rows
    (the i-th nearest distance in a subset is never below the i-th nearest in the whole set).
    Maps and image scores are monotone in the patch scores (bilinear resizing and Gaussian
    smoothing have non-negative weights; max and top-k mean are monotone), so an image's score
    computed with upper bounds for the patches not yet searched exactly is an upper bound, and
    with zeros for them a lower bound. The patches whose bound exceeds the lower score, and
    those around the peak of the map, are searched exactly, round after round, until the two
    scores are equal: the result is the exact score. A random 1/:data:`SAMPLE` of the patches is
    searched exactly from the start for unbiased patch statistics.

    ``bound``: other upper bounds, ``queries -> (m,)`` (:meth:`Folds.bound`: the rows of the other
    images at each patch's own and neighbouring grid positions, a fraction of the work); the random
    subset is still drawn, so the same patches are sampled. The bounds decide only which patches
    are searched exactly, never a score.
    """
    cfg = model.config
    cells, g, k = cfg.grid_size**2, cfg.grid_size, cfg.k
    size = (cfg.image_size, cfg.image_size)
    shape = (n, g, g)

    def score(grid: np.ndarray, weight: float = 1.0) -> tuple[float, np.ndarray]:
        amap = scoring.score_map(grid, size, cfg)
        return scoring.image_score(grid, cfg, weight, amap=amap), amap

    keep = np.flatnonzero(~excluded)
    n_subset = keep.size // STRIDE
    monotone = cfg.image_score in ("max", "topk_mean")
    if exact or not monotone or n_subset < max(k, 64) or n * cells <= 4 * SAMPLE:
        values = searcher(queries, excluded).reshape(shape)
        weights = np.ones(n)
        if cfg.image_score == "reweighted":
            others = np.ascontiguousarray(searcher.rows.numpy()[keep])
            weights = scoring.reweight(values, queries.reshape(n, cells, -1), others, cfg.image_score_topk)
        return np.array([score(v, float(w))[0] for v, w in zip(values, weights)]), values.ravel()

    # upper bounds against a random 1/STRIDE of the held-out rows (random, not strided: the bank
    # is ordered by image and position, a stride would keep some positions only)
    picked = rng.choice(keep, size=n_subset, replace=False)  # drawn in any case: the same sample below
    if bound is None:
        values = ExactSearch(searcher.rows.numpy()[np.sort(picked)], k)(queries)  # (n * cells,)
    else:
        values = np.ascontiguousarray(bound(queries), dtype=np.float32)
    known = np.zeros(n * cells, dtype=bool)
    sample = np.sort(rng.choice(n * cells, size=max(1, n * cells // SAMPLE), replace=False))
    reach = 1 + int(np.ceil(4 * cfg.smoothing_sigma))  # cells a pixel of the map depends on
    scores = np.full(n, np.nan)
    # first round: the sample and each image's highest bounds (they make the lower score tight)
    top = np.argsort(-values.reshape(n, cells), axis=1)[:, :16] + (np.arange(n) * cells)[:, None]
    todo = np.union1d(sample, top.ravel())
    pending = list(range(n))
    while True:
        values[todo] = searcher(queries[todo], excluded)
        known[todo] = True
        grids, known_grid = values.reshape(shape), known.reshape(shape)
        picks = []
        for j in list(pending):
            upper, amap = score(grids[j])
            lower, _ = score(np.where(known_grid[j], grids[j], 0.0).astype(np.float32))
            if lower >= upper or known_grid[j].all():
                scores[j] = upper
                pending.remove(j)
                continue
            # refine: patches whose bound could still reach the score, and those around the peak
            unknown = ~known_grid[j]
            want = unknown & (grids[j] > lower)
            py, px = np.unravel_index(int(np.argmax(amap)), amap.shape)
            cy, cx = py * g // amap.shape[0], px * g // amap.shape[1]
            window = np.zeros((g, g), dtype=bool)
            window[max(0, cy - reach) : cy + reach + 1, max(0, cx - reach) : cx + reach + 1] = True
            want |= unknown & window
            if not want.any():
                want = unknown
            picks.append(j * cells + np.flatnonzero(want.ravel()))
        if not pending:
            break
        todo = np.unique(np.concatenate(picks))
    return scores, values[sample]


def coverage_radius(bank: np.ndarray, kept: ExactSearch, rng_seed: int, sample: int = 2048) -> float:
    """The coreset's covering radius, estimated: the largest distance from a random ``sample`` of
    the full ``bank``'s rows to their nearest kept row (the greedy k-center coreset keeps every row
    of the bank within about this distance of a kept row)."""
    rng = np.random.default_rng([rng_seed, 2])
    picks = np.sort(rng.choice(bank.shape[0], size=min(sample, bank.shape[0]), replace=False))
    dist, _ = kept.nearest(bank[picks])
    return float(dist.max())


def group_rows(
    bank: np.ndarray,
    rows: np.ndarray,
    bank_rows: np.ndarray,
    held_out: np.ndarray,
    full: ExactSearch,
    held_out_full: np.ndarray,
    radius: float,
) -> np.ndarray:
    """Rows of the full ``bank`` to add to the coreset's rows of the other images when a group is
    held out (row numbers in ``bank``, possibly empty).

    A coreset row does not belong to its image alone: the greedy k-center coreset keeps one row
    for every tight cluster of patches, and that row stands for the cluster's patches in *every*
    image (on bottle with bfloat16 features, the patches at a few fixed positions form such
    clusters, far from everything else, each kept once). Dropping the kept rows of the held-out
    images would take away the cluster from every held-out image: a whole group of calibration
    scores off by the distance to the next cluster (the bug that set the ``fast`` preset's
    threshold above every defective bottle). What a coreset of the other images alone would
    keep instead: each dropped kept row is replaced by its nearest row among the other images'
    patches, when that row is farther than the coreset's covering ``radius`` from every kept
    row still there (and from the replacements added before it, farthest first: the greedy
    k-center rule); a dropped row whose area is still covered needs no replacement.
    """
    none = np.empty(0, dtype=np.int64)
    if not held_out.any():
        return none
    remaining = ExactSearch(rows[~held_out], 1)
    dropped = rows[held_out]
    dropped = dropped[remaining.nearest(dropped)[0] > radius]  # the others are still covered
    if dropped.shape[0] == 0:
        return none
    _, nearest = full.nearest(dropped, held_out_full)
    candidates = np.setdiff1d(np.unique(nearest), bank_rows)
    if candidates.size == 0:
        return none
    cover, _ = remaining.nearest(bank[candidates])
    cover = cover.astype(np.float64)
    order = np.argsort(-cover, kind="stable")
    cand = bank[candidates].astype(np.float64)
    added: list[int] = []
    for j in order:
        if cover[j] <= radius:
            break
        added.append(int(j))
        d = np.sqrt(np.maximum(((cand - cand[j]) ** 2).sum(axis=1), 0.0))
        np.minimum(cover, d, out=cover)
    return np.sort(candidates[added])


class PositionBound:
    """Upper bounds of held-out patches' k-NN distances: the mean distance to the k nearest of
    the other images' rows at the patch's own and the 8 neighbouring grid positions (a subset of
    the rows searched, so never below the exact distance, up to float round-off). Images of one
    product are roughly aligned, so these few rows (9 per image) bound about as tightly as a
    random eighth of the bank, for ~1/10 of the work.

    Args:
        bank: the full bank, rows ``[i * grid**2, (i + 1) * grid**2)`` = grid ``i`` (with
            ``train_flips`` an image's copies are grids of their own: :class:`Folds` excludes them together).
        n_images: the number of grids in it.
        grid: the side of the patch grid.
    """

    def __init__(self, bank: np.ndarray, n_images: int, grid: int) -> None:
        import torch

        self.n_images, self.grid = int(n_images), int(grid)
        rows = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
        # position-major: the rows of every image at position (y, x) are contiguous
        self.rows = rows.reshape(n_images, grid, grid, -1).permute(1, 2, 0, 3).contiguous()
        self.norms = (self.rows * self.rows).sum(dim=-1)  # (grid, grid, n_images)

    def __call__(self, queries: np.ndarray, excluded: np.ndarray, k: int) -> np.ndarray:
        """Bounds ``(m,)`` float32 of ``queries`` (``m = n * grid**2``, image by image) against the
        images not ``excluded`` (``(n_images,)`` bool)."""
        import torch

        g = self.grid
        q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        n_q = q_all.shape[0] // (g * g)
        q = q_all.reshape(n_q, g, g, -1).permute(1, 2, 0, 3).contiguous()  # (g, g, n_q, d)
        norms = self.norms.masked_fill(torch.from_numpy(np.asarray(excluded, dtype=bool)), float("inf"))
        best = torch.full((g, g, n_q, k), float("inf"))
        with torch.inference_mode():
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    x0, x1 = max(0, -dx), g - max(0, dx)
                    for y in range(max(0, -dy), g - max(0, dy)):
                        rows = self.rows[y + dy, x0 + dx : x1 + dx]  # (w, n_images, d)
                        sq = torch.baddbmm(norms[y + dy, x0 + dx : x1 + dx, None, :], q[y, x0:x1], rows.transpose(1, 2),
                                           alpha=-2.0)  # (w, n_q, n_images)
                        near = sq.topk(min(k, sq.shape[-1]), dim=-1, largest=False).values
                        both = torch.cat([best[y, x0:x1], near], dim=-1)
                        best[y, x0:x1] = both.topk(k, dim=-1, largest=False).values
            sq = best + (q * q).sum(dim=-1, keepdim=True)  # (g, g, n_q, k)
        return mean_distance(sq.permute(2, 0, 1, 3).reshape(n_q * g * g, k).numpy())


def mean_distance(sq: np.ndarray) -> np.ndarray:
    """Squared distances ``(m, k)`` -> mean Euclidean distance per row, float32 (as predict does)."""
    return np.sqrt(np.maximum(sq, 0.0)).mean(axis=1, dtype=np.float64).astype(np.float32)


class ExactSearch:
    """Exact k-nearest-neighbour distances to ``rows``, leaving out the rows flagged ``excluded``
    (their squared norms are set to infinity: no copy of the bank per held-out group). A GEMM in
    chunks of queries, like faiss's flat search, but without its fixed cost per call."""

    def __init__(self, rows: np.ndarray, k: int, chunk: int = 128) -> None:
        import torch

        self.rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        self.norms = (self.rows * self.rows).sum(dim=1)
        self.k, self.chunk = k, chunk

    def nearest(self, queries: np.ndarray, excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Distance ``(m,)`` float32 and row number ``(m,)`` of each query's nearest row."""
        import torch

        norms = self.norms
        if excluded is not None:
            norms = norms.masked_fill(torch.from_numpy(np.asarray(excluded, dtype=bool)), float("inf"))
        q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        dist = np.empty(q_all.shape[0], dtype=np.float32)
        idx = np.empty(q_all.shape[0], dtype=np.int64)
        with torch.inference_mode():
            for i in range(0, q_all.shape[0], self.chunk):
                q = q_all[i : i + self.chunk]
                sq = torch.addmm(norms[None, :], q, self.rows.T, alpha=-2.0)
                best = sq.min(dim=1)
                dist[i : i + q.shape[0]] = (best.values + (q * q).sum(dim=1)).clamp_min(0).sqrt().numpy()
                idx[i : i + q.shape[0]] = best.indices.numpy()
        return dist, idx

    def __call__(self, queries: np.ndarray, excluded: np.ndarray | None = None) -> np.ndarray:
        """Mean distance of each query to its k nearest rows, float32 ``(m,)``."""
        import torch

        norms = self.norms
        if excluded is not None:
            norms = norms.masked_fill(torch.from_numpy(np.asarray(excluded, dtype=bool)), float("inf"))
        q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        out = np.empty((q_all.shape[0], self.k), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, q_all.shape[0], self.chunk):
                q = q_all[i : i + self.chunk]
                sq = torch.addmm(norms[None, :], q, self.rows.T, alpha=-2.0)
                best = sq.min(dim=1).values[:, None] if self.k == 1 else sq.topk(self.k, dim=1, largest=False).values
                out[i : i + q.shape[0]] = (best + (q * q).sum(dim=1, keepdim=True)).numpy()
        return mean_distance(out)

