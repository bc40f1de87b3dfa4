"""A decision threshold calibrated from normal images only, and the statistics of normal scores.

Every training image is in the memory bank, so scoring a training image against the bank gives
(nearly) zero: the threshold must come from images the bank has not seen. :func:`calibrate`
scores up to ``calibration_images`` training images by cross-validation, without losing any
image to the bank: the chosen images are split into a few groups, and each group is scored
against a temporary exact (flat) index over the bank rows of *all the other* training images.
With a coreset the searched rows are the kept rows of the other images, and each kept row of a
held-out image that leaves its area of the bank uncovered is replaced by its nearest patch of the
other images (a coreset row stands for a cluster of patches of many images; see
:func:`_group_rows`).
The held-out maps and image scores are formed exactly as :meth:`PatchKNN.predict` forms them
(:meth:`~patchknn.model.PatchKNN.grid_to_map`, :meth:`~patchknn.model.PatchKNN.image_score`).

* ``threshold_method="quantile"``: threshold = the ``threshold_quantile`` quantile of the
  held-out normal image scores (linear interpolation; with 16 images, 0.99 is close to the max).
* ``threshold_method="sigma"``: threshold = mean + ``threshold_sigma`` x standard deviation.
* ``threshold_method="none"``: no threshold (and no calibration work).

Scoring every held-out patch exactly would cost as much as predicting the images; the search is
pruned without changing any score (see :func:`_score_group`), which makes calibration several
times cheaper than predicting the same images.

The statistics (image-score mean/std/quantiles, quantiles of held-out normal patch scores) are
stored in ``model.fit_info_["calibration"]`` and saved with the model; :func:`color_scale` turns
them into a colour range that means the same on every image of the model.

Example:
    >>> import numpy as np
    >>> threshold_from_scores(np.array([1.0, 2.0, 3.0]), "quantile", quantile=0.5)
    2.0
    >>> round(threshold_from_scores(np.array([1.0, 2.0, 3.0]), "sigma", sigma=2.0), 3)
    4.0
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from patchknn.errors import ConfigError

if TYPE_CHECKING:
    from patchknn.model import PatchKNN

#: Number of cross-validation groups the calibration images are split into.
N_GROUPS = 4
IMAGE_QUANTILES = (0.5, 0.9, 0.95, 0.99)
PATCH_QUANTILES = (0.5, 0.9, 0.99, 0.999)
#: Upper bounds come from a random 1/STRIDE of the held-out bank rows; the patch statistics from
#: a random 1/SAMPLE of the patches, searched exactly (see :func:`_score_group`).
STRIDE = 8
SAMPLE = 32
#: The reference value (the threshold) sits at this fraction of the colour range.
REFERENCE_POSITION = 2.0 / 3.0


class CalibrationWarning(UserWarning):
    """Calibration was impossible (e.g. a single training image); the model has no threshold."""


@dataclass
class Calibration:
    """What :func:`calibrate` found.

    Attributes:
        threshold: the decision threshold (``None`` when it could not be calibrated).
        method: ``"quantile"`` or ``"sigma"``.
        image_scores: the held-out normal image scores, in the order of ``images``.
        images: indices (into the fitted images) of the calibration images.
        info: JSON-ready summary stored as ``fit_info_["calibration"]``.
    """

    threshold: float | None
    method: str
    image_scores: np.ndarray
    images: list[int]
    info: dict[str, Any] = field(default_factory=dict)


def threshold_from_scores(
    scores: np.ndarray, method: str, *, quantile: float = 0.99, sigma: float = 3.0
) -> float:
    """The threshold from held-out normal image ``scores`` (see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ConfigError("threshold calibration needs at least one held-out score")
    if method == "quantile":
        return float(np.quantile(scores, quantile))
    if method == "sigma":
        std = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
        return float(scores.mean() + sigma * std)
    raise ConfigError(f"threshold_method must be 'quantile' or 'sigma' to calibrate, got {method!r}")


def select_images(n_images: int, max_images: int, seed: int) -> list[int]:
    """Which fitted images to calibrate on: all, or ``max_images`` of them picked at random."""
    if max_images >= n_images:
        return list(range(n_images))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_images, size=max_images, replace=False))


def calibrate(
    model: PatchKNN,
    bank: np.ndarray,
    n_images: int,
    *,
    bank_rows: np.ndarray | None = None,
    index_bank: np.ndarray | None = None,
    progress: bool = True,
    exact: bool = False,
) -> Calibration:
    """Calibrate ``model``'s threshold by cross-validation over its own training images.

    Args:
        model: the model being fitted (its config, :meth:`grid_to_map`, :meth:`image_score`).
        bank: the *full* memory bank before any subsampling, ``(n_images * grid**2, d)``, in the
            space of the index (after PCA); the rows of fitted image ``i`` are
            ``[i * grid**2, (i + 1) * grid**2)``.
        n_images: the number of fitted images.
        bank_rows: when the searched bank is a subset of ``bank`` (coreset), the row numbers (in
            ``bank``) of the rows kept, in the order of ``index_bank``; ``None`` = all rows kept.
        index_bank: the rows that are searched at predict time when ``bank_rows`` is given
            (defaults to ``bank[bank_rows]``).
        progress: show a progress bar (only when ``model.progress`` and stderr is a terminal).
        exact: search every held-out patch exactly instead of pruning (same scores, slower; for
            tests). Pruning is used only where it is exact (``image_score`` ``max``/``topk_mean``).

    Returns:
        A :class:`Calibration`; its ``threshold`` is ``None`` (with a :class:`CalibrationWarning`)
        when there are fewer than two fitted images or ``calibration_images`` is 0.
    """
    cfg = model.config
    method = cfg.threshold_method
    cells = cfg.grid_size**2
    if method not in ("quantile", "sigma"):
        raise ConfigError(f"calibrate needs threshold_method 'quantile' or 'sigma', got {method!r}")
    if bank.shape[0] != n_images * cells:
        raise ConfigError(f"calibrate: the bank has {bank.shape[0]} rows, expected {n_images} x {cells}")
    if n_images < 2 or cfg.calibration_images < 1:
        why = (
            "calibration_images is 0"
            if cfg.calibration_images < 1
            else f"only {n_images} training image (the threshold needs images the bank has not seen)"
        )
        warnings.warn(
            f"no decision threshold: {why}; set one with model.threshold_ = ... or --threshold",
            CalibrationWarning,
            stacklevel=3,
        )
        return Calibration(None, method, np.empty(0), [], {"method": method, "threshold": None, "reason": why})

    t0 = time.perf_counter()
    folds = _Folds(model, bank, n_images, bank_rows, index_bank)
    if folds.too_small:
        why = f"k={cfg.k} is larger than the memory bank without the held-out images"
        warnings.warn(f"no decision threshold: {why}", CalibrationWarning, stacklevel=3)
        return Calibration(None, method, np.empty(0), [], {"method": method, "threshold": None, "reason": why})
    chosen, n_groups = folds.chosen, len(folds.groups)
    scores = np.empty(len(chosen), dtype=np.float64)
    position = {img: j for j, img in enumerate(chosen)}
    patch_samples: list[np.ndarray] = []
    rng = np.random.default_rng(cfg.seed)
    with _bar(len(chosen), "fit: calibrate", model.progress and progress) as bar:
        for group, searcher, excluded, queries in folds:
            group_scores, patches = _score_group(model, searcher, excluded, queries, len(group), rng, exact=exact)
            for img, score in zip(group, group_scores):
                scores[position[img]] = score
            patch_samples.append(patches)
            bar.update(len(group))
    n_substitutes = folds.n_substitutes
    patches = np.concatenate(patch_samples)
    threshold = threshold_from_scores(
        scores, method, quantile=float(cfg.threshold_quantile), sigma=float(cfg.threshold_sigma)
    )
    info = {
        "method": method,
        "threshold": threshold,
        "quantile": float(cfg.threshold_quantile),
        "sigma": float(cfg.threshold_sigma),
        "n_images": len(chosen),
        "n_groups": n_groups,
        "image_scores": [round(float(s), 6) for s in scores],
        "image": _summary(scores, IMAGE_QUANTILES),
        "patch": _summary(patches, PATCH_QUANTILES),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if n_substitutes:
        info["coreset_substitutes"] = n_substitutes
    return Calibration(threshold, method, scores, chosen, info)


def held_out_grids(
    model: PatchKNN,
    bank: np.ndarray,
    n_images: int,
    *,
    bank_rows: np.ndarray | None = None,
    index_bank: np.ndarray | None = None,
) -> tuple[list[int], np.ndarray]:
    """The held-out patch-score grids :func:`calibrate` scores its images from, searched exactly.

    Same arguments, images and cross-validation groups as :func:`calibrate` (coreset included);
    returns the chosen image indices and their grids ``(n, grid, grid)`` float32 (empty when
    there are fewer than two images or the bank without a group is smaller than ``k``). For
    callers that combine grids before scoring them (an ensemble z-scores and averages its
    members' grids, then calibrates its threshold on the result).
    """
    cfg = model.config
    g = cfg.grid_size
    if n_images < 2 or cfg.calibration_images < 1:
        return [], np.empty((0, g, g), dtype=np.float32)
    folds = _Folds(model, bank, n_images, bank_rows, index_bank)
    if folds.too_small:
        return [], np.empty((0, g, g), dtype=np.float32)
    grids = np.empty((len(folds.chosen), g, g), dtype=np.float32)
    position = {img: j for j, img in enumerate(folds.chosen)}
    for group, searcher, excluded, queries in folds:
        values = searcher(queries, excluded).reshape(len(group), g, g)
        for img, grid in zip(group, values):
            grids[position[img]] = grid
    return folds.chosen, grids


class _Folds:
    """The cross-validation folds of :func:`calibrate`: iterating gives, per group of held-out
    images, ``(group, searcher, excluded, queries)``: the exact search over the rows the group is
    scored against (``excluded`` flags the searcher's rows to leave out) and the group's patches.

    Without a coreset the group is scored against every bank row of the other images. With one,
    against the kept rows of the other images plus the replacements of :func:`_group_rows`.
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
        self.cells = cells = cfg.grid_size**2
        if bank.shape[0] != n_images * cells:
            raise ConfigError(f"calibrate: the bank has {bank.shape[0]} rows, expected {n_images} x {cells}")
        self.k, self.bank = cfg.k, bank
        self.chosen = select_images(n_images, cfg.calibration_images, cfg.seed)
        n_groups = min(N_GROUPS, len(self.chosen))
        self.groups = [self.chosen[j::n_groups] for j in range(n_groups)]
        if bank_rows is None:
            rows, row_image = bank, np.arange(bank.shape[0]) // cells
            self.bank_rows = None
        else:
            self.bank_rows = np.asarray(bank_rows, dtype=np.int64)
            rows = bank[self.bank_rows] if index_bank is None else index_bank
            row_image = self.bank_rows // cells
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.excluded = [np.isin(row_image, group) for group in self.groups]
        self.too_small = min(int((~ex).sum()) for ex in self.excluded) < cfg.k
        self.searcher = _ExactSearch(self.rows, cfg.k)
        self.n_substitutes: list[int] = []
        if self.bank_rows is not None and not self.too_small:
            # a coreset row stands for the patches of many images: see _group_rows
            self.full = _ExactSearch(bank, 1)
            self.image_of = np.arange(bank.shape[0]) // cells
            self.radius = _coverage_radius(bank, self.searcher, rng_seed=cfg.seed)

    def __iter__(self) -> Any:
        cells, bank = self.cells, self.bank
        for group, held_out in zip(self.groups, self.excluded):
            queries = np.ascontiguousarray(
                np.concatenate([bank[i * cells : (i + 1) * cells] for i in group]), dtype=np.float32
            )
            if self.bank_rows is None:
                yield group, self.searcher, held_out, queries
                continue
            extra = _group_rows(
                bank, self.rows, self.bank_rows, held_out, self.full, np.isin(self.image_of, group), self.radius
            )
            self.n_substitutes.append(int(extra.size))
            searcher = _ExactSearch(np.concatenate([self.rows[~held_out], bank[extra]]), self.k)
            yield group, searcher, np.zeros(searcher.rows.shape[0], dtype=bool), queries


# ---------------------------------------------------------------------------------- colour scale
def color_scale(
    fit_info: dict[str, Any] | None, threshold: float | None = None
) -> tuple[float, float] | None:
    """A colour range ``(vmin, vmax)`` that means the same on every image of a model.

    ``vmin`` is the median patch score of held-out normal images (typical normal texture is
    dark); the reference value, the decision threshold (``threshold`` when given, else the
    calibrated one, else the 99th percentile of held-out normal image scores), sits at 2/3 of the
    range, so the predicted defect outline is always drawn at the same colour. Without
    calibration statistics: ``(0, 1.5 * threshold)`` when a threshold is given, else ``None``
    (the caller must fall back to a per-image scale and say so).
    """
    cal = (fit_info or {}).get("calibration") or {}
    patch, image = cal.get("patch") or {}, cal.get("image") or {}
    ref = threshold if threshold is not None else cal.get("threshold")
    if ref is None:
        ref = image.get("q99")
    if ref is None:
        return None
    vmin = float(patch.get("q50", 0.0))
    if not vmin < ref:
        vmin = 0.0 if ref > 0 else float(ref) - 1.0
    vmax = vmin + (float(ref) - vmin) / REFERENCE_POSITION
    return vmin, vmax


# ------------------------------------------------------------------------------- decision metrics
def threshold_metrics(
    maps: np.ndarray | None,
    masks: np.ndarray | None,
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float | None,
) -> dict[str, float | None]:
    """Image-level precision/recall/F1 and pooled pixel F1 of the decision ``score >= threshold``.

    Every value is ``None`` without a threshold; precision is ``None`` when nothing is predicted
    defective; recall and F1 are ``None`` without defective images (pixels).

    Example:
        >>> m = threshold_metrics(None, None, np.array([0.1, 0.5, 0.9]), np.array([0, 1, 1]), 0.6)
        >>> m["threshold_image_precision"], m["threshold_image_recall"]
        (1.0, 0.5)
    """
    keys = ("threshold_image_precision", "threshold_image_recall", "threshold_image_f1", "threshold_pixel_f1")
    out: dict[str, float | None] = dict.fromkeys(keys)
    if threshold is None:
        return out
    pred = np.asarray(scores) >= threshold
    truth = np.asarray(labels) > 0
    p, r, f = _prf(int((pred & truth).sum()), int(pred.sum()), int(truth.sum()))
    out |= {"threshold_image_precision": p, "threshold_image_recall": r, "threshold_image_f1": f}
    if maps is not None and masks is not None:
        tp = fp = pos = 0
        for amap, mask in zip(maps, masks):  # one image at a time: no (N, H, W) bool temporaries
            hit = amap >= threshold
            gt = mask > 0
            tp += int(np.count_nonzero(hit & gt))
            fp += int(np.count_nonzero(hit & ~gt))
            pos += int(np.count_nonzero(gt))
        out["threshold_pixel_f1"] = _prf(tp, tp + fp, pos)[2]
    return out


def _prf(tp: int, predicted: int, positive: int) -> tuple[float | None, float | None, float | None]:
    precision = tp / predicted if predicted else None
    recall = tp / positive if positive else None
    if positive == 0:
        return precision, recall, None
    f1 = 2 * tp / (predicted + positive)
    return precision, recall, float(f1)


# -------------------------------------------------------------------------------------- helpers
def _summary(values: np.ndarray, quantiles: tuple[float, ...]) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    qs = np.quantile(values, quantiles)
    out = {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
    }
    out |= {_qname(q): float(v) for q, v in zip(quantiles, qs)}
    return out


def _qname(q: float) -> str:
    """0.5 -> 'q50', 0.99 -> 'q99', 0.999 -> 'q999'."""
    text = f"{q:.4f}".rstrip("0").split(".")[1]
    return "q" + (text if len(text) > 1 else text + "0")


def _score_group(
    model: PatchKNN,
    searcher: _ExactSearch,
    excluded: np.ndarray,
    queries: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    exact: bool,
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
    """
    cfg = model.config
    cells, g, k = cfg.grid_size**2, cfg.grid_size, cfg.k
    size = (cfg.image_size, cfg.image_size)
    shape = (n, g, g)

    def score(grid: np.ndarray, weight: float = 1.0) -> tuple[float, np.ndarray]:
        amap = model.grid_to_map(grid, size)
        if weight != 1.0:
            return model.image_score(grid, amap, weight), amap
        return model.image_score(grid, amap), amap

    keep = np.flatnonzero(~excluded)
    n_subset = keep.size // STRIDE
    monotone = cfg.image_score in ("max", "topk_mean")
    if exact or not monotone or n_subset < max(k, 64) or n * cells <= 4 * SAMPLE:
        values = searcher(queries, excluded).reshape(shape)
        weights = np.ones(n)
        if cfg.image_score == "reweighted":
            others = np.ascontiguousarray(searcher.rows.numpy()[keep])
            weights = _reweight(model, values, queries.reshape(n, cells, -1), others)
        return np.array([score(v, float(w))[0] for v, w in zip(values, weights)]), values.ravel()

    # upper bounds against a random 1/STRIDE of the held-out rows (random, not strided: the bank
    # is ordered by image and position, a stride would keep some positions only)
    subset = searcher.rows.numpy()[np.sort(rng.choice(keep, size=n_subset, replace=False))]
    values = _ExactSearch(subset, k)(queries)  # (n * cells,)
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


def _coverage_radius(bank: np.ndarray, kept: _ExactSearch, rng_seed: int, sample: int = 2048) -> float:
    """The coreset's covering radius, estimated: the largest distance from a random ``sample`` of
    the full ``bank``'s rows to their nearest kept row (the greedy k-center coreset keeps every row
    of the bank within about this distance of a kept row)."""
    rng = np.random.default_rng([rng_seed, 2])
    picks = np.sort(rng.choice(bank.shape[0], size=min(sample, bank.shape[0]), replace=False))
    dist, _ = kept.nearest(bank[picks])
    return float(dist.max())


def _group_rows(
    bank: np.ndarray,
    rows: np.ndarray,
    bank_rows: np.ndarray,
    held_out: np.ndarray,
    full: _ExactSearch,
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
    remaining = _ExactSearch(rows[~held_out], 1)
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


def _mean_distance(sq: np.ndarray) -> np.ndarray:
    """Squared distances ``(m, k)`` -> mean Euclidean distance per row, float32 (as predict does)."""
    return np.sqrt(np.maximum(sq, 0.0)).mean(axis=1, dtype=np.float64).astype(np.float32)


class _ExactSearch:
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
        return _mean_distance(out)


def _reweight(model: PatchKNN, grids: np.ndarray, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
    """The model's ``image_score="reweighted"`` weights, computed against the held-out bank."""
    from types import SimpleNamespace

    holder = SimpleNamespace(config=model.config, index_=SimpleNamespace(bank=others))
    return np.asarray(type(model)._reweight(holder, grids, rows), dtype=np.float64)  # type: ignore[arg-type]


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled or not sys.stderr.isatty(), leave=False)


__all__ = [
    "Calibration",
    "CalibrationWarning",
    "calibrate",
    "color_scale",
    "held_out_grids",
    "select_images",
    "threshold_from_scores",
    "threshold_metrics",
]
