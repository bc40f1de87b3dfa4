"""Image loading and validation, MVTec-layout and plain-folder datasets, streaming batches.

Everything that turns "something the user handed us" into an ``(H, W, 3) uint8`` RGB array lives here,
so every entry point (CLI, server, estimator, Ray jobs) applies the same rules:

* EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`); unreadable EXIF is ignored.
* Alpha channels are **dropped, not composited** onto a background: an RGBA pixel ``(r, g, b, a)``
  becomes ``(r, g, b)`` whatever ``a`` is (likewise LA, PA and palette transparency).
* Palette images are mapped through their palette; grayscale is repeated into three channels;
  CMYK, YCbCr, HSV and LAB go through Pillow's conversion to RGB.
* 16-bit data is scaled by the value range of its type, not by the image's own min/max:
  ``uint16`` / ``I;16`` -> ``value >> 8``. Pillow's 32-bit integer mode ``I`` is treated as 16-bit
  data (clipped to 0..65535, then ``>> 8``), which is how 16-bit PNG/TIFF files are often represented.
* Floating-point data (``float`` arrays, Pillow mode ``F``) is assumed to lie in [0, 1]:
  ``round(value * 255)`` clipped to 0..255; NaN or infinity is an error.
* Bilevel data (``bool`` arrays, Pillow mode ``1``) becomes 0 / 255.
* A file is decoded completely (truncated or corrupt data is an error, whatever
  :data:`PIL.ImageFile.LOAD_TRUNCATED_IMAGES` says), and the pixel count read from the header is
  checked against ``max_pixels`` *before* decoding (a decompression-bomb guard). Pillow's own
  guard (:data:`PIL.Image.MAX_IMAGE_PIXELS`) still applies on top and is reported the same way.

Every image that cannot be used raises :class:`~patchknn.errors.ImageError` naming the file and the
reason; layout problems of dataset folders raise :class:`~patchknn.errors.DatasetError`; bad options
raise :class:`~patchknn.errors.ConfigError`.

The package is split by concept: :mod:`~patchknn.data.decode` (files and arrays -> RGB arrays),
:mod:`~patchknn.data.resize` (to the model's input; masks), :mod:`~patchknn.data.datasets` (folders and
the MVTec layout) and :mod:`~patchknn.data.batches` (streaming batches); everything public is
importable from ``patchknn.data``.
"""

from typing import TYPE_CHECKING

from patchknn.data.datasets import (
    MVTecCategory,
    Sample,
    as_sources,
    expand_inputs,
    is_image_name,
    list_categories,
    list_images,
    source_name,
)
from patchknn.data.decode import (
    DECODE_FORMATS,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    check_pixels,
    decode_formats,
    load_image,
    pil_errors,
    read_image_size,
)
from patchknn.data.resize import load_mask, load_resized, resize_image, resize_mask

if TYPE_CHECKING:  # for type checkers; at run time see __getattr__ below
    from patchknn.data.batches import (
        Batch,
        BatchIterator,
        ImageDataset,
        ImageFailure,
        ImageRecord,
        auto_workers,
        iter_batches,
    )

# The streaming batches use torch: imported on first use (PEP 562), so decoding and the dataset
# layouts work without torch (the exported-model runtime, the CLI's start).
_BATCHES = ("Batch", "BatchIterator", "ImageDataset", "ImageFailure", "ImageRecord", "auto_workers",
            "iter_batches")


def __getattr__(name: str) -> object:
    if name in _BATCHES:
        from patchknn.data import batches

        return getattr(batches, name)
    raise AttributeError(f"module 'patchknn.data' has no attribute {name!r}")

__all__ = [
    "DECODE_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "as_sources",
    "auto_workers",
    "check_pixels",
    "decode_formats",
    "pil_errors",
    "IMAGE_EXTENSIONS",
    "Batch",
    "BatchIterator",
    "ImageDataset",
    "ImageFailure",
    "ImageRecord",
    "MVTecCategory",
    "Sample",
    "expand_inputs",
    "is_image_name",
    "iter_batches",
    "list_categories",
    "list_images",
    "load_image",
    "load_mask",
    "load_resized",
    "read_image_size",
    "resize_image",
    "resize_mask",
    "source_name",
]
