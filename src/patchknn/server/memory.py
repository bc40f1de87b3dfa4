"""The decode memory budget: what decoding an upload really costs, read from its header, and a byte budget.

An upload is small (a 36-megapixel PNG of one colour compresses to 140 kB), but decoding it takes
``width x height x bytes per pixel`` of memory, and more than once: Pillow stores RGB as 4 bytes a
pixel, ``numpy.asarray`` of a Pillow image builds its bytes in pieces and then joins them (two
copies for a moment), the alpha channel is dropped with another copy, and so on. The server
therefore does not trust a formula of ``3 bytes a pixel``: :func:`decode_cost` reads the width,
height, mode and format from the header (no pixel is decoded) and multiplies the pixel count by the
peak bytes per pixel **measured** for :func:`prepare_image` (the server's decode: exactly the pixels
``PatchKNN.predict`` gets) on that mode, rounded up, plus a fixed allowance.

Measured peaks (Linux, Pillow 13, 36-megapixel images, peak RSS over the resident size before the
decode, one decode in a fresh process), bytes per pixel:

=============================  =======  ==========================================================
mode (format)                  peak     where it goes
=============================  =======  ==========================================================
RGB (PNG 8/16-bit, JPEG, ...)  4.1      Pillow's 4-byte pixels; resized in Pillow (``load_resized``)
L, 1 (grayscale, bilevel)      7.1      1 + array + 3-channel copy + 4-byte Pillow image to resize
I;16 (16-bit grayscale)        8.1
LA                             10.0
I (32-bit integer)             12.0
RGBA, RGBX                     12.1     4 + 2 x 4 while ``asarray`` joins its pieces
P (palette)                    13.1     converted to RGBA first
CMYK (JPEG)                    14.1     converted to RGB first
F (32-bit float TIFF)          20.0
WEBP RGB / RGBA                16.0 / 20.0   libwebp's own buffer on top
EXIF-rotated (any)             + the mode's Pillow pixel size (the rotated copy)
=============================  =======  ==========================================================

:data:`BYTES_PER_PIXEL` holds these, rounded up by about one byte a pixel; ``tests/test_server_hardening.py``
checks every entry against a fresh measurement, so a change in the decoding code that costs more
fails a test instead of silently breaking the budget.

:class:`MemoryBudget` hands out those bytes, first come first served: a request whose cost does not
fit waits (in order) until earlier decodes finish; the bytes are given back when the decoding
*thread* finishes, not when the request gives up, so an abandoned decode still counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from patchknn.data import DECODE_FORMATS, load_resized
from patchknn.data.decode import JPEG_DRAFT_RATIO
from patchknn.errors import ImageError

__all__ = [
    "BYTES_PER_PIXEL",
    "FIXED_BYTES",
    "DecodeCost",
    "MemoryBudget",
    "decode_cost",
    "prepare_image",
    "TRIM_AFTER_BYTES",
    "return_freed_memory",
]

FIXED_BYTES = 1 << 20
"""Added to every image's cost: interpreter and allocator noise, the resized copy, small buffers."""

BYTES_PER_PIXEL: dict[str, float] = {
    "RGB": 5.0,
    "1": 8.0,
    "L": 8.0,
    "I;16": 9.0,
    "I;16B": 9.0,
    "I;16L": 9.0,
    "I;16N": 9.0,
    "LA": 11.0,
    "La": 12.0,
    "I": 13.0,
    "RGBA": 13.0,
    "RGBX": 13.0,
    "P": 14.0,
    "PA": 15.0,
    "RGBa": 15.0,
    "CMYK": 15.0,
    "YCbCr": 15.0,
    "LAB": 15.0,
    "HSV": 15.0,
    "F": 21.0,
}
"""Peak bytes per pixel of :func:`prepare_image` by Pillow mode (measured, rounded up; see above)."""

WEBP_BYTES_PER_PIXEL = {"RGB": 17.0, "RGBA": 21.0}
"""WEBP decodes through libwebp's own buffer first, so it costs more per pixel than other formats."""

UNKNOWN_BYTES_PER_PIXEL = 24.0
"""For a mode not in the table (a conservative guess, larger than any measured one)."""

_PIXEL_SIZE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # else 4 (Pillow)
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class DecodeCost:
    """What decoding one upload will take, from its header.

    Attributes:
        width, height: pixels, as stored (before any EXIF rotation).
        mode: Pillow's mode (``RGB``, ``RGBA``, ``I;16``, ...).
        format: Pillow's format name (``PNG``, ``JPEG``, ...).
        rotated: the file may carry an EXIF rotation (one more copy of the pixels).
        bytes: the peak extra memory of :func:`prepare_image` for it.
    """

    width: int
    height: int
    mode: str
    format: str
    rotated: bool
    bytes: int


def bytes_per_pixel(mode: str, fmt: str, rotated: bool = False) -> float:
    """Peak bytes per pixel of :func:`prepare_image` for an image of ``mode`` in format ``fmt``."""
    per_pixel = (WEBP_BYTES_PER_PIXEL if fmt == "WEBP" else BYTES_PER_PIXEL).get(mode)
    if per_pixel is None:
        per_pixel = BYTES_PER_PIXEL.get(mode, UNKNOWN_BYTES_PER_PIXEL)
    if rotated:
        per_pixel += _PIXEL_SIZE.get(mode, 4)
    return per_pixel


def decode_cost(data: bytes, max_pixels: int | None = None) -> DecodeCost:
    """Read ``data``'s header (no pixel is decoded) and return what decoding it will cost.

    Raises:
        ImageError: not a readable image header, or more than ``max_pixels`` pixels (the same
            reasons as :func:`patchknn.data.load_image` gives).
    """
    import warnings

    from PIL import Image

    name = "<bytes>"
    Image.init()
    formats = [f for f in DECODE_FORMATS if f in Image.OPEN]
    try:
        with warnings.catch_warnings():
            # Pillow's bomb warning: max_pixels below decides; its UserWarnings are about metadata.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(io.BytesIO(data), formats=formats) as img:
                width, height = img.size
                mode, fmt = img.mode, str(img.format)
                rotated = _may_rotate(img, data)
    except Image.DecompressionBombError as exc:
        raise ImageError(name, f"refused by Pillow's decompression-bomb guard (max_pixels): {exc}") from None
    except Exception:  # noqa: BLE001 - Pillow's exception types on bad headers are open-ended
        raise ImageError(
            name, f"not a supported image format, or a corrupt header (readable formats: {', '.join(formats)})"
        ) from None
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            name,
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(max_pixels; a guard against decompression bombs)",
        )
    if width < 1 or height < 1:
        raise ImageError(name, f"image has no pixels ({width}x{height})")
    per_pixel = bytes_per_pixel(mode, fmt, rotated)
    return DecodeCost(width, height, mode, fmt, rotated, int(math.ceil(width * height * per_pixel)) + FIXED_BYTES)


def _may_rotate(img, data: bytes) -> bool:
    """Whether decoding may apply an EXIF rotation (a second full copy of the pixels)."""
    if img.format == "PNG":
        # A PNG's eXIf chunk may follow the pixel data, where the header cannot see it.
        return b"eXIf" in data
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
    except Exception:  # noqa: BLE001 - unreadable EXIF is ignored by the decoder too
        return False


def prepare_image(
    data: bytes,
    image_size: int,
    max_pixels: int,
    mode: str | None = None,
    trim: bool = False,
    jpeg_draft: float | None = JPEG_DRAFT_RATIO,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode and resize exactly as :class:`patchknn.data.ImageDataset` does for ``predict``:
    :func:`~patchknn.data.load_resized` with its defaults (8-bit RGB resized by Pillow straight after
    decoding, a large JPEG decoded at a reduced size by DCT scaling first, other modes through the
    array rules). ``mode`` (the header's, :attr:`DecodeCost.mode`) is accepted for the callers'
    convenience and does not change the pixels. ``trim``: call :func:`return_freed_memory`
    afterwards (the server does for large images). ``jpeg_draft``: as for ``load_resized`` (keep
    the default to get ``predict``'s pixels; ``None`` = full decode, the most memory, which the
    cost table covers).
    """
    del mode  # load_resized reads the mode itself; the same pixels whatever the caller read
    resized, original = load_resized(data, image_size, max_pixels=max_pixels, jpeg_draft=jpeg_draft)
    tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    if trim:
        return_freed_memory()
    return tensor, original


TRIM_AFTER_BYTES = 32 << 20
"""After a decode that counted at least this much, freed memory is handed back to the system."""

_LIBC: list[Any] = []


def return_freed_memory() -> bool:
    """Hand memory that the allocator holds but nothing uses back to the system (glibc's ``malloc_trim``).

    A large decode allocates and frees hundreds of megabytes in a decode thread, much of it in pieces
    of 64 kB (``numpy.asarray`` of a Pillow image) that glibc keeps in that thread's heap; without a
    trim the resident size stays above what is in use, by up to one decode per thread. Called by the
    decode threads after each decode of :data:`TRIM_AFTER_BYTES` or more (a few milliseconds), so the
    allocator's default behaviour, which the backbone's tensors profit from, is left alone. Returns
    whether anything could be done (Linux with glibc only).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    trim = _LIBC[0]
    return bool(trim is not None and trim(0) >= 0)


class MemoryBudget:
    """At most ``limit`` bytes handed out at once; requests that do not fit wait, first come first served.

    Used from one event loop; :meth:`release` may be called from other threads through
    ``loop.call_soon_threadsafe``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.used = 0
        self.waits = 0  # requests that had to wait, ever (a metric)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for _, fut in self._waiters if not fut.done())

    def fits(self, n: int) -> bool:
        """Whether ``n`` bytes could ever be granted (``n <= limit``)."""
        return n <= self.limit

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` bytes are free and take them. ``n`` must be at most ``limit``."""
        if n > self.limit:
            raise ValueError(f"{n} bytes is more than the whole budget of {self.limit}")
        if not self._waiters and self.used + n <= self.limit:
            self.used += n
            return
        self.waits += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as the waiter gave up
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, n: int) -> None:
        """Give ``n`` bytes back and wake the waiters that now fit, in order."""
        self.used -= int(n)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.used + n > self.limit:
                break
            self._waiters.popleft()
            self.used += n
            fut.set_result(None)
