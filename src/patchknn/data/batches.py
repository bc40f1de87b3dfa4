"""Streaming decoded, resized batches (worker processes decode while the backbone runs)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image

from patchknn.data.datasets import source_name
from patchknn.data.decode import DEFAULT_MAX_PIXELS, ImageSource, SizeArg, as_hw, check_max_pixels
from patchknn.data.resize import load_resized
from patchknn.errors import ConfigError, ImageError


# -------------------------------------------------------------------------------------------------
# streaming batches
# -------------------------------------------------------------------------------------------------
class ImageRecord(NamedTuple):
    """What :class:`ImageDataset` returns for one index.

    ``image`` is ``(3, H, W) uint8`` (zeros when ``error`` is set), ``size`` the original
    ``(height, width)`` (``(0, 0)`` on error), ``error`` the reason the image is unusable, or ``None``.
    """

    index: int
    image: torch.Tensor
    size: tuple[int, int]
    error: str | None


class ImageDataset(torch.utils.data.Dataset):
    """A map-style dataset that loads and resizes images, never raising for a bad image.

    Item ``i`` is an :class:`ImageRecord` ``(i, uint8 tensor (3, H, W), original (height, width),
    error)``: the image goes through :func:`load_image` and :func:`resize_image`; if it cannot be
    used, the tensor is zeros and ``error`` holds the reason, so a DataLoader worker never dies on bad
    input and the main process applies the policy (see :func:`iter_batches`).

    Args:
        sources: paths, encoded bytes, PIL images or numpy arrays (all picklable, so workers work).
        image_size: output ``S`` or ``(height, width)``.
        max_pixels: passed to :func:`load_image`.

    Example:
        >>> import numpy as np
        >>> ds = ImageDataset([np.zeros((8, 8, 3), np.uint8), b"junk"], 4)
        >>> ds[0].image.shape, ds[0].error, ds[1].error is not None
        (torch.Size([3, 4, 4]), None, True)
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        image_size: SizeArg,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.sources = _as_source_list(sources)
        self.image_size = as_hw(image_size, "image_size")
        self.max_pixels = check_max_pixels(max_pixels)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> ImageRecord:
        height, width = self.image_size
        try:
            resized, original = load_resized(self.sources[index], self.image_size, max_pixels=self.max_pixels)
        except ImageError as exc:
            return ImageRecord(index, torch.zeros((3, height, width), dtype=torch.uint8), (0, 0), exc.reason)
        except Exception as exc:  # noqa: BLE001 - a worker must never die on one input
            reason = f"unexpected {type(exc).__name__} while loading: {exc}"
            return ImageRecord(index, torch.zeros((3, height, width), dtype=torch.uint8), (0, 0), reason)
        tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return ImageRecord(index, tensor, original, None)


def _as_source_list(sources: Any) -> list[Any]:
    if isinstance(sources, str | os.PathLike | bytes | bytearray | memoryview | Image.Image):
        raise ConfigError("sources must be a list of images, not a single path/bytes/PIL image")
    if isinstance(sources, np.ndarray):
        if sources.ndim != 4:
            raise ConfigError("a numpy array of sources must be a (N, H, W, C) stack of images")
        return list(sources)
    return list(sources)


class _RawBatch(NamedTuple):
    indices: list[int]
    images: torch.Tensor
    sizes: list[tuple[int, int]]
    errors: list[str | None]


def _collate(records: list[ImageRecord]) -> _RawBatch:
    """Stack the records of one batch (runs in the worker)."""
    return _RawBatch(
        indices=[r.index for r in records],
        images=torch.stack([r.image for r in records]),
        sizes=[r.size for r in records],
        errors=[r.error for r in records],
    )


@dataclass
class Batch:
    """A batch of decoded images ready for a backbone.

    Attributes:
        indices: position of each image in the ``sources`` given to :func:`iter_batches`.
        images: ``(B, 3, H, W) uint8`` tensor (RGB, not normalised).
        sizes: original ``(height, width)`` of each image, before resizing.
        sources: printable name of each source (see :func:`source_name`).
    """

    indices: list[int]
    images: torch.Tensor
    sizes: list[tuple[int, int]]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.indices)


class ImageFailure(NamedTuple):
    """An image skipped by :func:`iter_batches` with ``on_error="skip"``."""

    index: int
    source: str
    reason: str


OnError = Literal["stop", "skip"]


class BatchIterator(Iterator[Batch]):
    """Iterator returned by :func:`iter_batches`; collects skipped images in :attr:`errors`.

    Attributes:
        errors: one :class:`ImageFailure` ``(index, source, reason)`` per skipped image, in source
            order, filled while iterating (complete once the iterator is exhausted).

    Use it as a context manager (or call :meth:`close`) to stop the loader workers early.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        num_workers: int,
        on_error: OnError,
        on_skip: Callable[[ImageFailure], None] | None = None,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_error = on_error
        self.on_skip = on_skip
        self.errors: list[ImageFailure] = []
        self._gen = self._run()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._gen)

    def close(self) -> None:
        """Stop iterating and shut the worker processes down."""
        self._gen.close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> Iterator[Batch]:
        if len(self.dataset) == 0:
            return
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate,
            persistent_workers=False,
        )
        sources = self.dataset.sources
        it = iter(loader)
        try:
            for raw in it:
                keep: list[int] = []
                for pos, (index, error) in enumerate(zip(raw.indices, raw.errors, strict=True)):
                    if error is None:
                        keep.append(pos)
                        continue
                    name = source_name(sources[index], index)
                    if self.on_error == "stop":
                        raise ImageError(name, error)
                    failure = ImageFailure(index, name, error)
                    self.errors.append(failure)
                    if self.on_skip is not None:
                        self.on_skip(failure)
                if not keep:
                    continue
                images = raw.images if len(keep) == len(raw.indices) else raw.images[keep]
                yield Batch(
                    indices=[raw.indices[p] for p in keep],
                    images=images,
                    sizes=[raw.sizes[p] for p in keep],
                    sources=[source_name(sources[raw.indices[p]], raw.indices[p]) for p in keep],
                )
        finally:
            del it  # shuts DataLoader workers down promptly


def iter_batches(
    sources: Sequence[ImageSource],
    image_size: SizeArg,
    batch_size: int = 16,
    num_workers: int | Literal["auto"] = 0,
    on_error: OnError = "stop",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_skip: Callable[[ImageFailure], None] | None = None,
) -> BatchIterator:
    """Decode and resize images in parallel, yielding uint8 batches in source order.

    Images are loaded by a :class:`torch.utils.data.DataLoader` over an :class:`ImageDataset`
    (``num_workers`` worker processes, none when 0), so the backbone can run in the main process
    while the next images decode. Bad images never crash a worker; the policy applies here:

    * ``on_error="stop"``: the first bad image (in source order) raises :class:`ImageError` naming it
      and the reason, when its batch arrives (no part of that batch is yielded).
    * ``on_error="skip"``: bad images are left out of their batch (batches may be smaller than
      ``batch_size``; a batch with no good image is not yielded) and recorded as
      :class:`ImageFailure` ``(index, source, reason)`` in the returned iterator's ``errors`` list;
      ``on_skip`` (optional) is also called with each failure as it happens.

    Args:
        sources: paths, encoded bytes, PIL images or numpy arrays.
        image_size: ``S`` or ``(height, width)`` every image is resized to (:func:`resize_image`).
        batch_size: images per batch (before skipping).
        num_workers: DataLoader worker processes (0 = load in the main process); ``"auto"`` =
            :func:`auto_workers` (none for a single batch, else up to 2, leaving a core free).
        on_error: ``"stop"`` or ``"skip"``.
        max_pixels: passed to :func:`load_image`.
        on_skip: optional callback for each skipped image (``on_error="skip"``).

    Returns:
        A :class:`BatchIterator` of :class:`Batch`.

    Raises:
        ConfigError: a bad option (checked immediately, before any image is read).
        ImageError: with ``on_error="stop"``, while iterating.

    Example:
        >>> batches = iter_batches(["a.png", "b.png", "bad.png"], 224, on_error="skip")  # doctest: +SKIP
        >>> for batch in batches:  # doctest: +SKIP
        ...     features = model(batch.images)
        >>> batches.errors  # doctest: +SKIP
        [ImageFailure(index=2, source='bad.png', reason='corrupt or truncated image data (...)')]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers != "auto" and (
        isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
    ):
        raise ConfigError(f"num_workers must be a non-negative integer or 'auto', got {num_workers!r}")
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    dataset = ImageDataset(sources, image_size, max_pixels=max_pixels)
    if num_workers == "auto":
        num_workers = auto_workers(len(dataset), batch_size)
    return BatchIterator(dataset, batch_size, num_workers, on_error, on_skip)


def auto_workers(n_images: int, batch_size: int) -> int:
    """Decoding processes for ``num_workers="auto"``: 0 when everything fits in one batch (a worker
    would only add its start-up time), else ``min(2, CPUs - 1)``, at least 1.

    One worker decodes while the main process runs the backbone and the search on the other
    core(s); decoding (about 25 ms for a 900x900 PNG) is a fraction of the backbone's time on a
    CPU, so a second worker only helps with more cores.
    """
    if n_images <= batch_size:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus - 1))
