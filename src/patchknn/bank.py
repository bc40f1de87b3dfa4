"""The memory bank stage of fitting: normal patch features -> PCA -> bank -> coreset -> index.

PatchCore's stages, in the order the paper applies them: the PCA is fitted from the streamed
moments of every normal patch (``pca_variance``; ``None`` keeps the raw features), every patch is
projected (the full bank, rows ``[i * grid**2, (i + 1) * grid**2)`` = training image ``i``; with
``train_flips`` each image is followed by its flipped copies, :func:`with_train_flips`), a
greedy k-center coreset keeps ``coreset_ratio`` of the rows (optional), and the kept rows are
indexed for search by the index builder the estimator passes in.

:func:`extend_memory_bank` is the same stage for :meth:`PatchKNN.partial_fit
<patchknn.model.PatchKNN.partial_fit>`: the new images' patches are projected by the fitted PCA
(unchanged) and appended to the full bank (their rows follow the old images'), the coreset is
continued over them (:func:`patchknn.coreset.extend_coreset`), and the index is rebuilt: the same
bank, index and calibration input as a fit on all the images with the old PCA.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from patchknn.calibration_defects import DefectRows
from patchknn.config import PatchKNNConfig
from patchknn.coreset import extend_coreset, greedy_coreset
from patchknn.data import as_sources, source_name
from patchknn.errors import ConfigError
from patchknn.features import TrainingStore
from patchknn.index import single_threaded
from patchknn.reduction import PCA

if TYPE_CHECKING:
    from patchknn.model import PatchKNN

__all__ = [
    "MemoryBank",
    "TrainingBank",
    "build_memory_bank",
    "check_store",
    "Collected",
    "collect_features",
    "fitted_images",
    "extend_memory_bank",
    "training_store",
    "with_train_flips",
]


@dataclass
class MemoryBank:
    """The result of :func:`build_memory_bank`.

    Attributes:
        pca: the fitted PCA (``None`` without one).
        full: every normal patch in the index's space, ``(n_images * rows_per_image, d)`` (image by
            image: its grid, then its ``train_flips`` copies' grids).
        kept: the coreset's row numbers in ``full`` (sorted), ``None`` without a coreset.
        index: the search index over the kept rows.
        seconds: ``pca_seconds``, ``coreset_seconds``, ``index_seconds``.
    """

    pca: PCA | None
    full: np.ndarray
    kept: np.ndarray | None
    index: Any
    seconds: dict[str, float]


@dataclass
class TrainingBank:
    """What :meth:`PatchKNN.partial_fit <patchknn.model.PatchKNN.partial_fit>` needs of a fitted
    model's training besides its index: every training patch in the index's space (``full``, rows
    ``[i * r, (i + 1) * r)`` = training image ``i`` and its flipped copies, ``r`` = the config's
    ``rows_per_image``; the calibration's input) and the
    coreset's row numbers in it (``kept``, sorted; ``None`` without a coreset: then ``full`` is
    the index's own bank and is not stored twice).

    A loaded coreset model reads ``full``/``kept`` from its file on first use (``source``: a
    function that returns them, see :func:`patchknn.persistence.read_model`).
    """

    full: np.ndarray | None
    kept: np.ndarray | None
    source: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(full, kept)`` of a coreset model (read from the model file on first use)."""
        if self.full is None or self.kept is None:
            if self.source is None:
                raise ConfigError(
                    "partial_fit needs every training patch, and this coreset model has no training bank "
                    "(fitted with `patchknn fit --compact`, saved with save(training=False) or by an older "
                    "patchknn); fit it again without --compact"
                )
            self.full, self.kept = self.source()
            self.source = None
        return self.full, self.kept


class Collected(NamedTuple):
    """What :func:`collect_features` returns: the training store, the names of the images in it
    and the images themselves (their sources, in the store's order)."""

    store: TrainingStore
    names: list[str]
    sources: list[Any]


def collect_features(model: PatchKNN, images: Sequence[Any] | str | Path, what: str = "fit") -> Collected:
    """The training store of ``images`` for ``model`` (decoded in batches by its run options), the
    names and sources of the images in it; sets ``model.skipped_`` (unreadable images left out)."""
    sources = as_sources(images)
    if len(sources) == 0:
        raise ConfigError(f"{what} needs at least one normal image")
    store = training_store(model, len(sources))
    batches = model.batches(sources)
    with model.progress_bar(len(sources), f"{what}: features") as bar:
        for batch in batches:
            store.add(*model.fit_features(with_train_flips(batch.images, model.config.train_flips)))
            bar.update(len(batch.indices))
    errors = getattr(batches, "errors", [])
    model.skipped_ = [(src, reason) for _, src, reason in errors]
    return Collected(store, *fitted_images(sources, errors))


def fitted_images(sources: Sequence[Any], errors: Sequence[Any]) -> tuple[list[str], list[Any]]:
    """The names and sources of ``sources`` without the unreadable ones (``errors``: a batch
    iterator's ``(index, source, reason)`` triples), in order: the images a store holds."""
    bad = {i for i, _, _ in errors}
    kept = [i for i in range(len(sources)) if i not in bad]
    return [source_name(sources[i], i) for i in kept], [sources[i] for i in kept]


def training_store(model: PatchKNN, capacity: int) -> TrainingStore:
    """An empty store for ``capacity`` training images of ``model`` (and their ``train_flips``):
    compact maps when a PCA of linear features follows (the paper), full patch vectors otherwise."""
    ext, cfg = model.extractor, model.config
    compact = cfg.pca_variance is not None and ext.can_project
    return TrainingStore(ext, capacity * cfg.grids_per_image, compact=compact)


#: ``train_flips`` kind -> the image axes it flips (images are ``(B, C, H, W)``)
FLIP_DIMS = {"hflip": (3,), "vflip": (2,), "rot180": (2, 3)}


def with_train_flips(images: torch.Tensor, flips: Sequence[str]) -> torch.Tensor:
    """``images`` ``(B, C, H, W)`` with each image followed by its ``flips`` (``train_flips``), in
    that order: ``(B * (1 + len(flips)), C, H, W)``; ``images`` itself without flips.

    Example:
        >>> x = torch.arange(8).reshape(2, 1, 2, 2)
        >>> with_train_flips(x, ("hflip",))[:, 0].tolist()
        [[[0, 1], [2, 3]], [[1, 0], [3, 2]], [[4, 5], [6, 7]], [[5, 4], [7, 6]]]
    """
    if not flips:
        return images
    copies = [images] + [torch.flip(images, dims=FLIP_DIMS[kind]) for kind in flips]
    return torch.stack(copies, dim=1).reshape(-1, *images.shape[1:])


def check_store(store: TrainingStore, what: str) -> TrainingStore:
    """``store``, checked: at least one image, finite features (``what``: the caller, for messages)."""
    if store.n_rows == 0:
        raise ConfigError(f"{what}: no usable image (all were skipped as unreadable)")
    if not bool(torch.isfinite(store.moments.scatter).all()):
        raise ConfigError(f"{what}: the backbone produced NaN/Inf features; check the input images")
    return store


def build_memory_bank(
    store: TrainingStore,
    config: PatchKNNConfig,
    make_index: Callable[[np.ndarray], Any],
    pca: PCA | None = None,
    defects: DefectRows | None = None,
) -> MemoryBank:
    """PCA, bank, coreset and index from the features in ``store`` (which is released after use).

    ``pca``: project by this fitted PCA instead of fitting one (e.g. a fit on A plus B with the
    PCA of A, what :func:`extend_memory_bank` is equal to); ``None`` = as ``config.pca_variance``
    says. ``defects``: the calibration's synthetic defects, being made in the background while
    the PCA is fitted and the bank projected (their rows from the moment the PCA is known), and
    waited for before the coreset and the index: :class:`~patchknn.calibration_defects.DefectRows`.
    """
    t0 = time.perf_counter()
    try:
        if pca is None and config.pca_variance is not None:
            # one thread: the eigensolver's many small parallel steps run up to 10x slower on 2
            # threads than on one as soon as anything else wants the CPU
            with single_threaded():
                pca = PCA.from_moments(store.moments, float(config.pca_variance))
    except BaseException:
        if defects is not None:
            defects.cancel()
        raise
    if defects is not None:
        defects.set_pca(pca)
    bank = _project(store, pca)
    if defects is not None:
        # the coreset (a loop of small steps) and the index build (OpenMP threads) run alone: on
        # 2 cores beside the defects' threads the index build took 13 instead of 5 s (bottle)
        defects.wait()
    t_pca = time.perf_counter()
    kept: np.ndarray | None = None
    if config.coreset_ratio < 1.0:
        kept = np.sort(greedy_coreset(bank, config.coreset_ratio, config.coreset_dim, config.seed))
    return _finish(pca, bank, kept, config, make_index, t0, t_pca)


def extend_memory_bank(
    pca: PCA | None,
    old: TrainingBank | np.ndarray | None,
    store: TrainingStore,
    config: PatchKNNConfig,
    make_index: Callable[[np.ndarray], Any],
) -> MemoryBank:
    """The memory bank of a fitted model with the images in ``store`` added (see the module
    docstring): ``old`` = the model's :class:`TrainingBank` with a coreset, else its index's bank."""
    t0 = time.perf_counter()
    if not isinstance(old, TrainingBank | np.ndarray):
        raise ConfigError("partial_fit needs the memory bank in this process (not a sharded index)")
    full, kept = old.rows() if isinstance(old, TrainingBank) else (old, None)
    new = _project(store, pca)
    if new.shape[1] != full.shape[1]:
        raise ConfigError(f"the new patches have {new.shape[1]} dimensions, the memory bank {full.shape[1]}")
    bank = np.concatenate([full, new])
    t_pca = time.perf_counter()
    if kept is not None:
        added = extend_coreset(bank, kept, full.shape[0], config.coreset_ratio, config.coreset_dim, config.seed)
        kept = np.concatenate([kept, added])
    return _finish(pca, bank, kept, config, make_index, t0, t_pca)


def _project(store: TrainingStore, pca: PCA | None) -> np.ndarray:
    """The store's patches in the index's space (raw without a PCA); a compact store is released."""
    if pca is None:
        return store.vectors()
    bank = store.projected(pca)
    store.release()
    return bank


def _finish(
    pca: PCA | None,
    bank: np.ndarray,
    kept: np.ndarray | None,
    config: PatchKNNConfig,
    make_index: Callable[[np.ndarray], Any],
    t0: float,
    t_pca: float,
) -> MemoryBank:
    t_core = time.perf_counter()
    index_bank = bank if kept is None else bank[kept]
    if config.k > index_bank.shape[0]:
        raise ConfigError(f"k={config.k} is larger than the memory bank ({index_bank.shape[0]} patches)")
    index = make_index(index_bank)
    seconds = {
        "pca_seconds": round(t_pca - t0, 3),
        "coreset_seconds": round(t_core - t_pca, 3),
        "index_seconds": round(time.perf_counter() - t_core, 3),
    }
    return MemoryBank(pca, bank, kept, index, seconds)
