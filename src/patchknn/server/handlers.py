"""The application's exception handlers: every error answer is the JSON body of
:func:`patchknn.server.errors.json_response` (``{"error": {"code": ..., "message": ...}}``), and
each is counted in the metrics by its code."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from patchknn.server.errors import ApiError, json_response
from patchknn.server.state import app_state

__all__ = ["add_error_handlers", "error_response"]

log = logging.getLogger("patchknn.server")


def error_response(request: Request, exc: ApiError) -> JSONResponse:
    """``exc`` as the JSON error answer, counted in the application's metrics."""
    app_state(request).metrics.count_error(exc.code)
    return json_response(exc.status, {"error": {"code": exc.code, "message": exc.message}}, exc.headers)


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(request, exc)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal_error")
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no endpoint {request.method} {request.url.path[:200]}; see /docs"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path[:200]}"
    return error_response(request, ApiError(exc.status_code, code, message, getattr(exc, "headers", None) or {}))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
    return error_response(request, ApiError(422, "validation_error", f"invalid request: {problems}"[:1000]))


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path[:200])
    return error_response(request, ApiError(500, "internal_error", "unexpected server error; it has been logged"))


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as JSON (its state must be on ``app.state.patchknn``)."""
    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)
