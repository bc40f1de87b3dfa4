"""What an upload goes through before the model: reading the body, multipart, content sniffing, decoding.

Decoding runs within the memory budget (:mod:`patchknn.server.memory`): :func:`header_cost` reads
what the image will take from its header, the endpoint waits for those bytes, and
:func:`decode_in_pool` decodes in the decode threads and gives them back when the thread is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from starlette.requests import ClientDisconnect, Request

from patchknn.data import DECODE_FORMATS
from patchknn.errors import ImageError
from patchknn.server.errors import ApiError, image_error
from patchknn.server.memory import TRIM_AFTER_BYTES, DecodeCost, MemoryBudget, decode_cost, prepare_image

__all__ = [
    "FormPart",
    "decode_in_pool",
    "format_mib",
    "header_cost",
    "parse_multipart",
    "parse_parts",
    "prepare",
    "read_body",
    "sniff_format",
]

log = logging.getLogger("patchknn.server")

# Magic numbers of the formats load_image decodes (patchknn.data.DECODE_FORMATS).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
_PPM = re.compile(rb"^P[1-6]\s")


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes of ``data`` (PNG, JPEG, ...), or ``None``.

    Example:
        >>> sniff_format(b"\\x89PNG\\r\\n\\x1a\\n...."), sniff_format(b"hello")
        ('PNG', None)
    """
    head = bytes(data[:16])
    found: str | None = None
    for magic, name in _MAGIC:
        if head.startswith(magic):
            found = name
            break
    if found is None and len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        found = "WEBP"
    if found is None and _PPM.match(head):
        found = "PPM"
    return found if found in DECODE_FORMATS else None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise ApiError(
                    413, "payload_too_large", f"the request body is larger than the limit of {limit:,} bytes"
                )
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "the client disconnected before sending the whole body") from None
    return bytes(buf)


class _MultipartLog:
    """python-multipart's logger for one parse: its warnings (e.g. "Found invalid character 13 in header")
    describe the client's malformed body, which is answered 400 with that message; the server's log only
    gets them at debug level, as one line of ours."""

    def _debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("multipart parser: " + str(msg), *args)

    debug = info = warning = error = exception = _debug


@dataclass(frozen=True)
class FormPart:
    """One part of a ``multipart/form-data`` body: its field name, file name (``""``: none) and bytes."""

    name: str
    filename: str
    data: bytes


def parse_parts(body: bytes, content_type: str, max_parts: int = 16) -> list[FormPart]:
    """Every part of a ``multipart/form-data`` body (400 ``invalid_multipart`` when it cannot be parsed)."""
    try:
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # python-multipart < 0.0.13
        from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "invalid_multipart", "multipart/form-data without a boundary parameter")
    parts: list[dict[str, Any]] = []
    hdr = {"field": bytearray(), "value": bytearray()}

    def on_part_begin() -> None:
        if len(parts) >= max_parts:
            raise ApiError(400, "invalid_multipart", f"more than {max_parts} parts in the multipart body")
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        hdr["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        hdr["value"] += data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][bytes(hdr["field"]).lower()] = bytes(hdr["value"])
        hdr["field"], hdr["value"] = bytearray(), bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"] += data[start:end]

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.logger = _MultipartLog()  # type: ignore[assignment]
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure is the client's malformed body
        raise ApiError(400, "invalid_multipart", f"the multipart body cannot be parsed ({exc})") from None
    out = []
    for part in parts:
        disposition = part["headers"].get(b"content-disposition", b"")
        _, opts = parse_options_header(disposition)
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts.get(b"filename", b"").decode("utf-8", "replace")
        out.append(FormPart(name, filename, bytes(part["data"])))
    return out


def parse_multipart(body: bytes, content_type: str, max_parts: int = 16) -> bytes:
    """The bytes of the one part named ``file`` of a ``multipart/form-data`` body."""
    files = [part for part in parse_parts(body, content_type, max_parts) if part.name == "file"]
    if len(files) > 1:
        raise ApiError(
            400,
            "invalid_multipart",
            f"the multipart body has {len(files)} fields named 'file'; send exactly one image per request",
        )
    if files:
        return files[0].data
    raise ApiError(
        422, "missing_file", "the multipart upload has no field named 'file'; send the image as -F file=@image.png"
    )


def prepare(data: bytes, image_size: int, max_pixels: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The server's decode step in one call (header, then :func:`~patchknn.server.memory.prepare_image`):
    the same pixels as :class:`patchknn.data.ImageDataset` gives ``predict`` (checked by the tests)."""
    return prepare_image(data, image_size, max_pixels, decode_cost(data, max_pixels).mode)


async def header_cost(data: bytes, max_pixels: int, budget: MemoryBudget) -> DecodeCost:
    """What decoding ``data`` will take, from its header (413/422 for what the header already shows)."""
    loop = asyncio.get_running_loop()
    try:
        cost: DecodeCost = await loop.run_in_executor(None, decode_cost, data, max_pixels)
    except ImageError as exc:
        raise image_error(exc, max_pixels) from None
    if not budget.fits(cost.bytes):
        raise ApiError(
            413,
            "image_too_large",
            f"decoding this {cost.width}x{cost.height} {cost.mode} {cost.format} image needs about "
            f"{format_mib(cost.bytes)}, more than this server's whole decode memory budget of "
            f"{format_mib(budget.limit)}; "
            "send a smaller image (fewer pixels, or 8-bit RGB)",
        )
    return cost


async def decode_in_pool(
    pool: ThreadPoolExecutor,
    budget: MemoryBudget,
    data: bytes,
    image_size: int,
    max_pixels: int,
    cost: DecodeCost,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode ``data`` in ``pool``; ``cost.bytes`` of ``budget`` must be held (they are given back).

    The bytes are given back when the decoding thread finishes, also when the request gave up before.
    """
    loop = asyncio.get_running_loop()
    try:
        trim = cost.bytes >= TRIM_AFTER_BYTES  # give a large decode's freed memory back at once
        job = pool.submit(prepare_image, data, image_size, max_pixels, cost.mode, trim)
    except BaseException:
        budget.release(cost.bytes)
        raise
    def give_back(_: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
            loop.call_soon_threadsafe(budget.release, cost.bytes)

    job.add_done_callback(give_back)
    try:
        return await asyncio.wrap_future(job)
    except ImageError as exc:
        raise image_error(exc, max_pixels) from None


def format_mib(n: int) -> str:
    """``n`` bytes in MiB, for messages."""
    return f"{n / 2**20:,.0f} MiB"
