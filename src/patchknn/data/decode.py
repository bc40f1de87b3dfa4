"""Decoding: anything a user hands us -> an ``(H, W, 3)`` uint8 RGB array, with the rules and checks
of :mod:`patchknn.data` (EXIF, alpha, 16-bit, bombs, truncation), and image sizes from headers."""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from patchknn.errors import ConfigError, ImageError

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
def check_max_pixels(max_pixels: int | None) -> int | None:
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int | np.integer) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    return int(max_pixels)


def as_hw(size: SizeArg, what: str = "size") -> tuple[int, int]:
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


def check_pixels(name: str | None, height: int, width: int, max_pixels: int | None) -> None:
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


def decode_formats() -> tuple[str, ...]:
    """DECODE_FORMATS that this Pillow build can open (Image.open fails oddly on unknown names)."""
    if not _formats_cache:
        Image.init()
        _formats_cache.append(tuple(f for f in DECODE_FORMATS if f in Image.OPEN))
    return _formats_cache[0]


@contextmanager
def pil_errors(name: str | None, max_pixels: int | None = None) -> Iterator[None]:
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
            f"(readable formats: {', '.join(decode_formats())})",
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


def full_load(img: Image.Image) -> None:
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


def apply_orientation(img: Image.Image) -> Image.Image:
    if _orientation(img) == 1:
        return img
    try:
        rotated = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - corrupt EXIF: keep the pixels as stored
        return img
    return img if rotated is None else rotated


def pil_to_array(img: Image.Image, name: str | None) -> np.ndarray:
    """Pixels of a decoded Pillow image as an array that :func:`array_to_rgb` understands."""
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


def array_to_rgb(arr: np.ndarray, name: str | None, max_pixels: int | None) -> np.ndarray:
    """Apply the array rules (shape, dtype, value range) and return a fresh ``(H, W, 3) uint8`` array."""
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = arr[..., :1] if arr.shape[2] == 1 else arr[..., :3]
    elif arr.ndim != 2:
        raise ImageError(
            name,
            f"array of shape {arr.shape} is not an image; expected (H, W), (H, W, 1), (H, W, 3) or "
            "(H, W, 4) with channels last",
        )
    check_pixels(name, arr.shape[0], arr.shape[1], max_pixels)

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


def decoded(img: Image.Image, name: str | None, max_pixels: int | None) -> Image.Image:
    """Bomb check from the header, full decode, orientation (inside :func:`pil_errors`)."""
    width, height = img.size
    check_pixels(name, height, width, max_pixels)
    full_load(img)
    return apply_orientation(img)


JPEG_DRAFT_RATIO: float = 2.0
"""Default ``jpeg_draft`` of :func:`~patchknn.data.load_resized`: a JPEG is decoded at 1/2, 1/4 or 1/8
of its size (DCT scaling, :meth:`PIL.Image.Image.draft`) when the reduced image is still at least
this many times the target size in both directions; the resize to the target follows as before.
Measured in docs/speed.md ("JPEG draft decoding"): at 2.0 the model's input differs from the full
decode's by at most a few grey levels (the bilinear resize averages the DCT-scaled pixels much as
it averages the full ones). ``0`` or ``None`` = always decode at full size."""


def is_transposed(img: Image.Image) -> bool:
    """Whether the image's EXIF orientation swaps its width and height (a 90 or 270 degree turn).

    Read it after decoding: a PNG's EXIF may follow its pixel data (Pillow then decodes to find it)."""
    return _orientation(img) in (5, 6, 7, 8)


def apply_draft(img: Image.Image, size: tuple[int, int], ratio: float | None = JPEG_DRAFT_RATIO) -> int:
    """Make an opened, not yet decoded JPEG decode at a reduced size no smaller than ``ratio x size``.

    ``size`` is the ``(height, width)`` the image will be resized to (after its EXIF rotation, which
    is taken into account). Pillow's JPEG decoder then scales the DCT blocks by 1/2, 1/4 or 1/8 (the
    largest factor that keeps both sides at or above ``ratio x size``), which decodes several times
    fewer pixels. Anything that is not a JPEG, a ``ratio`` of ``0``/``None``, or an image smaller
    than twice ``ratio x size`` is left alone. Returns the scale factor applied (1 = none).

    Example:
        >>> from PIL import Image
        >>> import io
        >>> buf = io.BytesIO(); Image.new("RGB", (2000, 1000)).save(buf, "JPEG")
        >>> img = Image.open(buf); apply_draft(img, (224, 224)), img.size
        (2, (1000, 500))
    """
    if not ratio or ratio <= 0 or img.format != "JPEG":
        return 1
    need_h, need_w = size
    if is_transposed(img):  # a JPEG's EXIF is in its header; the stored image is the turned one
        need_h, need_w = need_w, need_h
    need = (max(1, int(np.ceil(need_w * ratio))), max(1, int(np.ceil(need_h * ratio))))
    stored_w, stored_h = img.size
    if stored_w < 2 * need[0] or stored_h < 2 * need[1]:
        return 1
    before = img.size[0]
    try:
        img.draft(img.mode, need)
    except Exception:  # noqa: BLE001 - a JPEG Pillow cannot scale is decoded at full size
        return 1
    return max(1, round(before / img.size[0]))


def _decode_pil(img: Image.Image, name: str | None, max_pixels: int | None) -> np.ndarray:
    """Bomb check from the header, full decode, orientation, mode conversion."""
    with pil_errors(name, max_pixels):
        arr = pil_to_array(decoded(img, name, max_pixels), name)
    return array_to_rgb(arr, name, max_pixels)


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
def open_encoded(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    max_pixels: int | None = None,
) -> Iterator[tuple[Image.Image, str]]:
    """Open a file or an encoded buffer with Pillow (header only), restricted to DECODE_FORMATS."""
    if isinstance(source, bytes | bytearray | memoryview):
        name = "<bytes>"
        data = bytes(source)
        if not data:
            raise ImageError(name, "empty data (0 bytes)")
        with pil_errors(name, max_pixels):
            img = Image.open(io.BytesIO(data), formats=decode_formats())
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
        with pil_errors(name, max_pixels):
            img = Image.open(fh, formats=decode_formats())
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
    max_pixels = check_max_pixels(max_pixels)
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, "<array>", max_pixels)
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        return _decode_pil(source, str(name), max_pixels)
    if isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):
        with open_encoded(source, max_pixels) as (img, name):
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
    max_pixels = check_max_pixels(max_pixels)
    with open_encoded(path, max_pixels) as (img, name), pil_errors(name, max_pixels):
        width, height = img.size
        check_pixels(name, height, width, max_pixels)
        # A PNG's eXIf chunk may follow the pixel data; reading it would mean decoding everything,
        # so only an eXIf chunk placed before the data (where writers normally put it) is seen.
        exif_in_header = img.format != "PNG" or "exif" in img.info
        if exif_in_header and _orientation(img) in (5, 6, 7, 8):
            width, height = height, width
    return height, width
