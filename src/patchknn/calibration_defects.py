"""The synthetic defects the threshold's calibration scores (``threshold_method="defects"``), made
off the fit's critical path.

:func:`defect_images` makes :data:`DEFECTS_PER_IMAGE` defects (:mod:`patchknn.defects`) on each
calibration image, in one thread per CPU thread (decoding and the whole-image numpy operations
release the GIL); :func:`defect_rows` runs a fold's defects through the backbone and the PCA, in one
batch as the calibration scores them. :class:`DefectRows` does both in a background thread while
:meth:`PatchKNN.fit <patchknn.model.PatchKNN.fit>` builds the memory bank: the defects are made
while the PCA is fitted (on one thread) and the bank projected, their rows computed once the PCA
is known; the coreset, the index build and the calibration's own loop run alone
(:meth:`DefectRows.wait`). :class:`DefectSources` makes them once for
every member of an ensemble.

Example:
    >>> fold_groups(10, 8, seed=0)  # the folds whose defects are made together
    [[0, 4], [1, 6], [2, 8], [3, 9]]
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from patchknn.data import iter_batches, load_image, resize_mask
from patchknn.defects import DEFECT_KINDS, add_defect
from patchknn.heldout import fold_groups

if TYPE_CHECKING:
    from patchknn.model import PatchKNN
    from patchknn.reduction import PCA

#: synthetic defects made on each calibration image for ``threshold_method="defects"``
DEFECTS_PER_IMAGE = 2


def defect_kinds(image: int) -> list[str]:
    """The kinds of the :data:`DEFECTS_PER_IMAGE` defects made on fitted image ``image``: defect
    ``n = image * per + j`` has kind ``DEFECT_KINDS[n % 5]``.

    Example:
        >>> defect_kinds(0), defect_kinds(3)
        (['cutpaste', 'scratch'], ['scratch', 'colour'])
    """
    per = DEFECTS_PER_IMAGE
    return [DEFECT_KINDS[n % len(DEFECT_KINDS)] for n in range(image * per, (image + 1) * per)]


def defect_images(model: PatchKNN, sources: Sequence[Any], images: Sequence[int]) -> dict[int, list[np.ndarray]]:
    """The :data:`DEFECTS_PER_IMAGE` synthetic defects made on each of the fitted ``images``
    (indices into ``sources``, the fitted images in bank order), by image. Defect
    ``n = image * per + j`` has kind ``DEFECT_KINDS[n % 5]`` and seed ``(config.seed, n)``, so each
    image's defects are the same whichever fold it is in, and whichever thread makes them: they are
    made in one thread per CPU thread of the model (decoding and the whole-image numpy operations
    of :func:`patchknn.defects.add_defect` release the GIL; it runs on one core otherwise)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    per, seed = DEFECTS_PER_IMAGE, model.config.seed

    keep = sources if isinstance(sources, DefectSources) else None
    size = (model.config.image_size, model.config.image_size)

    def make(img: int) -> list[np.ndarray]:
        normal = load_image(sources[img], max_pixels=model.max_pixels)
        made = [add_defect(normal, kind, seed=seed, index=img * per + j) for j, kind in enumerate(defect_kinds(img))]
        if keep is not None and keep.keep_masks:  # their masks at the input size, for ensemble_weights="auto"
            keep.masks[seed, img] = [resize_mask(d.mask, size) for d in made]
        return [d.image for d in made]

    cache = keep.made if keep is not None else {}
    todo = [img for img in images if (seed, img) not in cache]
    threads = max(1, min(len(todo), torch.get_num_threads()))
    if threads == 1:
        cache |= {(seed, img): make(img) for img in todo}
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="patchknn-defects") as pool:
            cache |= {(seed, img): pair for img, pair in zip(todo, pool.map(make, todo))}
    return {img: cache[seed, img] for img in images}


class DefectSources(Sequence[Any]):
    """Fitted images (a sequence of sources, in bank order) whose synthetic defects
    (:func:`defect_images`) are made once for every model that calibrates on them: an ensemble's
    members, which score the same defects with their own features."""

    def __init__(self, sources: Sequence[Any], masks: bool = False) -> None:
        self.sources = list(sources)
        self.made: dict[tuple[int, int], list[np.ndarray]] = {}  # (seed, image) -> its defects
        # masks=True: (seed, image) -> their masks at the model's input size (bool), in the same order
        self.keep_masks = masks
        self.masks: dict[tuple[int, int], list[np.ndarray]] = {}

    def masks_of(self, seed: int, images: Sequence[int]) -> np.ndarray | None:
        """The masks of the defects of ``images`` (image by image, as the held-out defect grids
        are ordered), ``None`` if some were not made."""
        if not images or any((seed, img) not in self.masks for img in images):
            return None
        return np.stack([m for img in images for m in self.masks[seed, img]])

    @staticmethod
    def kinds_of(images: Sequence[int]) -> list[str]:
        """The kinds of the defects of ``images``, in the order of :meth:`masks_of`."""
        return [kind for img in images for kind in defect_kinds(img)]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: Any) -> Any:
        return self.sources[i]


def defect_rows(
    model: PatchKNN,
    sources: Sequence[Any],
    images: Sequence[int],
    pca: PCA | None,
    made: dict[int, list[np.ndarray]] | None = None,
) -> np.ndarray:
    """The patch vectors searched for the :func:`defect_images` of the fitted ``images`` (indices
    into ``sources``), image by image, projected by ``pca`` (the model's, ``None`` without one):
    ``(len(images) * DEFECTS_PER_IMAGE * grid**2, d)`` float32. ``made``: those defects, made
    before (:func:`defect_images` of at least ``images``). The defects (arrays already) are
    resized in this thread, in batches of ``model.batch_size``."""
    import torch

    made = defect_images(model, sources, images) if made is None else made
    defects = [d for img in images for d in made[img]]
    size, ext = model.config.image_size, model.extractor
    batches = iter_batches(defects, size, model.batch_size, num_workers=0, max_pixels=model.max_pixels)
    with torch.inference_mode():
        rows = [ext.query_rows(batch.images.to(model.device), pca).float().numpy() for batch in batches]
    out = np.concatenate(rows)
    return np.ascontiguousarray(out.reshape(-1, out.shape[-1]), dtype=np.float32)


class DefectRows:
    """The synthetic defects' rows of a fit's calibration (:func:`defect_rows` of each fold's
    images, one fold per call as the calibration batches them: the same rows), computed in a
    background thread while the memory bank is built: the defects are made (:func:`defect_images`)
    while the PCA is fitted on one thread, and run through the backbone once :meth:`set_pca` gives
    the projection, while the bank is projected (not beside the coreset or the index build, see
    :meth:`wait`).

    Args:
        model: the model being fitted (its config, extractor and run options).
        sources: the fitted images in bank order.
        n_images: how many (the calibration picks its images and folds from it, seeded).
    """

    def __init__(self, model: PatchKNN, sources: Sequence[Any], n_images: int) -> None:
        import torch

        cfg = model.config
        few = n_images < 2 or cfg.calibration_images < 1
        self.groups = [] if few else fold_groups(n_images, cfg.calibration_images, cfg.seed)
        self._model, self._sources, self._threads = model, sources, torch.get_num_threads()
        self._pca: Any = None
        self._go, self._cancelled = threading.Event(), False
        self._rows: dict[tuple[int, ...], np.ndarray] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="patchknn-defect-rows", daemon=True)
        self._thread.start()

    @classmethod
    def of(cls, model: PatchKNN, sources: Sequence[Any] | DefectRows, n_images: int) -> DefectRows:
        """``sources`` if they are rows already, else the rows of the fitted ``model`` (projected
        by its ``pca_``) on the images ``sources``, computed from now on."""
        if isinstance(sources, DefectRows):
            return sources
        rows = cls(model, sources, n_images)
        rows.set_pca(model.pca_)
        return rows

    def set_pca(self, pca: Any) -> None:
        """The fitted PCA (``None``: no PCA): the defects' rows are computed from now on."""
        self._pca = pca
        self._go.set()

    def cancel(self) -> None:
        """The fit failed before its PCA: stop (the defects made so far are dropped)."""
        self._cancelled = True
        self._go.set()

    def wait(self) -> DefectRows:
        """Wait for the thread to finish (``self``); its error, if any, is raised here. Called
        before the coreset, the index build and the pruned fold searches: a thread beside a loop
        of many small operations (the greedy coreset) slows it down many times over, each step
        waiting for the GIL (best preset: 215 s instead of ~30), and beside OpenMP threads (faiss's
        k-means) it oversubscribes the cores (bottle's index build 13 instead of 5 s)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self

    def rows(self, group: Sequence[int]) -> np.ndarray:
        """:func:`defect_rows` of the fold ``group`` (waits for the thread)."""
        return self.wait()._rows[tuple(group)]

    def _run(self) -> None:
        import torch

        try:
            torch.set_num_threads(self._threads)  # a new thread starts with the default count
            made = defect_images(self._model, self._sources, [i for g in self.groups for i in g])
            self._go.wait()
            for group in [] if self._cancelled else self.groups:
                self._rows[tuple(group)] = defect_rows(self._model, self._sources, group, self._pca, made)
        except BaseException as e:  # noqa: BLE001 - raised in the fitting thread by rows()
            self._error = e


def fit_defects(
    model: PatchKNN, store: Any, sources: Sequence[Any] | None, keep_held_out: bool
) -> DefectRows | None:
    """The :class:`DefectRows` a fit of ``model`` on the images ``sources`` (held in ``store``, a
    :class:`~patchknn.features.TrainingStore`) calibrates with, started now; ``None`` when it
    uses none (no ``sources``, or neither ``threshold_method="defects"`` nor ``keep_held_out``)."""
    if sources is None or (model.config.threshold_method != "defects" and not keep_held_out):
        return None
    return DefectRows(model, sources, store.n_rows // model.config.rows_per_image)


__all__ = [
    "DEFECTS_PER_IMAGE",
    "DefectRows",
    "DefectSources",
    "defect_images",
    "defect_rows",
    "fit_defects",
    "fold_groups",
]
