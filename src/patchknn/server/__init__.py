"""The inspection server: saved models behind an HTTP API (``patchknn serve``), secure by default.

Needs the ``server`` extra (``pip install 'patchknn[server]'``: FastAPI, uvicorn, python-multipart, Jinja2).
Importing this package (or :mod:`patchknn.server.commands`, which the CLI does) does not import
them; :mod:`patchknn.server.app` does.

Modules:
    settings:  :class:`ServerSettings`, model specs (``NAME=PATH``), loading the models (pure Python)
    auth:      API keys and their roles (file / ``PATCHKNN_API_KEYS`` / ``PATCHKNN_ADMIN_KEYS``),
               constant-time checks, the loopback rule
    batching:  :class:`MicroBatcher`, concurrent requests -> one backbone call
    memory:    the decode memory budget: an upload's decoding cost read from its header
    protocol:  uvicorn's h11 protocol with a header deadline, a cap on connections without headers,
               JSON for the parser's errors and an access log without query strings
    metrics:   Prometheus metrics (prometheus-client, one registry per app)
    errors:    error codes, :class:`ApiError`, the JSON error body
    uploads:   reading the body, multipart, content sniffing, decoding within the budget
    middleware: request metrics, API keys (header only; keys in URLs refused)
    responses: the predict answer's schema, anomaly-map encoding
    registry:  the current version of each model, leases and the hot swap
    state:     :class:`AppState`, what the routes share (registry, settings, metrics, admission,
               memory budget, recent results, pools), on ``app.state.patchknn``; :data:`StateDep`
    handlers:  the exception handlers (every error answer JSON, counted)
    routes_predict: ``POST /v1/models/{name}/predict``
    routes_models:  ``GET /v1/models``, ``GET /v1/models/{name}``
    routes_health:  ``GET /healthz``, ``/readyz``, ``/metrics``
    station:   the inspection web page (Jinja2 template + bundled static assets), recent results,
               camera (watch) folders
    corrections: ``POST .../corrections`` (admin): partial_fit -> new version -> hot swap; rollback; versions
    running:   ``uvicorn.Config`` with the guarded protocol (:func:`server_config`), :func:`run`
    app:       :func:`create_app`: the state, the handlers, the middleware and the routers above
               (re-exports the names above it used to hold)
    commands:  ``register(app)`` adds ``patchknn serve`` to the CLI

Example:
    >>> from patchknn.server.settings import ServerSettings   # doctest: +SKIP
    >>> from patchknn.server.settings import load_models  # doctest: +SKIP
    >>> from patchknn.server.app import create_app  # doctest: +SKIP
    >>> app = create_app(load_models(["bottle=models/bottle"]), ServerSettings())  # doctest: +SKIP
"""

from __future__ import annotations

__all__ = ["INSTALL_HINT", "missing_dependencies"]

INSTALL_HINT = "pip install 'patchknn[server]'  (FastAPI, uvicorn, python-multipart and Jinja2)"


def missing_dependencies() -> list[str]:
    """Names of the server extra's packages that cannot be imported here."""
    import importlib.util

    wanted = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python-multipart": "python_multipart", "jinja2": "jinja2"}
    missing = []
    for dist, module in wanted.items():
        found = importlib.util.find_spec(module) is not None
        if not found and module == "python_multipart":  # older releases install only `multipart`
            found = importlib.util.find_spec("multipart") is not None
        if not found:
            missing.append(dist)
    return missing
