"""Resizing images and masks to the model's input, and reading masks."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from patchknn.data.decode import (
    DEFAULT_MAX_PIXELS,
    JPEG_DRAFT_RATIO,
    ImageSource,
    SizeArg,
    apply_draft,
    apply_orientation,
    array_to_rgb,
    as_hw,
    check_max_pixels,
    check_pixels,
    decoded,
    full_load,
    is_transposed,
    load_image,
    open_encoded,
    pil_errors,
    pil_to_array,
)
from patchknn.errors import DatasetError, ImageError


# -------------------------------------------------------------------------------------------------
# resizing
# -------------------------------------------------------------------------------------------------
def resize_image(image: np.ndarray, size: SizeArg) -> np.ndarray:
    """Resize an ``(H, W, 3) uint8`` image with Pillow's bilinear filter (antialiased when shrinking).

    This is the paper's preprocessing step (every image to 224x224 before the backbone).

    Args:
        image: ``(H, W, 3) uint8`` RGB array, as returned by :func:`load_image`.
        size: ``S`` for ``S x S`` or ``(height, width)``.

    Returns:
        A new ``(height, width, 3) uint8`` array.

    Example:
        >>> import numpy as np
        >>> resize_image(np.zeros((900, 600, 3), np.uint8), 224).shape
        (224, 224, 3)
    """
    height, width = as_hw(size)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ImageError(None, f"resize_image expects an (H, W, 3) uint8 array, got {desc}")
    check_pixels(None, image.shape[0], image.shape[1], None)
    if image.shape[:2] == (height, width):
        return np.array(image, order="C", copy=True)
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR)).copy()


def load_resized(
    source: ImageSource,
    size: SizeArg,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    jpeg_draft: float | None = JPEG_DRAFT_RATIO,
) -> tuple[np.ndarray, tuple[int, int]]:
    """``resize_image(load_image(source), size)`` and the original ``(height, width)``, in one step.

    An 8-bit RGB file (the usual case) is resized by Pillow straight after decoding, without the
    intermediate full-resolution arrays (about 25 % less time for a 900x900 PNG); the pixels are
    the same as the two-step path, which every other input takes.

    A JPEG file at least ``2 x jpeg_draft`` times larger than ``size`` in both directions is decoded
    at 1/2, 1/4 or 1/8 of its size by Pillow's DCT scaling (:func:`~patchknn.data.decode.apply_draft`),
    never below ``jpeg_draft x size``, and then resized as usual: far less decoding for large
    camera images, pixels within a few grey levels of the full decode's (measured in docs/speed.md).
    ``jpeg_draft=None`` (or ``0``) decodes every file at full size. The original size returned is
    always the file's own.

    Example:
        >>> import numpy as np
        >>> image, original = load_resized(np.zeros((90, 60, 3), np.uint8), 32)
        >>> image.shape, original
        ((32, 32, 3), (90, 60))
    """
    height, width = as_hw(size)
    if isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):
        max_pixels = check_max_pixels(max_pixels)
        with open_encoded(source, max_pixels) as (img, name):
            with pil_errors(name, max_pixels):
                stored_w, stored_h = img.size
                check_pixels(name, stored_h, stored_w, max_pixels)  # the file's size, before any draft
                apply_draft(img, (height, width), jpeg_draft)
                opened, img = img, decoded(img, name, max_pixels)
                original = (stored_w, stored_h) if is_transposed(opened) else (stored_h, stored_w)
                if img.mode == "RGB":
                    if img.size != (width, height):
                        img = img.resize((width, height), Image.Resampling.BILINEAR)
                    return np.array(img, dtype=np.uint8, order="C"), original
                arr = pil_to_array(img, name)
            image = array_to_rgb(arr, name, max_pixels)
            del arr, img, opened  # as load_image: only the RGB array is left while resizing
        return resize_image(image, (height, width)), original
    image = load_image(source, max_pixels=max_pixels)
    return resize_image(image, (height, width)), (int(image.shape[0]), int(image.shape[1]))


def resize_mask(mask: np.ndarray, size: SizeArg) -> np.ndarray:
    """Resize a boolean ``(H, W)`` mask with nearest-neighbour sampling.

    Args:
        mask: ``(H, W)`` array; nonzero / ``True`` = defect.
        size: ``S`` for ``S x S`` or ``(height, width)``.

    Returns:
        A ``(height, width)`` ``bool`` array.

    Example:
        >>> import numpy as np
        >>> resize_mask(np.eye(4, dtype=bool), (2, 2)).tolist()
        [[True, False], [False, True]]
    """
    height, width = as_hw(size)
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ImageError(None, f"resize_mask expects a non-empty (H, W) array, got shape {mask.shape}")
    binary = mask > 0 if mask.dtype != np.bool_ else mask
    if binary.shape == (height, width):
        return binary.copy()
    pil = Image.fromarray(binary.astype(np.uint8) * 255)
    return np.asarray(pil.resize((width, height), Image.Resampling.NEAREST)) > 127


# -------------------------------------------------------------------------------------------------
# masks
# -------------------------------------------------------------------------------------------------
def _mask_array(img: Image.Image, name: str) -> np.ndarray:
    """Defect = any colour channel > 0 (alpha ignored); raw values for 16-bit / float masks."""
    mode = img.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(img) > 0
    if mode in ("LA", "La"):
        return np.asarray(img)[..., 0] > 0
    return pil_to_array(img, name).max(axis=2) > 0


def load_mask(
    path: str | os.PathLike[str],
    *,
    expected_size: tuple[int, int] | None = None,
    image_path: str | os.PathLike[str] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Load a ground-truth mask as a ``(H, W) bool`` array (pixel value > 0 = defect).

    Args:
        path: the mask file (MVTec masks are 0/255 grayscale PNGs; any mode is accepted: a pixel is
            a defect when any colour channel, alpha ignored, is above zero).
        expected_size: ``(height, width)`` of the image the mask belongs to; a different mask size is
            a :class:`DatasetError`.
        image_path: that image's file, only used to name it in the error message.
        max_pixels: as for :func:`load_image`.

    Raises:
        ImageError: the mask file cannot be read.
        DatasetError: the mask's size differs from ``expected_size``.

    Example:
        >>> load_mask("ground_truth/broken_large/000_mask.png", expected_size=(900, 900))  # doctest: +SKIP
        array([[False, False, ...]])
    """
    max_pixels = check_max_pixels(max_pixels)
    with open_encoded(path, max_pixels) as (img, name), pil_errors(name, max_pixels):
        width, height = img.size
        check_pixels(name, height, width, max_pixels)
        full_load(img)
        img = apply_orientation(img)
        mask = _mask_array(img, name)
    if expected_size is not None:
        expected = as_hw(expected_size, "expected_size")
        if mask.shape != expected:
            of = f"its image {image_path}" if image_path is not None else "the expected size"
            raise DatasetError(
                f"mask {path} has size (H, W) = {mask.shape}, which does not match {of} (H, W) = {expected}"
            )
    return np.ascontiguousarray(mask)
