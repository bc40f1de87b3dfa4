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
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from patchknn.errors import ConfigError, DatasetError, ImageError

__all__ = [
    "DECODE_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "Batch",
    "BatchIterator",
    "ImageDataset",
    "ImageFailure",
    "ImageRecord",
    "MVTecCategory",
    "Sample",
    "expand_inputs",
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

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm"}
)
"""File suffixes (lower case, with the dot) treated as images when listing folders; compared
case-insensitively (``A.PNG`` is an image). One or more for every format in :data:`DECODE_FORMATS`,
so a folder yields every file that :func:`load_image` would read when named explicitly."""

DEFAULT_MAX_PIXELS: int = 64_000_000
"""Default limit on ``height * width`` of one image (64 megapixels), checked before decoding."""

DECODE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
"""Pillow format names that :func:`load_image` will decode from files and bytes. Others (EPS, which
runs Ghostscript, PSD, ...) are refused as "not a supported image format". Camera JPEGs in the MPO
variant are opened by the JPEG plugin. Pillow images passed in directly are used whatever their format."""

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray
"""Anything :func:`load_image` accepts."""

SizeArg = int | tuple[int, int]
"""An output size: ``S`` for ``S x S`` or ``(height, width)``."""

_EXIF_ORIENTATION = 0x0112

# Pillow raises all sorts of exception types on malformed data (OSError, ValueError, SyntaxError,
# struct.error, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError, ...), so the code
# that calls into Pillow with untrusted data catches Exception and reports it as an ImageError.


# -------------------------------------------------------------------------------------------------
# options
# -------------------------------------------------------------------------------------------------
def _check_max_pixels(max_pixels: int | None) -> int | None:
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int | np.integer) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    return int(max_pixels)


def _as_hw(size: SizeArg, what: str = "size") -> tuple[int, int]:
    """``S`` -> ``(S, S)``; ``(H, W)`` -> ``(H, W)``; both must be positive integers."""
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        hw: tuple[Any, ...] = (int(size), int(size))
    elif isinstance(size, tuple | list) and len(size) == 2:
        hw = tuple(size)
    else:
        raise ConfigError(f"{what} must be an int or a (height, width) pair, got {size!r}")
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1 for v in hw):
        raise ConfigError(f"{what} must contain positive integers, got {size!r}")
    return int(hw[0]), int(hw[1])


def _check_pixels(name: str | None, height: int, width: int, max_pixels: int | None) -> None:
    if height <= 0 or width <= 0:
        raise ImageError(name, f"image is empty ({width}x{height} pixels)")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageError(
            name,
            f"image is {width}x{height} = {height * width:,} pixels, over the limit of {max_pixels:,} "
            "(max_pixels; a guard against decompression bombs)",
        )


# -------------------------------------------------------------------------------------------------
# decoding
# -------------------------------------------------------------------------------------------------
_formats_cache: list[tuple[str, ...]] = []


def _decode_formats() -> tuple[str, ...]:
    """DECODE_FORMATS that this Pillow build can open (Image.open fails oddly on unknown names)."""
    if not _formats_cache:
        Image.init()
        _formats_cache.append(tuple(f for f in DECODE_FORMATS if f in Image.OPEN))
    return _formats_cache[0]


@contextmanager
def _pil_errors(name: str | None, max_pixels: int | None = None) -> Iterator[None]:
    """Turn anything Pillow raises (and its decompression-bomb warning) into :class:`ImageError`.

    With a ``max_pixels`` limit of ours (checked from the header before decoding), Pillow's warning
    (over :data:`PIL.Image.MAX_IMAGE_PIXELS`) is not needed and ignored, so a limit above Pillow's
    is honoured; Pillow's error (over twice that) is raised while opening, before our check, and is
    reported as our limit when the image is over it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error" if max_pixels is None else "ignore", Image.DecompressionBombWarning)
            # Pillow's UserWarnings here are about damaged metadata (e.g. "Corrupt EXIF data"), which
            # is ignored by design; the image is either returned or reported as an ImageError.
            warnings.simplefilter("ignore", UserWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(name, _bomb_reason(exc, max_pixels)) from None
    except UnidentifiedImageError:
        raise ImageError(
            name,
            "not a supported image format, or a corrupt header "
            f"(readable formats: {', '.join(_decode_formats())})",
        ) from None
    except MemoryError:
        raise ImageError(name, "not enough memory to decode the image") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's exception types on bad data are open-ended
        detail = str(exc) or type(exc).__name__
        raise ImageError(name, f"corrupt or truncated image data ({type(exc).__name__}: {detail})") from None


def _bomb_reason(exc: Exception, max_pixels: int | None) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = int(found.group(1)) if found else None
    if max_pixels is not None and pixels is not None and pixels > max_pixels:
        return (
            f"image is {pixels:,} pixels, over the limit of {max_pixels:,} "
            "(max_pixels; a guard against decompression bombs)"
        )
    lift = "" if max_pixels is None else "; max_pixels does not lift it, PIL.Image.MAX_IMAGE_PIXELS does"
    return f"refused by Pillow's decompression-bomb guard: {str(exc).rstrip('.')}{lift}"


def _full_load(img: Image.Image) -> None:
    """Decode every pixel; truncated data is an error even if LOAD_TRUNCATED_IMAGES was switched on."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone relaxed Pillow's global; restore the strict behaviour for this decode only.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True
    else:
        img.load()


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1
    except Exception:  # noqa: BLE001 - unreadable EXIF is ignored, not fatal
        return 1


def _apply_orientation(img: Image.Image) -> Image.Image:
    if _orientation(img) == 1:
        return img
    try:
        rotated = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - corrupt EXIF: keep the pixels as stored
        return img
    return img if rotated is None else rotated


def _pil_to_array(img: Image.Image, name: str | None) -> np.ndarray:
    """Pixels of a decoded Pillow image as an array that :func:`_array_to_rgb` understands."""
    mode = img.mode
    if mode in ("1", "L", "RGB", "F"):
        return np.asarray(img)
    if mode.startswith("I;16"):
        arr = np.asarray(img)
        if arr.dtype.kind != "u" or arr.dtype.itemsize != 2:
            raise ImageError(name, f"unsupported image mode {mode!r}")
        return arr.astype(np.uint16, copy=False)
    if mode == "I":
        return np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
    if mode == "LA":
        return np.asarray(img)[..., 0]
    if mode == "La":
        return np.asarray(img.convert("LA"))[..., 0]
    if mode in ("RGBA", "RGBX"):
        return np.asarray(img)[..., :3]
    if mode in ("RGBa", "P", "PA"):
        return np.asarray(img.convert("RGBA"))[..., :3]
    if mode in ("CMYK", "YCbCr", "HSV", "LAB"):
        return np.asarray(img.convert("RGB"))
    raise ImageError(name, f"unsupported image mode {mode!r}")


def _array_to_rgb(arr: np.ndarray, name: str | None, max_pixels: int | None) -> np.ndarray:
    """Apply the array rules (shape, dtype, value range) and return a fresh ``(H, W, 3) uint8`` array."""
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = arr[..., :1] if arr.shape[2] == 1 else arr[..., :3]
    elif arr.ndim != 2:
        raise ImageError(
            name,
            f"array of shape {arr.shape} is not an image; expected (H, W), (H, W, 1), (H, W, 3) or "
            "(H, W, 4) with channels last",
        )
    _check_pixels(name, arr.shape[0], arr.shape[1], max_pixels)

    dtype = arr.dtype
    fresh = True  # False while `out` may still share memory with the caller's array
    if dtype == np.uint8:
        out, fresh = arr, False
    elif dtype.kind == "u" and dtype.itemsize == 2:
        out = (arr >> 8).astype(np.uint8)
    elif dtype == np.bool_:
        out = arr.astype(np.uint8) * np.uint8(255)
    elif dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(name, "image contains NaN or infinite values")
        work = arr if dtype.itemsize >= 8 else arr.astype(np.float32)
        out = np.rint(np.clip(work, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ImageError(name, f"unsupported pixel dtype {dtype}; use uint8, uint16, bool or float in [0, 1]")

    if out.ndim == 2:
        out = out[..., None]
    if out.shape[2] == 1:
        return np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out) if fresh else np.array(out, order="C", copy=True)


def _decoded(img: Image.Image, name: str | None, max_pixels: int | None) -> Image.Image:
    """Bomb check from the header, full decode, orientation (inside :func:`_pil_errors`)."""
    width, height = img.size
    _check_pixels(name, height, width, max_pixels)
    _full_load(img)
    return _apply_orientation(img)


def _decode_pil(img: Image.Image, name: str | None, max_pixels: int | None) -> np.ndarray:
    """Bomb check from the header, full decode, orientation, mode conversion."""
    with _pil_errors(name, max_pixels):
        arr = _pil_to_array(_decoded(img, name, max_pixels), name)
    return _array_to_rgb(arr, name, max_pixels)


def _stat_file(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as exc:
        raise ImageError(path, f"cannot access the file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(path, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(path, "is not a regular file")
    if st.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    return st


@contextmanager
def _open_encoded(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    max_pixels: int | None = None,
) -> Iterator[tuple[Image.Image, str]]:
    """Open a file or an encoded buffer with Pillow (header only), restricted to DECODE_FORMATS."""
    if isinstance(source, bytes | bytearray | memoryview):
        name = "<bytes>"
        data = bytes(source)
        if not data:
            raise ImageError(name, "empty data (0 bytes)")
        with _pil_errors(name, max_pixels):
            img = Image.open(io.BytesIO(data), formats=_decode_formats())
        with img:
            yield img, name
        return
    path = Path(source)
    name = str(path)
    _stat_file(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ImageError(path, f"cannot open the file ({exc.strerror or exc})") from None
    with fh:
        with _pil_errors(name, max_pixels):
            img = Image.open(fh, formats=_decode_formats())
        with img:
            yield img, name


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Load an image as an ``(H, W, 3) uint8`` RGB array, applying the module's rules.

    Args:
        source: a file path (``str`` or :class:`~pathlib.Path`), encoded image bytes, a Pillow image,
            or a numpy array of shape ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` with
            dtype ``uint8``, ``uint16``, ``bool`` or float (in [0, 1]).
        max_pixels: largest ``height * width`` accepted, checked from the header before decoding;
            ``None`` lifts this limit (Pillow's own :data:`PIL.Image.MAX_IMAGE_PIXELS` still applies).

    Returns:
        A new C-contiguous ``(H, W, 3)`` ``uint8`` array (never a view of the caller's array).

    Raises:
        ImageError: the source cannot be used (missing, a directory, empty, not an image, truncated,
            corrupt, unsupported mode/dtype/shape, NaN, too many pixels, ...). The message names the
            file (or ``<bytes>``/``<array>``/``<PIL image>``) and the reason.
        ConfigError: ``max_pixels`` is not a positive integer or ``None``.

    Example:
        >>> import numpy as np
        >>> load_image(np.zeros((4, 6), dtype=np.uint16)).shape
        (4, 6, 3)
    """
    max_pixels = _check_max_pixels(max_pixels)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, "<array>", max_pixels)
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        return _decode_pil(source, str(name), max_pixels)
    if isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):
        with _open_encoded(source, max_pixels) as (img, name):
            return _decode_pil(img, name, max_pixels)
    raise ImageError(
        None,
        f"cannot load an image from a {type(source).__name__}; "
        "pass a path, bytes, a PIL image or a numpy array",
    )


def read_image_size(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """``(height, width)`` that :func:`load_image` would return for a file, read from its header only.

    The EXIF orientation is taken into account (a 90-degree rotation swaps the two); the pixels are
    not decoded, so a file with a valid header but corrupt data is not detected here (nor the rare
    PNG whose EXIF chunk follows its pixel data).

    Example:
        >>> read_image_size("train/good/000.png")  # doctest: +SKIP
        (900, 900)
    """
    max_pixels = _check_max_pixels(max_pixels)
    with _open_encoded(path, max_pixels) as (img, name), _pil_errors(name, max_pixels):
        width, height = img.size
        _check_pixels(name, height, width, max_pixels)
        # A PNG's eXIf chunk may follow the pixel data; reading it would mean decoding everything,
        # so only an eXIf chunk placed before the data (where writers normally put it) is seen.
        exif_in_header = img.format != "PNG" or "exif" in img.info
        if exif_in_header and _orientation(img) in (5, 6, 7, 8):
            width, height = height, width
    return height, width


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
    height, width = _as_hw(size)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ImageError(None, f"resize_image expects an (H, W, 3) uint8 array, got {desc}")
    _check_pixels(None, image.shape[0], image.shape[1], None)
    if image.shape[:2] == (height, width):
        return np.array(image, order="C", copy=True)
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR)).copy()


def load_resized(
    source: ImageSource, size: SizeArg, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """``resize_image(load_image(source), size)`` and the original ``(height, width)``, in one step.

    An 8-bit RGB file (the usual case) is resized by Pillow straight after decoding, without the
    intermediate full-resolution arrays (about 25 % less time for a 900x900 PNG); the pixels are
    the same as the two-step path, which every other input takes.

    Example:
        >>> import numpy as np
        >>> image, original = load_resized(np.zeros((90, 60, 3), np.uint8), 32)
        >>> image.shape, original
        ((32, 32, 3), (90, 60))
    """
    height, width = _as_hw(size)
    if isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):
        max_pixels = _check_max_pixels(max_pixels)
        with _open_encoded(source, max_pixels) as (img, name):
            with _pil_errors(name, max_pixels):
                img = _decoded(img, name, max_pixels)
                if img.mode == "RGB":
                    original = (int(img.height), int(img.width))
                    if original != (height, width):
                        img = img.resize((width, height), Image.Resampling.BILINEAR)
                    return np.array(img, dtype=np.uint8, order="C"), original
                arr = _pil_to_array(img, name)
            image = _array_to_rgb(arr, name, max_pixels)
    else:
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
    height, width = _as_hw(size)
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
    return _pil_to_array(img, name).max(axis=2) > 0


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
    max_pixels = _check_max_pixels(max_pixels)
    with _open_encoded(path, max_pixels) as (img, name), _pil_errors(name, max_pixels):
        width, height = img.size
        _check_pixels(name, height, width, max_pixels)
        _full_load(img)
        img = _apply_orientation(img)
        mask = _mask_array(img, name)
    if expected_size is not None:
        expected = _as_hw(expected_size, "expected_size")
        if mask.shape != expected:
            of = f"its image {image_path}" if image_path is not None else "the expected size"
            raise DatasetError(
                f"mask {path} has size (H, W) = {mask.shape}, which does not match {of} (H, W) = {expected}"
            )
    return np.ascontiguousarray(mask)


# -------------------------------------------------------------------------------------------------
# folders
# -------------------------------------------------------------------------------------------------
def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (hidden files and other suffixes ignored), sorted."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DatasetError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return sorted(folder / e.name for e in entries if _is_image_name(e.name) and e.is_file())


def list_images(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Image files in a folder of user data, sorted by path.

    Only files whose suffix is in :data:`IMAGE_EXTENSIONS` count; hidden files and folders (names
    starting with ``.``, e.g. ``.DS_Store``, ``._x.png``) are skipped.

    Args:
        folder: the folder.
        recursive: also look in subfolders (results sorted by path relative to ``folder``).

    Raises:
        DatasetError: the folder does not exist, is not a folder, or holds no image.

    Example:
        >>> list_images("data/good")  # doctest: +SKIP
        [PosixPath('data/good/000.png'), PosixPath('data/good/001.png')]
    """
    root = Path(folder)
    if not root.exists():
        raise DatasetError(f"folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"not a folder: {root}")
    if not recursive:
        found = _images_in(root)
    else:
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(Path(dirpath) / f for f in filenames if _is_image_name(f))
        found.sort(key=lambda p: p.relative_to(root).parts)
    if not found:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        where = " (searched recursively)" if recursive else ""
        raise DatasetError(f"no images ({exts}) in folder {root}{where}")
    return found


def expand_inputs(items: Iterable[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Expand command-line inputs (files and folders, mixed) into a list of image files.

    Files are kept as given, in order, whatever their suffix (a file named explicitly is meant to be
    read; :func:`load_image` reports it if it is not an image). Folders are replaced by
    :func:`list_images` of the folder.

    Raises:
        DatasetError: no inputs, a path that does not exist, or a folder without images.

    Example:
        >>> expand_inputs(["a.png", "more_images/"])  # doctest: +SKIP
        [PosixPath('a.png'), PosixPath('more_images/000.png'), PosixPath('more_images/001.png')]
    """
    if isinstance(items, str | os.PathLike):
        items = [items]
    out: list[Path] = []
    seen_any = False
    for item in items:
        seen_any = True
        path = Path(item)
        if path.is_dir():
            out.extend(list_images(path, recursive=recursive))
        elif path.exists():
            out.append(path)
        else:
            raise DatasetError(f"input not found: {path}")
    if not seen_any:
        raise DatasetError("no inputs given")
    return out


# -------------------------------------------------------------------------------------------------
# MVTec layout
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One test image of an MVTec-layout category.

    Attributes:
        path: the image file.
        label: 0 = good (defect-free), 1 = defective.
        defect: the defect folder name (``"good"`` for good images).
        mask_path: the ground-truth mask of a defective image; ``None`` for good ones.
    """

    path: Path
    label: int
    defect: str
    mask_path: Path | None


GOOD = "good"


def list_categories(root: str | os.PathLike[str]) -> list[str]:
    """Names of the subfolders of ``root`` that look like MVTec categories (they have ``train/good``).

    Raises:
        DatasetError: ``root`` does not exist or is not a folder.

    Example:
        >>> list_categories("/data/mvtec")  # doctest: +SKIP
        ['bottle', 'cable', 'capsule']
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"dataset root not found or not a folder: {base}")
    names = (e.name for e in os.scandir(base) if not e.name.startswith("."))
    return sorted(n for n in names if (base / n / "train" / GOOD).is_dir())


class MVTecCategory:
    """One category of a dataset in the MVTec AD layout.

    Layout (any category name, any defect folder names)::

        <root>/<category>/train/good/*.png
        <root>/<category>/test/good/*.png
        <root>/<category>/test/<defect>/*.png
        <root>/<category>/ground_truth/<defect>/<stem>_mask.png

    Files that are not images (``.DS_Store``, ``readme.txt``, ...) and hidden files are ignored.
    Nothing is read at construction; :meth:`validate` checks the whole layout up front.

    Example:
        >>> cat = MVTecCategory("/data/mvtec", "bottle")  # doctest: +SKIP
        >>> cat.validate(); len(cat.train_paths()), len(cat.test_samples())  # doctest: +SKIP
        (209, 83)
    """

    def __init__(self, root: str | os.PathLike[str], category: str) -> None:
        self.root = Path(root)
        self.category = str(category)

    def __repr__(self) -> str:
        return f"MVTecCategory(root={str(self.root)!r}, category={self.category!r})"

    @property
    def path(self) -> Path:
        """The category folder, ``<root>/<category>``."""
        return self.root / self.category

    @property
    def train_dir(self) -> Path:
        """``<category>/train/good``, the defect-free training images."""
        return self.path / "train" / GOOD

    @property
    def test_dir(self) -> Path:
        """``<category>/test``, one subfolder per defect type plus ``good``."""
        return self.path / "test"

    @property
    def ground_truth_dir(self) -> Path:
        """``<category>/ground_truth``, one subfolder of masks per defect type."""
        return self.path / "ground_truth"

    def _check_category(self) -> None:
        if self.path.is_dir():
            return
        if not self.root.is_dir():
            raise DatasetError(f"dataset root not found or not a folder: {self.root}")
        available = list_categories(self.root)
        listed = ", ".join(available) if available else "none (a category folder contains train/good/)"
        raise DatasetError(
            f"category {self.category!r} not found under {self.root}; available categories: {listed}"
        )

    def train_paths(self) -> list[Path]:
        """The defect-free training images, ``train/good/*``, sorted.

        Raises:
            DatasetError: the category or ``train/good`` is missing, or holds no image.
        """
        self._check_category()
        if not self.train_dir.is_dir():
            raise DatasetError(f"training folder not found: {self.train_dir} (expected MVTec layout)")
        paths = _images_in(self.train_dir)
        if not paths:
            raise DatasetError(f"no training images in {self.train_dir}")
        return paths

    def defects(self) -> list[str]:
        """Names of the defect folders under ``test/`` (every subfolder except ``good``), sorted."""
        return [d for d in self._test_folders() if d != GOOD]

    def _test_folders(self) -> list[str]:
        self._check_category()
        if not self.test_dir.is_dir():
            raise DatasetError(f"test folder not found: {self.test_dir} (expected MVTec layout)")
        return sorted(e.name for e in os.scandir(self.test_dir) if e.is_dir() and not e.name.startswith("."))

    def mask_path_for(self, image: Path, defect: str) -> Path:
        """Where the mask of a defective test image is expected: ``ground_truth/<defect>/<stem>_mask.png``.

        If that file is absent but a ``<stem>_mask`` file with another image suffix exists, that one
        is returned; otherwise the expected ``.png`` path (which does not exist) is.
        """
        folder = self.ground_truth_dir / defect
        expected = folder / f"{image.stem}_mask.png"
        if expected.is_file() or not folder.is_dir():
            return expected
        for ext in sorted(IMAGE_EXTENSIONS):
            for candidate in (folder / f"{image.stem}_mask{ext}", folder / f"{image.stem}_mask{ext.upper()}"):
                if candidate.is_file():
                    return candidate
        return expected

    def _collect_test(self) -> tuple[list[Sample], list[str]]:
        samples: list[Sample] = []
        missing: list[str] = []
        for defect in self._test_folders():
            for image in _images_in(self.test_dir / defect):
                if defect == GOOD:
                    samples.append(Sample(image, 0, defect, None))
                    continue
                mask = self.mask_path_for(image, defect)
                if not mask.is_file():
                    missing.append(f"test image {image} has no mask; expected {mask}")
                samples.append(Sample(image, 1, defect, mask))
        return samples, missing

    def test_samples(self) -> list[Sample]:
        """All test images (``test/<defect>/*``), sorted by defect folder then file name.

        Good images have label 0 and ``mask_path=None``; the others label 1 and their mask.

        Raises:
            DatasetError: ``test`` is missing or holds no image, or a defective image has no mask.
        """
        samples, missing = self._collect_test()
        if missing:
            raise DatasetError(_join_problems(missing))
        if not samples:
            raise DatasetError(f"no test images in the subfolders of {self.test_dir}")
        return samples

    def validate(self, check_mask_sizes: bool = True, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        """Check the whole layout up front; raise one :class:`DatasetError` describing the problems.

        Checks: the category exists (otherwise lists the available ones), ``train/good`` exists and
        holds images, ``test`` exists and holds images, every defective test image has its mask, and
        (``check_mask_sizes``, headers only) every mask has the size of its image. ``max_pixels``
        is the limit of :func:`read_image_size` for those headers (use the one images are loaded with).

        Raises:
            DatasetError: the layout is not usable.
            ImageError: ``check_mask_sizes`` and an image or mask header cannot be read.
        """
        self.train_paths()
        samples, problems = self._collect_test()
        if not samples:
            raise DatasetError(f"no test images in the subfolders of {self.test_dir}")
        if check_mask_sizes and not problems:
            for s in samples:
                if s.mask_path is None:
                    continue
                image_hw = read_image_size(s.path, max_pixels=max_pixels)
                mask_hw = read_image_size(s.mask_path, max_pixels=max_pixels)
                if image_hw != mask_hw:
                    problems.append(
                        f"mask {s.mask_path} has size (H, W) = {mask_hw} "
                        f"but its image {s.path} has {image_hw}"
                    )
        if problems:
            raise DatasetError(_join_problems(problems))


def _join_problems(problems: list[str], limit: int = 10) -> str:
    if len(problems) == 1:
        return problems[0]
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} problems:\n  {shown}{more}"


# -------------------------------------------------------------------------------------------------
# streaming batches
# -------------------------------------------------------------------------------------------------
def source_name(source: Any, index: int | None = None) -> str:
    """A short printable name for a source: the path for files, ``<bytes #i>``/``<array #i>`` otherwise.

    Example:
        >>> source_name("a/b.png"), source_name(b"...", 3)
        ('a/b.png', '<bytes #3>')
    """
    suffix = "" if index is None else f" #{index}"
    if isinstance(source, str | os.PathLike):
        return str(Path(source))
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<bytes{suffix}>"
    if isinstance(source, np.ndarray):
        return f"<array{suffix}>"
    if isinstance(source, Image.Image):
        return str(getattr(source, "filename", "") or f"<PIL image{suffix}>")
    return f"<{type(source).__name__}{suffix}>"


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
        self.image_size = _as_hw(image_size, "image_size")
        self.max_pixels = _check_max_pixels(max_pixels)

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
