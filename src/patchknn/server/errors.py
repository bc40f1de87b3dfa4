"""The server's error answers: codes, the exception the endpoints raise, the JSON body and its schema.

Every error answer is JSON ``{"error": {"code": ..., "message": ...}}`` with a ``Cache-Control:
no-store`` header; :data:`ERROR_CODES` lists the codes (those answered below the app, by
:mod:`patchknn.server.protocol`, too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from patchknn.errors import ImageError

__all__ = ["ERROR_CODES", "ERROR_DOCS", "ApiError", "ErrorResponse", "image_error", "json_response"]

ERROR_CODES: dict[str, tuple[int, str]] = {
    "bad_request": (400, "malformed request (e.g. a bad Content-Length, a non-ASCII request line)"),
    "empty_body": (400, "no image in the request"),
    "invalid_multipart": (400, "the multipart body cannot be parsed, or has more than one field 'file'"),
    "unauthorized": (401, "no API key, not a valid one, or a key outside the Authorization header"),
    "forbidden": (403, "the API key lacks the role this endpoint needs (corrections need 'admin')"),
    "not_found": (404, "no such endpoint"),
    "folder_not_found": (404, "no watch folder of that name, or no such image in it"),
    "model_not_found": (404, "no model of that name is served"),
    "method_not_allowed": (405, "wrong HTTP method for the endpoint"),
    "not_versioned": (409, "the model was not loaded from a versioned folder, or cannot be corrected"),
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


class ApiError(Exception):
    """An error answer: ``status``, ``code`` (see :data:`ERROR_CODES`), ``message``."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable error code.", examples=["unsupported_media_type"])
    message: str = Field(description="What went wrong and what is accepted.")


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_DOCS = {
    status: {"model": ErrorResponse, "description": "; ".join(m for c, (s, m) in ERROR_CODES.items() if s == status)}
    for status in sorted({s for s, _ in ERROR_CODES.values()})
}
"""OpenAPI ``responses`` for every error status."""


def json_response(status: int, content: Any, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """``content`` as JSON with ``status``, never cached."""
    base = {"Cache-Control": "no-store"}
    return JSONResponse(content, status_code=status, headers={**base, **(headers or {})})


def image_error(exc: ImageError, max_pixels: int) -> ApiError:
    reason = exc.reason
    if "max_pixels" in reason or "decompression" in reason or "memory" in reason:
        return ApiError(
            413,
            "image_too_large",
            f"the image is too large: {reason} (this server accepts at most {max_pixels:,} pixels)",
        )
    # The first bytes named an accepted format (checked before), so anything else is a damaged image.
    return ApiError(422, "invalid_image", f"the image cannot be used: {reason}")
