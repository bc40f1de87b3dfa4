"""The FastAPI application: endpoints, limits, errors, authentication and metrics wiring.

Endpoints (all but ``/healthz`` need ``Authorization: Bearer KEY`` when keys are configured):

* ``POST /v1/models/{name}/predict[?map=none|png|heatmap]``: one image, as a multipart upload in
  the field ``file`` or as the raw request body; answers the score, the verdict (``OK``/``NG`` with
  the model's threshold, ``null`` without one), the model's name and version, timings and
  optionally the anomaly map as a base64 PNG.
* ``GET /v1/models``, ``GET /v1/models/{name}``: the served models, their configuration and threshold.
* ``GET /healthz`` (liveness, no key), ``GET /readyz`` (models loaded, batchers running).
* ``GET /metrics``: Prometheus text format.
* ``GET /docs``, ``/redoc``, ``/openapi.json``: OpenAPI documentation.

Every error answer is JSON ``{"error": {"code": ..., "message": ...}}``; see :data:`ERROR_CODES`.

Example:
    >>> from patchknn.server.settings import ServerSettings, load_models  # doctest: +SKIP
    >>> app = create_app(load_models(["bottle=models/bottle"]), ServerSettings())  # doctest: +SKIP
    >>> run(app, ServerSettings(port=8000))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from patchknn.data import DECODE_FORMATS
from patchknn.errors import ImageError
from patchknn.model import Prediction
from patchknn.server.auth import KeyChecker, bearer_token
from patchknn.server.batching import MicroBatcher, ScoredImage
from patchknn.server.memory import DecodeCost, MemoryBudget, decode_cost, prepare_image
from patchknn.server.metrics import CONTENT_TYPE, Metrics
from patchknn.server.protocol import ConnectionGuard, guarded_protocol
from patchknn.server.settings import ServedModel, ServerSettings
from patchknn.visualize import model_scale

__all__ = [
    "ERROR_CODES",
    "KEY_PARAMETERS",
    "ApiError",
    "create_app",
    "log_config",
    "run",
    "server_config",
    "sniff_format",
]

log = logging.getLogger("patchknn.server")

KEY_PARAMETERS = frozenset(
    {"api_key", "apikey", "api-key", "key", "token", "access_token", "auth", "authorization", "bearer",
     "password", "secret", "x-api-key"}
)
"""Query parameter names refused with 401 (a key belongs in the ``Authorization`` header, never in a URL)."""

ERROR_CODES: dict[str, tuple[int, str]] = {
    "bad_request": (400, "malformed request (e.g. a bad Content-Length, a non-ASCII request line)"),
    "empty_body": (400, "no image in the request"),
    "invalid_multipart": (400, "the multipart body cannot be parsed, or has more than one field 'file'"),
    "unauthorized": (401, "no API key, not a valid one, or a key outside the Authorization header"),
    "not_found": (404, "no such endpoint"),
    "model_not_found": (404, "no model of that name is served"),
    "method_not_allowed": (405, "wrong HTTP method for the endpoint"),
    "request_timeout": (408, "the request body did not arrive within the request timeout"),
    "header_timeout": (408, "the request line and headers did not arrive within --header-timeout"),
    "payload_too_large": (413, "the request body is larger than --max-upload-mb"),
    "image_too_large": (
        413,
        "the image has more pixels than --max-pixels (decompression-bomb guard), or decoding it needs more "
        "than the whole --memory-budget-mb",
    ),
    "unsupported_media_type": (415, "the content is not an accepted image type (checked by content)"),
    "invalid_image": (422, "an accepted type, but the image is truncated, corrupt or unusable"),
    "missing_file": (422, "a multipart upload without the field 'file'"),
    "unscorable_image": (422, "the model produced NaN/Inf for this image; no score"),
    "validation_error": (422, "a bad query parameter"),
    "headers_too_large": (431, "the request line and headers are larger than --max-header-kb"),
    "internal_error": (500, "an unexpected server error (logged)"),
    "not_implemented": (501, "an HTTP feature the server does not support (e.g. Transfer-Encoding: gzip)"),
    "server_busy": (
        503,
        "all processing slots and the wait queue are taken, or the decode memory budget stayed taken until the "
        "request timeout; retry after Retry-After s",
    ),
    "too_many_connections": (503, "too many connections are waiting to send their headers (--max-pending-connections)"),
    "not_ready": (503, "the server is starting or stopping"),
    "timeout": (504, "the answer was not ready within the request timeout"),
}
"""Error code -> (HTTP status, meaning)."""

MapKind = Literal["none", "png", "heatmap"]

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


class ApiError(Exception):
    """An error answer: ``status``, ``code`` (see :data:`ERROR_CODES`), ``message``."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


# ----------------------------------------------------------------------------- response schemas
class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable error code.", examples=["unsupported_media_type"])
    message: str = Field(description="What went wrong and what is accepted.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class AnomalyMap(BaseModel):
    kind: Literal["png", "heatmap"] = Field(
        description="png: 16-bit grayscale, score = pixel / 65535 * vmax; heatmap: colour image for people"
    )
    media_type: str = "image/png"
    encoding: str = "base64"
    width: int
    height: int
    vmin: float
    vmax: float
    data: str = Field(description="The PNG file, base64-encoded.")


class PredictResponse(BaseModel):
    model: str = Field(description="The model's name.")
    model_version: str = Field(description="Content fingerprint of the saved model.")
    score: float = Field(description="Image anomaly score (as PatchKNN.predict).")
    threshold: float | None = Field(description="The model's decision threshold, or null.")
    verdict: Literal["OK", "NG"] | None = Field(description="NG when score >= threshold; null without one.")
    image: dict[str, int] = Field(description="The uploaded image's width and height.")
    batch_size: int = Field(description="Images in the backbone call this one shared.")
    timing_ms: dict[str, float] = Field(description="total, read, decode, queue, inference (ms).")
    anomaly_map: AnomalyMap | None = None


_ERROR_DOCS = {
    status: {"model": ErrorResponse, "description": "; ".join(m for c, (s, m) in ERROR_CODES.items() if s == status)}
    for status in sorted({s for s, _ in ERROR_CODES.values()})
}


# ----------------------------------------------------------------------------- helpers
def _json(status: int, content: Any, headers: Mapping[str, str] | None = None) -> JSONResponse:
    base = {"Cache-Control": "no-store"}
    return JSONResponse(content, status_code=status, headers={**base, **(headers or {})})


def _route_label(path: str) -> str:
    if path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/docs", "/redoc", "/openapi.json"):
        return path
    if re.fullmatch(r"/v1/models/[^/]+/predict", path):
        return "/v1/models/{name}/predict"
    if re.fullmatch(r"/v1/models/[^/]+", path):
        return "/v1/models/{name}"
    return "other"


_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


class _Admission:
    """At most ``max_concurrency`` requests in progress, ``max_queue`` more waiting, the rest 503."""

    def __init__(self, max_concurrency: int, max_queue: int, retry_after_s: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.active = 0
        self.waiting = 0
        self._sem: asyncio.Semaphore | None = None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        if self.active >= self.max_concurrency and self.waiting >= self.max_queue:
            raise ApiError(
                503,
                "server_busy",
                f"the server is at capacity ({self.active} requests in progress, {self.waiting} waiting); "
                f"retry in {self.retry_after_s} s",
                {"Retry-After": str(self.retry_after_s)},
            )
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._sem.release()


@dataclass
class _State:
    models: dict[str, ServedModel]
    settings: ServerSettings
    metrics: Metrics
    admission: _Admission
    budget: MemoryBudget
    batchers: dict[str, MicroBatcher] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    decode_pool: ThreadPoolExecutor | None = None
    score_pool: ThreadPoolExecutor | None = None
    ready: bool = False


class _MultipartLog:
    """python-multipart's logger for one parse: its warnings (e.g. "Found invalid character 13 in header")
    describe the client's malformed body, which is answered 400 with that message; the server's log only
    gets them at debug level, as one line of ours."""

    def _debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("multipart parser: " + str(msg), *args)

    debug = info = warning = error = exception = _debug


def _parse_multipart(body: bytes, content_type: str, max_parts: int = 16) -> bytes:
    """The bytes of the one part named ``file`` of a ``multipart/form-data`` body."""
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
    files = []
    for part in parts:
        disposition = part["headers"].get(b"content-disposition", b"")
        _, opts = parse_options_header(disposition)
        if opts.get(b"name") == b"file":
            files.append(part)
    if len(files) > 1:
        raise ApiError(
            400,
            "invalid_multipart",
            f"the multipart body has {len(files)} fields named 'file'; send exactly one image per request",
        )
    if files:
        return bytes(files[0]["data"])
    raise ApiError(
        422, "missing_file", "the multipart upload has no field named 'file'; send the image as -F file=@image.png"
    )


async def _cost(state: _State, data: bytes) -> DecodeCost:
    """What decoding ``data`` will take, from its header (413/422 for what the header already shows)."""
    settings = state.settings
    loop = asyncio.get_running_loop()
    try:
        cost: DecodeCost = await loop.run_in_executor(None, decode_cost, data, settings.max_pixels)
    except ImageError as exc:
        raise _image_error(exc, settings.max_pixels) from None
    budget = state.budget
    if not budget.fits(cost.bytes):
        raise ApiError(
            413,
            "image_too_large",
            f"decoding this {cost.width}x{cost.height} {cost.mode} {cost.format} image needs about "
            f"{_mib(cost.bytes)}, more than this server's whole decode memory budget of {_mib(budget.limit)}; "
            "send a smaller image (fewer pixels, or 8-bit RGB)",
        )
    return cost


async def _decode(
    state: _State, data: bytes, image_size: int, cost: DecodeCost
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode ``data`` in the decode pool; ``cost.bytes`` of the budget must be held (they are given back).

    The bytes are given back when the decoding thread finishes, also when the request gave up before.
    """
    settings = state.settings
    budget = state.budget
    loop = asyncio.get_running_loop()
    assert state.decode_pool is not None
    try:
        job = state.decode_pool.submit(prepare_image, data, image_size, settings.max_pixels, cost.mode)
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
        raise _image_error(exc, settings.max_pixels) from None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _image_error(exc: ImageError, max_pixels: int) -> ApiError:
    reason = exc.reason
    if "max_pixels" in reason or "decompression" in reason or "memory" in reason:
        return ApiError(
            413,
            "image_too_large",
            f"the image is too large: {reason} (this server accepts at most {max_pixels:,} pixels)",
        )
    # The first bytes named an accepted format (checked before), so anything else is a damaged image.
    return ApiError(422, "invalid_image", f"the image cannot be used: {reason}")


def _encode_map(amap: np.ndarray, kind: str, scale: tuple[float, float] | None) -> dict[str, Any]:
    from PIL import Image

    h, w = amap.shape
    buf = io.BytesIO()
    vmin = 0.0
    if kind == "png":
        vmax = float(amap.max())
        vmax = vmax if vmax > 0 and math.isfinite(vmax) else 1.0
        pixels = np.clip(np.rint(amap.astype(np.float64) / vmax * 65535.0), 0, 65535).astype(np.uint16)
        Image.fromarray(pixels).save(buf, format="PNG")
    else:
        from patchknn.visualize import colorize

        # the model's fixed colour scale (the same as `patchknn predict` overlays and the report)
        vmin, vmax = scale if scale is not None else (0.0, float(amap.max()) or 1.0)
        Image.fromarray(colorize(amap, vmin, vmax)).save(buf, format="PNG")
    return {
        "kind": kind,
        "media_type": "image/png",
        "encoding": "base64",
        "width": int(w),
        "height": int(h),
        "vmin": float(vmin),
        "vmax": float(vmax),
        "data": base64.b64encode(buf.getvalue()).decode("ascii"),
    }


async def _read_body(request: Request, limit: int) -> bytes:
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


# ----------------------------------------------------------------------------- middleware
class _MetricsMiddleware:
    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            method = scope.get("method", "GET")
            self.metrics.observe_request(
                _route_label(scope.get("path", "")),
                method if method in _METHODS else "other",
                status,
                time.perf_counter() - start,
            )


class _AuthMiddleware:
    """401 for every path but the public ones when keys are configured; keys are never logged."""

    def __init__(self, app: Any, checker: KeyChecker, public: frozenset[str], metrics: Metrics) -> None:
        self.app = app
        self.checker = checker
        self.public = public
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        in_url = self._key_in_url(scope.get("query_string", b""))
        if in_url is not None:
            message = (
                f"API keys are not accepted in the URL ({in_url}): URLs end up in logs and browser histories. "
                "Send the key in the header 'Authorization: Bearer <key>' and nowhere else; if this key is "
                "real, consider it exposed and replace it"
            )
        elif not self.checker.enabled or scope.get("path") in self.public:
            await self.app(scope, receive, send)
            return
        else:
            message = self._check_header(scope)
            if message is None:
                await self.app(scope, receive, send)
                return
        self.metrics.count_error("unauthorized")
        response = _json(
            401,
            {"error": {"code": "unauthorized", "message": message}},
            {"WWW-Authenticate": 'Bearer realm="patchknn"'},
        )
        await response(scope, receive, send)

    def _key_in_url(self, query: bytes) -> str | None:
        """How the query string carries a key (a key-like parameter name, or a configured key), or None."""
        if not query:
            return None
        from urllib.parse import parse_qsl

        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)[:64]
        for name, _ in pairs:
            if name.strip().lower() in KEY_PARAMETERS:
                return f"query parameter {name.strip().lower()!r}"
        if self.checker.enabled:
            for name, value in pairs:
                if self.checker.check(name) or self.checker.check(value):
                    return "a query parameter holds a key of this server"
        return None

    def _check_header(self, scope: dict[str, Any]) -> str | None:
        """The 401 message for the request's headers, or None when its key is valid."""
        headers = scope.get("headers", [])
        values = [v for k, v in headers if k == b"authorization"]
        token = bearer_token(values[0]) if len(values) == 1 else None
        if token is None:
            other = sorted({k.decode("latin-1") for k, _ in headers if k in (b"x-api-key", b"api-key", b"apikey")})
            if other:
                return (
                    f"missing API key: the header {other[0]!r} is not read; send the key as "
                    "'Authorization: Bearer <key>'"
                )
            return "missing API key: send the header 'Authorization: Bearer <key>'"
        if not self.checker.check(token):
            return "invalid API key"
        return None


# ----------------------------------------------------------------------------- the app
def create_app(models: Mapping[str, ServedModel], settings: ServerSettings | None = None) -> FastAPI:
    """Build the application for already-loaded ``models`` (name -> :class:`ServedModel`)."""
    settings = settings or ServerSettings()
    if not models:
        raise ValueError("create_app needs at least one model")
    metrics = Metrics()
    state = _State(
        models=dict(models),
        settings=settings,
        metrics=metrics,
        admission=_Admission(settings.max_concurrency, settings.max_queue, settings.retry_after_s),
        budget=MemoryBudget(settings.memory_budget_bytes),
        expected={name: 0 for name in models},
    )
    for served in state.models.values():
        metrics.add_model_info(served.name, served.version, str(served.model.config.backbone))
    metrics.gauge(
        "patchknn_requests_in_progress", "Requests holding a processing slot.", lambda: state.admission.active
    )
    metrics.gauge(
        "patchknn_requests_queued", "Requests waiting for a processing slot.", lambda: state.admission.waiting
    )
    metrics.gauge(
        "patchknn_batch_queue_images",
        "Decoded images waiting for a backbone call.",
        lambda: sum(b.queued for b in state.batchers.values()),
    )
    metrics.gauge("patchknn_ready", "1 when the server accepts predictions.", lambda: float(state.ready))
    metrics.gauge(
        "patchknn_decode_memory_bytes",
        "Decode memory reserved by images being decoded (counted from their headers).",
        lambda: state.budget.used,
    )
    metrics.gauge(
        "patchknn_decode_memory_waiting", "Requests waiting for decode memory.", lambda: state.budget.waiting
    )
    metrics.gauge(
        "patchknn_decode_memory_waits",
        "Requests that had to wait for decode memory, in all.",
        lambda: state.budget.waits,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="patchknn-decode")
        state.score_pool = ThreadPoolExecutor(1, thread_name_prefix="patchknn-score")
        for name, served in state.models.items():
            batcher = MicroBatcher(
                name,
                served.model,
                max_batch=settings.max_batch,
                max_delay_s=settings.max_delay_ms / 1000.0,
                executor=state.score_pool,
                expected=lambda name=name: state.expected[name],
                on_batch=lambda n, s, name=name: metrics.observe_batch(name, n, s),
            )
            await batcher.start()
            state.batchers[name] = batcher
        state.ready = True
        log.info(
            "patchknn server ready: models %s; auth %s",
            ", ".join(f"{m.name} ({m.version})" for m in state.models.values()),
            f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "off (loopback only)",
        )
        try:
            yield
        finally:
            state.ready = False
            for batcher in state.batchers.values():
                await batcher.stop()
            state.decode_pool.shutdown(wait=False, cancel_futures=True)
            state.score_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="patchknn inspection server",
        version=_version(),
        description=(
            "Anomaly scores for images from saved patchknn models. Send `Authorization: Bearer <key>` "
            "on every endpoint but `/healthz` when the server has API keys. Errors are JSON "
            '`{"error": {"code": ..., "message": ...}}`.'
        ),
        lifespan=lifespan,
    )
    app.state.patchknn = state

    def error(exc: ApiError) -> JSONResponse:
        metrics.count_error(exc.code)
        return _json(exc.status, {"error": {"code": exc.code, "message": exc.message}}, exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path[:200]}; see /docs"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path[:200]}"
        return error(ApiError(exc.status_code, code, message, getattr(exc, "headers", None) or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return error(ApiError(422, "validation_error", f"invalid request: {problems}"[:1000]))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path[:200])
        return error(ApiError(500, "internal_error", "unexpected server error; it has been logged"))

    public = {"/healthz"}
    if settings.public_docs:
        public |= {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}
    app.add_middleware(
        _AuthMiddleware, checker=KeyChecker(settings.api_keys), public=frozenset(public), metrics=metrics
    )
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    def lookup(name: str) -> ServedModel:
        served = state.models.get(name)
        if served is None:
            names = ", ".join(sorted(state.models))
            raise ApiError(404, "model_not_found", f"no model named {name[:100]!r}; served models: {names}")
        return served

    # ------------------------------------------------------------------------- endpoints
    @app.post(
        "/v1/models/{name}/predict",
        response_model=PredictResponse,
        responses=_ERROR_DOCS,
        summary="Score one image",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "string", "format": "binary"}},
                            "required": ["file"],
                        }
                    },
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def predict(
        name: str,
        request: Request,
        map: MapKind = Query(
            "none", description="Also return the anomaly map: png (16-bit scores) or heatmap (colour)."
        ),
    ) -> Response:
        """Score one image: a multipart upload in the field ``file``, or the raw body (any type).

        The image type is recognised from its content (PNG, JPEG, BMP, TIFF, WEBP, GIF, PPM), not from
        its name or Content-Type header.
        """
        t0 = time.perf_counter()
        served = lookup(name)
        if not state.ready:
            raise ApiError(503, "not_ready", "the server is not ready", {"Retry-After": "1"})
        limit = settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "bad_request", "Content-Length is not a number")
            if int(declared) > limit:
                raise ApiError(
                    413,
                    "payload_too_large",
                    f"the request body ({int(declared):,} bytes) is larger than the limit of {limit:,} bytes",
                )
        timings: dict[str, float] = {}
        phase = "queue"
        state.expected[name] += 1
        submitted = False
        try:
            async with asyncio.timeout(settings.request_timeout_s), state.admission.slot():
                phase = "read"
                t_read = time.perf_counter()
                body = await _read_body(request, limit)
                content_type = request.headers.get("content-type", "")
                if content_type.lower().startswith("multipart/form-data"):
                    data = _parse_multipart(body, content_type)
                else:
                    data = body
                del body
                if not data:
                    raise ApiError(
                        400,
                        "empty_body",
                        "no image: send it as multipart field 'file' (-F file=@img.png) or as the raw body",
                    )
                phase = "decode"
                t_decode = time.perf_counter()
                timings["read"] = t_decode - t_read
                fmt = sniff_format(data)
                if fmt is None:
                    accepted = ", ".join(DECODE_FORMATS)
                    raise ApiError(
                        415,
                        "unsupported_media_type",
                        f"the content is not an accepted image type (recognised by its first bytes; accepted: "
                        f"{accepted})",
                    )
                loop = asyncio.get_running_loop()
                cost = await _cost(state, data)
                phase = "memory"
                await state.budget.acquire(cost.bytes)
                phase = "decode"
                tensor, (h, w) = await _decode(state, data, served.image_size, cost)
                del data
                timings["decode"] = time.perf_counter() - t_decode
                phase = "score"
                state.expected[name] -= 1
                submitted = True
                result: ScoredImage = await state.batchers[name].submit(tensor)
                if not (math.isfinite(result.score) and np.isfinite(result.anomaly_map).all()):
                    raise ApiError(
                        422,
                        "unscorable_image",
                        "the anomaly map contains NaN or infinite values (numerical overflow in the backbone, "
                        "or a damaged model); no score is given",
                    )
                threshold = served.threshold
                anomaly_map = None
                if map != "none":
                    anomaly_map = await loop.run_in_executor(
                        state.decode_pool, _encode_map, result.anomaly_map, map, model_scale(served.model)
                    )
        except TimeoutError:
            if phase == "memory":
                raise ApiError(
                    503,
                    "server_busy",
                    f"the decode memory budget ({_mib(state.budget.limit)}) stayed taken by other images until the "
                    f"request timeout of {settings.request_timeout_s:g} s; retry in {settings.retry_after_s} s",
                    {"Retry-After": str(settings.retry_after_s)},
                ) from None
            if phase == "read":
                raise ApiError(
                    408,
                    "request_timeout",
                    f"the request body did not arrive within {settings.request_timeout_s:g} s",
                ) from None
            raise ApiError(
                504,
                "timeout",
                f"no answer within the request timeout of {settings.request_timeout_s:g} s "
                f"(while in the {phase} stage)",
            ) from None
        finally:
            if not submitted:
                state.expected[name] -= 1
        score = result.score
        verdict = Prediction(name, result.anomaly_map, score, threshold).verdict  # the same rule as predict
        metrics.count_prediction(name, verdict)
        timings["queue"] = result.queue_s
        timings["inference"] = result.inference_s
        timings["total"] = time.perf_counter() - t0
        content = {
            "model": name,
            "model_version": served.version,
            "score": score,
            "threshold": threshold,
            "verdict": verdict,
            "image": {"width": w, "height": h},
            "batch_size": result.batch_size,
            "timing_ms": {k: round(v * 1000.0, 3) for k, v in timings.items()},
        }
        if anomaly_map is not None:
            content["anomaly_map"] = anomaly_map
        return _json(200, content)

    @app.get("/v1/models", summary="The served models", responses=_ERROR_DOCS)
    async def list_models() -> dict[str, Any]:
        return {"models": [m.describe() for m in state.models.values()], "limits": settings.public()}

    @app.get("/v1/models/{name}", summary="One served model", responses=_ERROR_DOCS)
    async def get_model(name: str) -> dict[str, Any]:
        return lookup(name).describe()

    @app.get("/healthz", summary="Liveness (no key needed)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: models loaded and batchers running", responses=_ERROR_DOCS)
    async def readyz() -> Response:
        running = all(b.running for b in state.batchers.values()) and len(state.batchers) == len(state.models)
        if not (state.ready and running):
            raise ApiError(503, "not_ready", "the server is starting or stopping", {"Retry-After": "1"})
        return _json(200, {"status": "ready", "models": sorted(state.models)})

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key of the server."}
            }
            if settings.api_keys:
                schema["security"] = [{"bearerAuth": []}]
                schema["paths"]["/healthz"]["get"]["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _version() -> str:
    from patchknn._version import __version__

    return __version__


def log_config(log_level: str = "info") -> dict[str, Any]:
    """uvicorn's logging configuration plus the ``patchknn`` loggers on the same handler and format."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["patchknn"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    return config


def server_config(
    app: FastAPI,
    settings: ServerSettings,
    *,
    log_level: str = "info",
    access_log: bool = True,
    **overrides: Any,
) -> Any:
    """The ``uvicorn.Config`` that serves ``app``: the guarded h11 protocol (header deadline, cap on
    connections without headers, header size, JSON errors, redacted access log; see
    :mod:`patchknn.server.protocol`) with ``settings``' limits. ``overrides`` go to ``uvicorn.Config``.
    """
    import uvicorn

    state: _State | None = getattr(app.state, "patchknn", None)
    guard = ConnectionGuard(
        header_timeout_s=settings.header_timeout_s,
        max_pending_connections=settings.max_pending_connections,
        retry_after_s=settings.retry_after_s,
        count_error=state.metrics.count_error if state is not None else None,
    )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": log_level,
        "log_config": log_config(log_level),
        "access_log": access_log,
        "server_header": False,
        "timeout_keep_alive": 5,
        "lifespan": "on",
        "http": guarded_protocol(guard),
        "ws": "none",  # no WebSocket endpoints: an Upgrade request is served as plain HTTP
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        **overrides,
    }
    config = uvicorn.Config(app, **options)
    config.patchknn_guard = guard  # type: ignore[attr-defined]
    return config


def run(app: FastAPI, settings: ServerSettings, *, log_level: str = "info", access_log: bool = True) -> None:
    """Serve ``app`` with uvicorn on ``settings.host:settings.port`` until interrupted."""
    import uvicorn

    from patchknn.server.memory import return_freed_memory

    return_freed_memory()  # resident memory follows the decode budget (see patchknn.server.memory)

    uvicorn.Server(server_config(app, settings, log_level=log_level, access_log=access_log)).run()
