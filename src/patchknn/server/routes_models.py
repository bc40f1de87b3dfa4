"""``GET /v1/models`` and ``GET /v1/models/{name}``: the served models, their configuration,
threshold and version, and the server's public limits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from patchknn.server.errors import ERROR_DOCS
from patchknn.server.state import StateDep

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/models", summary="The served models", responses=ERROR_DOCS)
async def list_models(state: StateDep) -> dict[str, Any]:
    return {"models": [m.describe() for m in state.registry.served()], "limits": state.settings.public()}


@router.get("/v1/models/{name}", summary="One served model", responses=ERROR_DOCS)
async def get_model(name: str, state: StateDep) -> dict[str, Any]:
    return state.registry.current(name).served.describe()
