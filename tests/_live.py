"""A live inspection server for tests: the hardened uvicorn server that `patchknn serve` runs
(:func:`patchknn.server.app.server_config`), on a free 127.0.0.1 port in a background thread."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from patchknn.server.settings import ServerSettings


class LiveServer:
    """uvicorn serving ``app`` on a free 127.0.0.1 port in a background thread."""

    def __init__(self, app, settings: ServerSettings | None = None) -> None:
        """``settings``: the ones the app was made with (their connection limits apply here too)."""
        import uvicorn

        from patchknn.server.app import server_config

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        settings = settings or app.state.patchknn.settings
        config = server_config(app, settings, log_config=None, access_log=False)  # the server `serve` runs
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)
