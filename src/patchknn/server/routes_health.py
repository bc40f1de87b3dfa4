"""``GET /healthz`` (liveness, no key), ``GET /readyz`` (models loaded, batchers running) and
``GET /metrics`` (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from patchknn.server.errors import ERROR_DOCS, ApiError, json_response
from patchknn.server.metrics import CONTENT_TYPE
from patchknn.server.state import StateDep

__all__ = ["PUBLIC_PATHS", "router"]

PUBLIC_PATHS = frozenset({"/healthz"})
"""The paths of this router served without a key."""

router = APIRouter()


@router.get("/healthz", summary="Liveness (no key needed)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: models loaded and batchers running", responses=ERROR_DOCS)
async def readyz(state: StateDep) -> Response:
    if not (state.ready and state.registry.running):
        raise ApiError(503, "not_ready", "the server is starting or stopping", {"Retry-After": "1"})
    return json_response(200, {"status": "ready", "models": state.registry.names()})


@router.get("/metrics", summary="Prometheus metrics (text exposition format)")
async def metrics_endpoint(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})
