"""The HTTP connection layer under the app: header deadline, connection cap, JSON errors, a log without secrets.

uvicorn's h11 protocol, subclassed (:func:`guarded_protocol`), adds what the ASGI app cannot do,
because it only sees a request once its headers are complete:

* **Header deadline**: a connection must deliver a complete request head (request line and
  headers) within ``header_timeout_s`` of connecting, or of the end of its previous answer on a
  kept-alive connection; otherwise it gets ``408`` (JSON) and is closed. h11 itself has no such
  timer, and uvicorn's ``timeout_keep_alive`` stops counting at the first byte, so a client sending
  its headers one byte a second would otherwise hold the connection for ever.
* **Cap on unfinished heads**: at most ``max_pending_connections`` connections may be waiting for
  their headers at once (new connections and idle kept-alive ones); one more is answered ``503``
  (JSON, ``Retry-After``) and closed at once. This bounds what slow-header clients can hold (file
  descriptors, buffers) without any key, since authentication needs the headers.
* **Header size**: h11's ``max_incomplete_event_size`` (``max_header_bytes``): a larger head is
  answered ``431``.
* **JSON for the parser's errors**: what h11 refuses (a bad ``Content-Length`` such as ``-1`` or
  ``abc``, a non-ASCII or malformed request line, a malformed header line, an unsupported
  ``Transfer-Encoding``) is answered ``{"error": {"code": ..., "message": ...}}`` like every app
  error, instead of uvicorn's plain-text ``400``. The message names the problem, never the
  offending bytes (a bad header line may be the ``Authorization`` line).
* **No query strings in the access log**: the access log line keeps the path and the ``map``
  parameter; any other query is written as ``?[redacted]``, so a key sent as ``?api_key=...`` by
  mistake is not logged (the app refuses such requests with 401, see ``app.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionGuard", "guarded_protocol", "json_response_bytes", "redact_target"]

log = logging.getLogger("patchknn.server")

_SAFE_QUERY = {"map": {"none", "png", "heatmap"}}
_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            501: "Not Implemented", 503: "Service Unavailable"}


def redact_target(target: str) -> str:
    """``path?query`` with every query parameter but a valid ``map`` replaced by ``[redacted]``.

    Example:
        >>> redact_target("/v1/models?api_key=s3cret"), redact_target("/v1/models/a/predict?map=png")
        ('/v1/models?[redacted]', '/v1/models/a/predict?map=png')
    """
    path, sep, query = target.partition("?")
    if not sep:
        return target
    kept: list[str] = []
    hidden = False
    for name, value in parse_qsl(query, keep_blank_values=True):
        if value in _SAFE_QUERY.get(name, ()):
            kept.append(f"{name}={value}")
        else:
            hidden = True
    if hidden or not kept and query:
        kept.append("[redacted]")
    return f"{path}?{'&'.join(kept)}" if kept else path


def json_response_bytes(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete ``HTTP/1.1`` answer with the JSON error body, ending the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "cache-control: no-store",
        "connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


@dataclass
class ConnectionGuard:
    """Limits shared by all connections of one server, and what they refused.

    Attributes:
        header_timeout_s: seconds a connection has to deliver a complete request head.
        max_pending_connections: connections waiting for their request head at once.
        retry_after_s: ``Retry-After`` sent with the 503 for one connection too many.
        count_error: called with the error code of every answer this layer sends (metrics).
    """

    header_timeout_s: float = 10.0
    max_pending_connections: int = 100
    retry_after_s: int = 1
    count_error: Any = None
    pending: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def note(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1
        if self.count_error is not None:
            self.count_error(code)


class _RedactingAccessLog:
    """Wraps ``uvicorn.access``: the request target is logged through :func:`redact_target`."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def hasHandlers(self) -> bool:  # noqa: N802 - logging's name
        return self._logger.hasHandlers()

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if len(args) >= 3 and isinstance(args[2], str):
            args = (*args[:2], redact_target(args[2]), *args[3:])
        self._logger.info(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class _TrackedConnection(h11.Connection):
    """An h11 connection that tells its protocol when a request head is complete, and keeps its last error."""

    def __init__(self, max_header_bytes: int, on_head: Any) -> None:
        super().__init__(h11.SERVER, max_header_bytes)
        self.max_header_bytes = max_header_bytes
        self._on_head = on_head
        self.last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise
        if isinstance(event, h11.Request):
            self._on_head()
        return event


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the module's guards; made per server by :func:`guarded_protocol`."""

    guard: ConnectionGuard = ConnectionGuard()

    def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _TrackedConnection(config.h11_max_incomplete_event_size or 16 * 1024, self._head_complete)
        self.access_logger = _RedactingAccessLog(self.access_logger)  # type: ignore[assignment]
        self._head_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = False

    # -------------------------------------------------------------------------- the header deadline
    def _arm(self) -> None:
        if not self._awaiting_head:
            self._awaiting_head = True
            self.guard.pending += 1
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.guard.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._awaiting_head:
            self._awaiting_head = False
            self.guard.pending -= 1

    def _head_complete(self) -> None:
        self._disarm()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self.transport.is_closing():
            self._disarm()
            return
        self._disarm()
        self.guard.note("header_timeout")
        if self.conn.their_state is h11.IDLE:
            self._answer_and_close(
                408,
                "header_timeout",
                f"the request line and headers did not arrive within {self.guard.header_timeout_s:g} s",
            )
        else:  # stuck in a body after its answer was sent: nothing more to say
            self.transport.close()

    def _answer_and_close(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        if not self.transport.is_closing():
            self.transport.write(json_response_bytes(status, code, message, headers))
            self.transport.close()

    # -------------------------------------------------------------------------- uvicorn's hooks
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.guard.pending >= self.guard.max_pending_connections:
            self.guard.note("too_many_connections")
            self._answer_and_close(
                503,
                "too_many_connections",
                f"too many connections are waiting to send their request headers (at most "
                f"{self.guard.max_pending_connections}); retry in {self.guard.retry_after_s} s",
                {"retry-after": str(self.guard.retry_after_s)},
            )
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # Armed before uvicorn looks at pipelined data (which may complete the next head at once).
        if not self.transport.is_closing():
            self._arm()
        super().on_response_complete()

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn logs two warnings for every Upgrade header (advice to install a WebSocket library); this
        # server has no WebSocket endpoint, so the request is simply served as HTTP.
        log.debug("Upgrade header ignored (no WebSocket endpoints)")

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        exc = self.conn.last_error
        hint = getattr(exc, "error_status_hint", 400) if exc is not None else 400
        # h11's message without what follows a colon: that part quotes the offending bytes.
        reason = str(exc).split(":", 1)[0].strip() if exc is not None else ""
        if hint == 431:
            self.guard.note("headers_too_large")
            limit = self.conn.max_header_bytes
            self._answer_and_close(
                431, "headers_too_large", f"the request line and headers are larger than {limit:,} bytes"
            )
        elif hint == 501:
            self.guard.note("not_implemented")
            self._answer_and_close(
                501, "not_implemented", f"not supported by this server ({reason or 'unknown'}); use Content-Length "
                "or Transfer-Encoding: chunked",
            )
        else:
            self.guard.note("bad_request")
            detail = f" ({reason})" if reason else ""
            self._answer_and_close(
                400, "bad_request",
                f"malformed HTTP request{detail}: check the request line (ASCII only, percent-encode the "
                "rest), the header lines and Content-Length (a non-negative integer)",
            )


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class bound to ``guard`` (pass it as ``uvicorn.Config(http=...)``)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
