"""The FastAPI application: endpoints, limits, errors, authentication and metrics wiring.

Endpoints (all but ``/healthz`` need ``Authorization: Bearer KEY`` when keys are configured):

* ``POST /v1/models/{name}/predict[?map=none|png|heatmap|overlay]``: one image, as a multipart upload
  in the field ``file`` or as the raw request body; answers the score, the verdict (``OK``/``NG``
  with the model's threshold, ``null`` without one), the model's name and the version that
  answered, timings and optionally the anomaly map as a base64 PNG.
* ``POST /v1/models/{name}/corrections`` (role ``admin``), ``GET /v1/models/{name}/versions``:
  :mod:`patchknn.server.corrections`.
* ``GET /station`` (the inspection page), ``/static/...``, ``GET /v1/results``, ``GET /v1/watch...``:
  :mod:`patchknn.server.station`.
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
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from patchknn.data import DECODE_FORMATS
from patchknn.model import Prediction
from patchknn.server.auth import KeyChecker
from patchknn.server.batching import MicroBatcher, ScoredImage
from patchknn.server.corrections import add_correction_routes
from patchknn.server.errors import ERROR_CODES, ERROR_DOCS, ApiError, json_response
from patchknn.server.memory import MemoryBudget
from patchknn.server.metrics import CONTENT_TYPE, Metrics
from patchknn.server.middleware import KEY_PARAMETERS, AuthMiddleware, MetricsMiddleware
from patchknn.server.registry import LiveModel, ModelRegistry
from patchknn.server.responses import PredictResponse, encode_map, request_body
from patchknn.server.running import log_config, run, server_config
from patchknn.server.settings import ServedModel, ServerSettings
from patchknn.server.station import PUBLIC_PATHS, PUBLIC_PREFIXES, ResultLog, add_station_routes
from patchknn.server.uploads import (
    decode_in_pool,
    format_mib,
    header_cost,
    parse_multipart,
    prepare,
    read_body,
    sniff_format,
)
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

_prepare = prepare  # the decode step under its former name (tests compare it with the estimator's)

MapKind = Literal["none", "png", "heatmap", "overlay"]
BINARY = {"type": "string", "format": "binary"}


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
    registry: ModelRegistry
    settings: ServerSettings
    metrics: Metrics
    admission: _Admission
    budget: MemoryBudget
    results: ResultLog = field(default_factory=ResultLog)
    decode_pool: ThreadPoolExecutor | None = None
    score_pool: ThreadPoolExecutor | None = None
    ready: bool = False


def create_app(models: Mapping[str, ServedModel], settings: ServerSettings | None = None) -> FastAPI:
    """Build the application for already-loaded ``models`` (name -> :class:`ServedModel`)."""
    settings = settings or ServerSettings()
    if not models:
        raise ValueError("create_app needs at least one model")
    metrics = Metrics()

    def make_batcher(live: LiveModel) -> MicroBatcher:
        name = live.served.name
        return MicroBatcher(
            name,
            live.served.model,
            max_batch=settings.max_batch,
            max_delay_s=settings.max_delay_ms / 1000.0,
            executor=state.score_pool,
            expected=lambda: live.expected,
            on_batch=lambda n, s: metrics.observe_batch(name, n, s),
        )

    state = _State(
        registry=ModelRegistry(models, make_batcher),
        settings=settings,
        metrics=metrics,
        admission=_Admission(settings.max_concurrency, settings.max_queue, settings.retry_after_s),
        budget=MemoryBudget(settings.memory_budget_bytes),
    )
    for served in state.registry.served():
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
        lambda: state.registry.queued,
    )
    metrics.gauge("patchknn_ready", "1 when the server accepts predictions.", lambda: float(state.ready))
    metrics.gauge(
        "patchknn_model_swaps", "Model versions swapped in by corrections since start.", lambda: state.registry.swaps
    )
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
        await state.registry.start()
        state.ready = True
        log.info(
            "patchknn server ready: models %s; auth %s",
            ", ".join(f"{m.name} ({m.version})" for m in state.registry.served()),
            f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "off (loopback only)",
        )
        try:
            yield
        finally:
            state.ready = False
            await state.registry.stop()
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
        return json_response(exc.status, {"error": {"code": exc.code, "message": exc.message}}, exc.headers)

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

    public = {"/healthz", *PUBLIC_PATHS}
    if settings.public_docs:
        public |= {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}
    app.add_middleware(
        AuthMiddleware,
        checker=KeyChecker(settings.api_keys, settings.admin_keys),
        public=frozenset(public),
        metrics=metrics,
        public_prefixes=PUBLIC_PREFIXES,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # ------------------------------------------------------------------------- endpoints
    @app.post(
        "/v1/models/{name}/predict",
        response_model=PredictResponse,
        responses=ERROR_DOCS,
        summary="Score one image",
        openapi_extra=request_body(
            {"file": BINARY},
            **{t: {"schema": BINARY} for t in ("application/octet-stream", "image/png", "image/jpeg")},
        ),
    )
    async def predict(
        name: str,
        request: Request,
        map: MapKind = Query(
            "none",
            description="Also return the anomaly map: png (16-bit scores), heatmap (colour) or overlay (the "
            "heat map over the image, with the outline of map >= threshold).",
        ),
        source: str = Query("", max_length=200, description="A name for the image in the recent-results list."),
    ) -> Response:
        """Score one image: a multipart upload in the field ``file``, or the raw body (any type).

        The image type is recognised from its content (PNG, JPEG, BMP, TIFF, WEBP, GIF, PPM), not from
        its name or Content-Type header.
        """
        t0 = time.perf_counter()
        state.registry.current(name)  # 404 before anything else
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
        live = state.registry.acquire(name)  # this request finishes on this version, whatever is swapped meanwhile
        served = live.served
        live.expected += 1
        submitted = False
        try:
            async with asyncio.timeout(settings.request_timeout_s), state.admission.slot():
                phase = "read"
                t_read = time.perf_counter()
                body = await read_body(request, limit)
                content_type = request.headers.get("content-type", "")
                if content_type.lower().startswith("multipart/form-data"):
                    data = parse_multipart(body, content_type)
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
                cost = await header_cost(data, settings.max_pixels, state.budget)
                phase = "memory"
                await state.budget.acquire(cost.bytes)
                phase = "decode"
                assert state.decode_pool is not None
                tensor, (h, w) = await decode_in_pool(
                    state.decode_pool, state.budget, data, served.image_size, settings.max_pixels, cost
                )
                del data
                timings["decode"] = time.perf_counter() - t_decode
                phase = "score"
                live.expected -= 1
                submitted = True
                assert live.batcher is not None
                result: ScoredImage = await live.batcher.submit(tensor)
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
                    image = tensor.permute(1, 2, 0).numpy() if map == "overlay" else None
                    anomaly_map = await loop.run_in_executor(
                        state.decode_pool,
                        encode_map,
                        result.anomaly_map,
                        map,
                        model_scale(served.model),
                        image,
                        threshold,
                    )
        except TimeoutError:
            if phase == "memory":
                raise ApiError(
                    503,
                    "server_busy",
                    f"the decode memory budget ({format_mib(state.budget.limit)}) stayed taken by other images "
                    f"until the request timeout of {settings.request_timeout_s:g} s; "
                    f"retry in {settings.retry_after_s} s",
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
                live.expected -= 1
            await state.registry.release(live)
        score = result.score
        verdict = Prediction(name, result.anomaly_map, score, threshold).verdict  # the same rule as predict
        metrics.count_prediction(name, verdict)
        timings["queue"] = result.queue_s
        timings["inference"] = result.inference_s
        timings["total"] = time.perf_counter() - t0
        content = {
            "model": name,
            "model_version": served.version,
            "version_number": served.number,
            "score": score,
            "threshold": threshold,
            "verdict": verdict,
            "image": {"width": w, "height": h},
            "batch_size": result.batch_size,
            "timing_ms": {k: round(v * 1000.0, 3) for k, v in timings.items()},
        }
        state.results.add(content, source)
        if anomaly_map is not None:
            content["anomaly_map"] = anomaly_map
        return json_response(200, content)

    @app.get("/v1/models", summary="The served models", responses=ERROR_DOCS)
    async def list_models() -> dict[str, Any]:
        return {"models": [m.describe() for m in state.registry.served()], "limits": settings.public()}

    @app.get("/v1/models/{name}", summary="One served model", responses=ERROR_DOCS)
    async def get_model(name: str) -> dict[str, Any]:
        return state.registry.current(name).served.describe()

    @app.get("/healthz", summary="Liveness (no key needed)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: models loaded and batchers running", responses=ERROR_DOCS)
    async def readyz() -> Response:
        if not (state.ready and state.registry.running):
            raise ApiError(503, "not_ready", "the server is starting or stopping", {"Retry-After": "1"})
        return json_response(200, {"status": "ready", "models": state.registry.names()})

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
    add_station_routes(app, state.results, settings)
    add_correction_routes(app, state.registry, settings, metrics)
    return app


def _version() -> str:
    from patchknn._version import __version__

    return __version__
