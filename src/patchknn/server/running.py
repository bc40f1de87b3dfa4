"""Running the app: uvicorn with the guarded protocol (:mod:`patchknn.server.protocol`) and one log format."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from patchknn.server.protocol import ConnectionGuard, guarded_protocol
from patchknn.server.settings import ServerSettings

__all__ = ["log_config", "run", "server_config"]


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

    state = getattr(app.state, "patchknn", None)
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

    uvicorn.Server(server_config(app, settings, log_level=log_level, access_log=access_log)).run()
