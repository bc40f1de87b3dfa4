"""The FastAPI application: endpoints, limits, errors, authentication and metrics wiring.

Endpoints (all but ``/healthz`` need ``Authorization: Bearer KEY`` when keys are configured):

* ``POST /v1/models/{name}/predict[?map=none|png|heatmap|overlay]``: one image, as a multipart upload
  in the field ``file`` or as the raw request body; answers the score, the verdict (``OK``/``NG``
  with the model's threshold, ``null`` without one), the model's name and the version that
  answered, timings and optionally the anomaly map as a base64 PNG: :mod:`~patchknn.server.routes_predict`.
* ``POST /v1/models/{name}/corrections`` (role ``admin``), ``POST .../rollback``,
  ``GET /v1/models/{name}/versions``: :mod:`patchknn.server.corrections`.
* ``GET /station`` (the inspection page), ``/static/...``, ``GET /v1/results``, ``GET /v1/watch...``:
  :mod:`patchknn.server.station`.
* ``GET /v1/models``, ``GET /v1/models/{name}``: the served models, their configuration and
  threshold: :mod:`~patchknn.server.routes_models`.
* ``GET /healthz`` (liveness, no key), ``GET /readyz`` (models loaded, batchers running),
  ``GET /metrics`` (Prometheus text format): :mod:`~patchknn.server.routes_health`.
* ``GET /docs``, ``/redoc``, ``/openapi.json``: OpenAPI documentation.

Each group of routes is an ``APIRouter`` in its own module; what they share (models, settings,
metrics, limits, pools) is one :class:`~patchknn.server.state.AppState` on ``app.state.patchknn``.
Every error answer is JSON ``{"error": {"code": ..., "message": ...}}`` (:mod:`~patchknn.server.handlers`);
see :data:`ERROR_CODES`.

Example:
    >>> from patchknn.server.settings import ServerSettings, load_models  # doctest: +SKIP
    >>> app = create_app(load_models(["bottle=models/bottle"]), ServerSettings())  # doctest: +SKIP
    >>> run(app, ServerSettings(port=8000))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from patchknn.server import corrections, routes_health, routes_models, routes_predict, station
from patchknn.server.auth import KeyChecker
from patchknn.server.errors import ERROR_CODES, ApiError
from patchknn.server.handlers import add_error_handlers
from patchknn.server.middleware import KEY_PARAMETERS, AuthMiddleware, MetricsMiddleware
from patchknn.server.running import log_config, run, server_config
from patchknn.server.settings import ServedModel, ServerSettings
from patchknn.server.state import AppState
from patchknn.server.uploads import prepare, sniff_format

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

_prepare = prepare  # the decode step under its former name (tests compare it with the estimator's)

DOCS_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the application's state (pools, batchers) for as long as it serves."""
    state: AppState = app.state.patchknn
    await state.start()
    try:
        yield
    finally:
        await state.stop()


def create_app(models: Mapping[str, ServedModel], settings: ServerSettings | None = None) -> FastAPI:
    """Build the application for already-loaded ``models`` (name -> :class:`ServedModel`)."""
    settings = settings or ServerSettings()
    state = AppState(models, settings)
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
    add_error_handlers(app)
    public = routes_health.PUBLIC_PATHS | station.PUBLIC_PATHS | (DOCS_PATHS if settings.public_docs else set())
    app.add_middleware(
        AuthMiddleware,
        checker=KeyChecker(settings.api_keys, settings.admin_keys),
        public=frozenset(public),
        metrics=state.metrics,
        public_prefixes=station.PUBLIC_PREFIXES,
    )
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    for router in (routes_predict.router, routes_models.router, routes_health.router, station.router):
        app.include_router(router)
    station.mount_static(app)
    app.include_router(corrections.router)
    app.openapi = functools.partial(openapi_schema, app, settings)  # type: ignore[method-assign]
    return app


def openapi_schema(app: FastAPI, settings: ServerSettings) -> dict[str, Any]:
    """The OpenAPI document of ``app``, with its bearer-key security scheme (made once)."""
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


def _version() -> str:
    from patchknn._version import __version__

    return __version__
