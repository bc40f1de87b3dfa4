"""ASGI middleware of the app: request metrics, and API keys (only in the ``Authorization`` header)."""

from __future__ import annotations

import re
import time
from typing import Any

from patchknn.server.auth import PREDICT, KeyChecker, bearer_token
from patchknn.server.errors import json_response
from patchknn.server.metrics import Metrics

__all__ = ["KEY_PARAMETERS", "ROLES_SCOPE_KEY", "AuthMiddleware", "MetricsMiddleware", "route_label"]

ROLES_SCOPE_KEY = "patchknn.roles"
"""Where :class:`AuthMiddleware` leaves the caller's roles in the ASGI scope (a ``frozenset``)."""

KEY_PARAMETERS = frozenset(
    {"api_key", "apikey", "api-key", "key", "token", "access_token", "auth", "authorization", "bearer",
     "password", "secret", "x-api-key"}
)
"""Query parameter names refused with 401 (a key belongs in the ``Authorization`` header, never in a URL)."""


def route_label(path: str) -> str:
    """The route template of ``path`` (``other`` for anything unknown): a bounded metrics label."""
    if path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/docs", "/redoc", "/openapi.json", "/",
                "/station", "/v1/results", "/v1/watch", "/v1/session"):
        return path
    if path.startswith("/static/"):
        return "/static/{file}"
    if re.fullmatch(r"/v1/models/[^/]+/(corrections|versions|rollback)", path):
        return "/v1/models/{name}/" + path.rsplit("/", 1)[1]
    if re.fullmatch(r"/v1/watch/[^/]+", path):
        return "/v1/watch/{folder}"
    if re.fullmatch(r"/v1/watch/[^/]+/[^/]+", path):
        return "/v1/watch/{folder}/{file}"
    if re.fullmatch(r"/v1/models/[^/]+/predict", path):
        return "/v1/models/{name}/predict"
    if re.fullmatch(r"/v1/models/[^/]+", path):
        return "/v1/models/{name}"
    return "other"


_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


class MetricsMiddleware:
    """Counts every request by route template, method and status (the series stay bounded)."""

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
                route_label(scope.get("path", "")),
                method if method in _METHODS else "other",
                status,
                time.perf_counter() - start,
            )


class AuthMiddleware:
    """401 for every path but the public ones when keys are configured; keys are never logged."""

    def __init__(
        self,
        app: Any,
        checker: KeyChecker,
        public: frozenset[str],
        metrics: Metrics,
        public_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.checker = checker
        self.public = public
        self.public_prefixes = public_prefixes
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
        elif not self.checker.enabled or self._is_public(scope.get("path", "")):
            # without keys (loopback only) every client may predict, and nobody may change a model: a web
            # page open on the station PC could otherwise post a correction to 127.0.0.1 (no preflight)
            scope[ROLES_SCOPE_KEY] = frozenset() if self.checker.enabled else frozenset({PREDICT})
            await self.app(scope, receive, send)
            return
        else:
            message, roles = self._check_header(scope)
            if message is None:
                scope[ROLES_SCOPE_KEY] = roles
                await self.app(scope, receive, send)
                return
        self.metrics.count_error("unauthorized")
        response = json_response(
            401,
            {"error": {"code": "unauthorized", "message": message}},
            {"WWW-Authenticate": 'Bearer realm="patchknn"'},
        )
        await response(scope, receive, send)

    def _is_public(self, path: str) -> bool:
        """The public paths, and everything under a public prefix (the page's bundled assets)."""
        return path in self.public or path.startswith(self.public_prefixes)

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

    def _check_header(self, scope: dict[str, Any]) -> tuple[str | None, frozenset[str]]:
        """The 401 message for the request's headers (None when its key is valid) and the key's roles."""
        headers = scope.get("headers", [])
        values = [v for k, v in headers if k == b"authorization"]
        token = bearer_token(values[0]) if len(values) == 1 else None
        if token is None:
            other = sorted({k.decode("latin-1") for k, _ in headers if k in (b"x-api-key", b"api-key", b"apikey")})
            if other:
                return (
                    f"missing API key: the header {other[0]!r} is not read; send the key as "
                    "'Authorization: Bearer <key>'"
                ), frozenset()
            return "missing API key: send the header 'Authorization: Bearer <key>'", frozenset()
        roles = self.checker.roles(token)
        if not roles:
            return "invalid API key", roles
        return None, roles
