"""How an ensemble combines its members' grids, and how ``ensemble_weights="auto"`` weighs them.

:func:`combine` is the one place where members' grids become the ensemble's grid, for the fit's
calibration, :meth:`EnsemblePatchKNN.score_batch <patchknn.ensemble.EnsemblePatchKNN.score_batch>`
and the exported runtime alike: each member's grid is z-scored on its held-out normal patches
(``norm``: mean, standard deviation), then the weighted mean is taken,

    z = sum_i w_i (g_i - mu_i) / sd_i / sum_i w_i.

A member with weight 0 is not scored at all. Equal weights (all 1, ``ensemble_weights="equal"``,
the default) give the plain mean, bit for bit as before weights existed. A member with
``grid_highpass`` = sigma > 0 enters by its local contrast instead (:func:`local_contrast`):
``max(z - G_sigma * z, 0)`` of its z-scored grid ``z`` after the border fill, where ``G_sigma *``
is a Gaussian blur over the grid's cells.

``ensemble_weights="auto"`` chooses the weights at fit time from normal images only
(:func:`choose_weights`): the fit's calibration already scores 32 held-out normal images and two
synthetic defects on each (cut-paste of the product's own patches, scratches, colour and texture
changes, missing parts; each with the mask of exactly the pixels it changed) with every member.
Each candidate weight vector (:func:`candidate_weights`: entries 0, 1 or 2 up to scale) combines
those grids; among the candidates that lose no kind of defect by more than :data:`KIND_MARGIN`
against equal weights, the one with the highest pixel AUPRC on all the synthetic masks is kept
(ties: the earlier candidate, equal weights first). Why: which view of the features finds a
product's defects differs between products (bottle's large breaks and contaminations gain from the
normalised views; magnetic_tile's small dark blowholes need the raw one). How far to trust it: the
held-out synthetic defects rank the weights as the real test sets do on bottle, weakly on
magnetic_tile, and in reverse on the synthetic category, whose small holes and spots the
calibration's kinds do not resemble; the per-kind guard halves that loss (docs/accuracy.md,
"Views weighed per product"): an option to check on the product, not a preset's default.

Example:
    >>> candidate_weights(2)
    [(1, 1), (0, 1), (1, 0), (1, 2), (2, 1)]
    >>> g = [np.zeros((1, 2, 2), np.float32), np.ones((1, 2, 2), np.float32)]
    >>> float(combine(g, np.array([[0.0, 1.0], [0.0, 1.0]]), np.array([1.0, 3.0]))[0, 0, 0])
    0.75
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from patchknn.config import PatchKNNConfig

__all__ = [
    "KIND_MARGIN", "WEIGHT_STEPS", "candidate_weights", "check_weights", "choose_weights", "combine",
    "combine_weights", "equal_weights", "local_contrast", "member_highpass", "refuse_single", "saved_weights",
    "score_members",
]

#: the weights ``"auto"`` tries for each member (every combination, up to scale; at most
#: :data:`~patchknn.config.MAX_AUTO_MEMBERS` members)
WEIGHT_STEPS = (0, 1, 2)
#: ``"auto"`` keeps only candidates that lose no kind of held-out defect by more than this (pixel
#: AUPRC) against equal weights (:func:`choose_weights`)
KIND_MARGIN = 0.01


def equal_weights(n: int) -> np.ndarray:
    """The default weights of ``n`` members: all 1 (the plain mean)."""
    return np.ones(n, dtype=np.float64)


def check_weights(weights: np.ndarray, n: int, where: str = "") -> np.ndarray:
    """``weights`` if they can weigh ``n`` members (``(n,)``, finite, >= 0, not all 0), else a
    :class:`~patchknn.errors.ModelFileError` (a damaged file must not score silently otherwise)."""
    from patchknn.errors import ModelFileError

    w = np.asarray(weights)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ModelFileError(
            f"{where}the ensemble's member weights must be {n} finite values >= 0, not all 0; got {w.tolist()}"
        )
    return w.astype(np.float64)


def saved_weights(group: Mapping[str, Any], n: int, where: str = "") -> np.ndarray:
    """The weights of ``n`` members stored in a model file's or export's ``ensemble`` tensor group
    (:func:`check_weights`); files written before weights existed have none: equal weights."""
    return check_weights(np.asarray(group.get("weights", equal_weights(n))), n, where)


def candidate_weights(n: int) -> list[tuple[int, ...]]:
    """The weight vectors ``"auto"`` compares for ``n`` members: entries from :data:`WEIGHT_STEPS`,
    not all 0, each reduced to its smallest integer multiple (so each direction appears once),
    equal weights first, then in lexicographic order."""
    out = [(1,) * n]
    for w in itertools.product(WEIGHT_STEPS, repeat=n):
        if not any(w):
            continue
        g = math.gcd(*w)
        w = tuple(x // g for x in w)
        if w not in out:
            out.append(w)
    return out


def local_contrast(z: np.ndarray, sigma: float, border_cells: int = 0) -> np.ndarray:
    """``max(z - blur(z), 0)`` of ``(..., g, g)`` grids ``z`` after their border fill
    (:func:`patchknn.scoring.fill_border`): what a cell has above its neighbourhood (a Gaussian of
    ``sigma`` cells, the grid's edge repeated). ``z`` itself when ``sigma`` is 0.

    Example:
        >>> z = np.zeros((1, 5, 5)); z[0, 2, 2] = 1.0; z[0, :, 4] += 1.0
        >>> c = local_contrast(z, 1.0)
        >>> bool(c[0, 2, 2] > 0.8), bool(c.min() >= 0), bool(c[0, 0, 4] < 0.5)
        (True, True, True)
    """
    if not sigma:
        return z
    from scipy.ndimage import gaussian_filter

    from patchknn.scoring import fill_border

    z = np.asarray(fill_border(z, border_cells), dtype=np.float64)
    blur = gaussian_filter(z, sigma=(0,) * (z.ndim - 2) + (sigma, sigma), mode="nearest", truncate=4.0)
    return np.maximum(z - blur, 0.0)


def refuse_single(config: PatchKNNConfig, is_ensemble: bool) -> None:
    """Raise :class:`~patchknn.errors.ConfigError` if a single model (not an ensemble) has
    ``grid_highpass``: it shapes a member's z-scored grid before the members are combined."""
    if config.grid_highpass and not is_ensemble:
        from patchknn.errors import ConfigError

        raise ConfigError(
            "grid_highpass shapes an ensemble member's z-scored grid before the members are combined; "
            "set it on a member (e.g. ensemble=['layer_norm=true+grid_highpass=0'] with grid_highpass on "
            "the main configuration), not on a single model"
        )


def member_highpass(members: Sequence[Any]) -> tuple[list[float], int]:
    """Each member's ``grid_highpass`` and the members' shared ``border_cells`` (0 where a saved
    configuration predates them), read from their ``config``."""
    highpass = [float(getattr(m.config, "grid_highpass", 0.0) or 0.0) for m in members]
    return highpass, int(getattr(members[0].config, "border_cells", 0) or 0) if members else 0


def combine(
    grids: Sequence[np.ndarray | None], norm: np.ndarray, weights: np.ndarray | None = None,
    highpass: Sequence[float] | None = None, border_cells: int = 0,
) -> np.ndarray:
    """The ensemble's grids: the ``weights``-weighted mean of the members' z-scored ``grids``
    (float32; ``grids[i]`` may be ``None`` where ``weights[i] == 0``; ``None`` weights = equal).
    ``highpass[i]`` > 0: member ``i`` enters by its :func:`local_contrast` (``border_cells``: the
    shared border fill it is taken after)."""
    weights = equal_weights(len(norm)) if weights is None else np.asarray(weights, dtype=np.float64)
    highpass = [0.0] * len(norm) if highpass is None else list(highpass)
    total: np.ndarray | None = None
    for grid, (mu, sd), w, sigma in zip(grids, norm, weights, highpass):
        if w == 0:
            continue
        assert grid is not None, "a member with a non-zero weight needs its grids"
        z = (grid.astype(np.float64) - mu) / sd
        if sigma:
            z = local_contrast(z, sigma, border_cells)
        if w != 1:
            z = z * w
        total = z if total is None else total + z
    if total is None:
        raise ValueError("at least one member needs a non-zero weight")
    return (total / weights.sum()).astype(np.float32)


def combine_weights(image_weights: Sequence[np.ndarray | None], weights: np.ndarray) -> np.ndarray:
    """The ensemble's image weights (PatchCore's reweighting): the members' weighted mean."""
    total = sum(w * iw for w, iw in zip(weights, image_weights) if w != 0)
    return np.asarray(total / weights.sum())


def score_members(
    score: Callable[[Any], tuple[np.ndarray, np.ndarray]], members: Sequence[Any], norm: np.ndarray,
    weights: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """An ensemble's ``(grids, image weights)`` of one batch: ``score(member)`` of every member
    with a non-zero weight (the others are not scored), combined (:func:`combine`, with the
    members' own ``grid_highpass``)."""
    out = [score(m) if w else (None, None) for m, w in zip(members, weights)]
    grids = combine([g for g, _ in out], norm, weights, *member_highpass(members))
    return grids, combine_weights([iw for _, iw in out], weights)


def choose_weights(
    normal: Sequence[np.ndarray],
    defects: Sequence[np.ndarray],
    masks: np.ndarray,
    norm: np.ndarray,
    config: PatchKNNConfig,
    kinds: Sequence[str] | None = None,
    highpass: Sequence[float] | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The weights of ``"auto"``: among the candidates (:func:`candidate_weights`) that lose no kind
    of held-out defect by more than :data:`KIND_MARGIN` against equal weights, the one whose combined
    maps have the highest pixel AUPRC on all the held-out synthetic defects.

    The pooled figure follows the kinds with the most defect pixels (cut-paste, texture, missing
    parts); the guard keeps a choice from buying them with a kind that needs another view (small
    colour spots find the raw view's distances, as magnetic_tile's blowholes do): each kind's pixel
    AUPRC is taken on its own defects with all the normal images. Without ``kinds`` every candidate
    is eligible.

    Args:
        normal: each member's held-out grids of the normal calibration images ``(n, g, g)``.
        defects: each member's held-out grids of their synthetic defects ``(m, g, g)``.
        masks: the defects' masks at the model's input size ``(m, S, S)`` bool.
        norm: the members' z-score normalisation ``(members, 2)``.
        config: the ensemble's configuration (maps as :func:`patchknn.scoring.score_map`: a guided
            filter, which needs each image, does not take part in the choice).
        kinds: each defect's kind (``m`` names, :data:`patchknn.defects.DEFECT_KINDS`).
        highpass: each member's ``grid_highpass`` (:func:`combine`; ``None`` = none).

    Returns:
        The chosen weights (float64, one per member) and the table: one row per candidate with its
        ``weights``, ``pixel_auprc`` and ``image_auroc`` on the held-out set, and with ``kinds`` its
        ``kinds_auprc`` (by kind) and ``eligible``.
    """
    from patchknn import metrics, scoring

    size = (config.image_size, config.image_size)
    n_normal = len(normal[0])
    all_masks = np.concatenate([np.zeros((n_normal, *size), dtype=bool), np.asarray(masks, dtype=bool)])
    labels = np.r_[np.zeros(n_normal), np.ones(len(masks))]
    kind_of = None if kinds is None else np.asarray(list(kinds))
    if kind_of is not None and len(kind_of) != len(masks):
        raise ValueError(f"{len(kind_of)} defect kinds for {len(masks)} defects")
    rows: list[dict[str, Any]] = []
    reference: dict[str, float] = {}  # equal weights' figure per kind (the first candidate)
    best, best_w = -math.inf, equal_weights(len(norm))
    for cand in candidate_weights(len(norm)):
        w = np.asarray(cand, dtype=np.float64)
        border = int(config.border_cells)
        grids = np.concatenate([combine(g, norm, w, highpass, border) for g in (normal, defects)])
        maps = np.stack([scoring.score_map(g, size, config) for g in grids])
        scores = np.array([scoring.image_score(g, config, amap=m) for g, m in zip(grids, maps)])
        px = float(metrics.pixel_auprc(maps, all_masks))
        row: dict[str, Any] = {
            "weights": list(cand),
            "pixel_auprc": round(px, 6),
            "image_auroc": round(float(metrics.image_auroc(scores, labels)), 6),
        }
        eligible = True
        if kind_of is not None:
            by_kind = {}
            for kind in sorted(set(kind_of.tolist())):
                sel = np.r_[np.ones(n_normal, dtype=bool), kind_of == kind]
                by_kind[kind] = float(metrics.pixel_auprc(maps[sel], all_masks[sel]))
            reference = reference or by_kind
            eligible = all(by_kind[k] >= reference[k] - KIND_MARGIN for k in by_kind)
            row["kinds_auprc"] = {k: round(v, 6) for k, v in by_kind.items()}
            row["eligible"] = eligible
        rows.append(row)
        if eligible and px > best:
            best, best_w = px, w
    return best_w, rows
