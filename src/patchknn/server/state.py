"""The state one server application shares between its routes: :class:`AppState`.

:func:`patchknn.server.app.create_app` makes one :class:`AppState` and keeps it on the FastAPI
application as ``app.state.patchknn``; a route receives it as a parameter annotated
:data:`StateDep` (FastAPI's dependency injection, :func:`app_state`), so no route closes over
variables of ``create_app``. The state holds the models (:class:`ModelRegistry`), the settings,
the Prometheus metrics, the admission limit (:class:`Admission`), the decode memory budget, the
recent results (:class:`ResultLog`), the thread pools of decoding and scoring (made by
:meth:`AppState.start`) and the per-model locks of corrections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import Depends, Request

from patchknn.server.batching import MicroBatcher
from patchknn.server.errors import ApiError
from patchknn.server.memory import MemoryBudget
from patchknn.server.metrics import Metrics
from patchknn.server.registry import LiveModel, ModelRegistry
from patchknn.server.settings import ServedModel, ServerSettings

__all__ = ["RESULT_LOG_SIZE", "Admission", "AppState", "ResultLog", "StateDep", "app_state"]

log = logging.getLogger("patchknn.server")

RESULT_LOG_SIZE = 1000


class Admission:
    """At most ``max_concurrency`` requests in progress, ``max_queue`` more waiting, the rest 503."""

    def __init__(self, max_concurrency: int, max_queue: int, retry_after_s: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.active = 0
        self.waiting = 0
        self._sem: asyncio.Semaphore | None = None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a processing slot for the ``async with`` block (503 ``server_busy`` when full)."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        if self.active >= self.max_concurrency and self.waiting >= self.max_queue:
            raise ApiError(
                503,
                "server_busy",
                f"the server is at capacity ({self.active} requests in progress, {self.waiting} waiting); "
                f"retry in {self.retry_after_s} s",
                {"Retry-After": str(self.retry_after_s)},
            )
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._sem.release()


class ResultLog:
    """The most recent predictions of the server, in memory (thread-safe, bounded)."""

    FIELDS = ("model", "model_version", "version_number", "score", "threshold", "verdict")

    def __init__(self, size: int = RESULT_LOG_SIZE) -> None:
        self._items: deque[dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self._next = 1

    def add(self, answer: dict[str, Any], source: str = "") -> dict[str, Any]:
        """Record one prediction answer (its score, verdict, version and total time)."""
        record = {k: answer.get(k) for k in self.FIELDS}
        record["time"] = time.time()
        record["source"] = source[:200]
        record["total_ms"] = (answer.get("timing_ms") or {}).get("total")
        with self._lock:
            record["id"] = self._next
            self._next += 1
            self._items.append(record)
        return record

    def query(
        self,
        model: str | None = None,
        verdict: str | None = None,
        since: float | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Newest first: results of ``model`` with ``verdict`` at or after ``since`` (epoch seconds)
        and with an id above ``after``, at most ``limit``."""
        with self._lock:
            items = list(self._items)
        out = []
        for record in reversed(items):
            if record["id"] <= after or (since is not None and record["time"] < since):
                break
            if (model is None or record["model"] == model) and (verdict is None or record["verdict"] == verdict):
                out.append(record)
                if len(out) >= limit:
                    break
        return out


class AppState:
    """Everything the routes of one application share (see the module docs).

    Args:
        models: the already-loaded models, name -> :class:`ServedModel` (at least one).
        settings: the server's settings.
    """

    def __init__(self, models: Mapping[str, ServedModel], settings: ServerSettings) -> None:
        if not models:
            raise ValueError("create_app needs at least one model")
        self.settings = settings
        self.metrics = Metrics()
        self.registry = ModelRegistry(models, self.make_batcher)
        self.admission = Admission(settings.max_concurrency, settings.max_queue, settings.retry_after_s)
        self.budget = MemoryBudget(settings.memory_budget_bytes)
        self.results = ResultLog()
        self.decode_pool: ThreadPoolExecutor | None = None
        self.score_pool: ThreadPoolExecutor | None = None
        self.ready = False
        self.correction_locks: dict[str, asyncio.Lock] = {}
        """One lock per model name: its corrections and rollbacks run one at a time."""
        for served in self.registry.served():
            self.metrics.add_model_info(served.name, served.version, str(served.model.config.backbone))
        self._add_gauges()

    def make_batcher(self, live: LiveModel) -> MicroBatcher:
        """The (not yet started) micro-batcher of one model version, scoring in :attr:`score_pool`."""
        name = live.served.name
        return MicroBatcher(
            name,
            live.served.model,
            max_batch=self.settings.max_batch,
            max_delay_s=self.settings.max_delay_ms / 1000.0,
            executor=self.score_pool,
            expected=lambda: live.expected,
            on_batch=lambda n, s: self.metrics.observe_batch(name, n, s),
        )

    def _add_gauges(self) -> None:
        gauges = [
            ("patchknn_requests_in_progress", "Requests holding a processing slot.", lambda: self.admission.active),
            ("patchknn_requests_queued", "Requests waiting for a processing slot.", lambda: self.admission.waiting),
            ("patchknn_batch_queue_images", "Decoded images waiting for a backbone call.",
             lambda: self.registry.queued),
            ("patchknn_ready", "1 when the server accepts predictions.", lambda: float(self.ready)),
            ("patchknn_model_swaps", "Model versions swapped in by corrections since start.",
             lambda: self.registry.swaps),
            ("patchknn_decode_memory_bytes",
             "Decode memory reserved by images being decoded (counted from their headers).",
             lambda: self.budget.used),
            ("patchknn_decode_memory_waiting", "Requests waiting for decode memory.", lambda: self.budget.waiting),
            ("patchknn_decode_memory_waits", "Requests that had to wait for decode memory, in all.",
             lambda: self.budget.waits),
        ]
        for name, help_text, read in gauges:
            self.metrics.gauge(name, help_text, read)

    async def start(self) -> None:
        """Make the thread pools, start every model's batcher and accept predictions."""
        self.decode_pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="patchknn-decode")
        self.score_pool = ThreadPoolExecutor(1, thread_name_prefix="patchknn-score")
        await self.registry.start()
        self.ready = True
        keys = self.settings.api_keys
        log.info(
            "patchknn server ready: models %s; auth %s",
            ", ".join(f"{m.name} ({m.version})" for m in self.registry.served()),
            f"{len(keys)} API key(s)" if keys else "off (loopback only)",
        )

    async def stop(self) -> None:
        """Refuse predictions, stop the batchers and the thread pools."""
        self.ready = False
        await self.registry.stop()
        for pool in (self.decode_pool, self.score_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


def app_state(request: Request) -> AppState:
    """The :class:`AppState` of the application serving ``request``."""
    state: AppState = request.app.state.patchknn
    return state


StateDep = Annotated[AppState, Depends(app_state)]
"""A route parameter annotated with this receives the application's :class:`AppState`."""
