"""Micro-batching: concurrent requests for one model share one backbone call.

Each served model has a :class:`MicroBatcher`, an asyncio task that takes the first waiting image,
then collects more until it has ``max_batch`` of them or ``max_delay_ms`` have passed, stacks them
into one ``(B, 3, S, S)`` tensor and makes **one** :meth:`PatchKNN.predict_batch` call (in a worker
thread, so the event loop keeps accepting requests): the one path from a decoded batch to
predictions that :meth:`PatchKNN.predict` takes too, so an answer equals ``predict`` on the same
image (up to float32 rounding: a convolution's result can differ in the last bits with the batch
size, about 1e-6 relative).

The batcher only waits for company when more requests for its model are on their way (admitted and
still being read or decoded: ``expected()``); a lone request on a quiet line is scored at once, and
the delay is paid only when it can buy a bigger batch. While a batch runs, new requests queue up and
form the next batch, so under load batches fill without any waiting.

A request that gave up (timeout, client gone) before its batch ran is left out of it.

Example:
    >>> batcher = MicroBatcher("bottle", model, max_batch=8, max_delay_s=0.005)  # doctest: +SKIP
    >>> await batcher.start(); result = await batcher.submit(image_tensor)      # doctest: +SKIP
    >>> result.score, result.batch_size                                        # doctest: +SKIP
    (2.71, 5)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["MicroBatcher", "ScoredImage", "score_batch"]


@dataclass
class ScoredImage:
    """One image's result from a batch.

    Attributes:
        score: the image score (as :attr:`Prediction.score`).
        anomaly_map: ``(S, S)`` float32 map at the model's input size (as ``predict`` by default).
        batch_size: images in the backbone call this one was part of.
        queue_s: seconds between submission and the start of its batch.
        inference_s: seconds the batch took (backbone, search, maps).
    """

    score: float
    anomaly_map: np.ndarray
    batch_size: int
    queue_s: float
    inference_s: float


def score_batch(model: Any, images: torch.Tensor) -> list[tuple[float, np.ndarray]]:
    """``(B, 3, S, S)`` uint8 -> ``[(score, map), ...]`` through :meth:`PatchKNN.predict_batch`, the
    same path as :meth:`PatchKNN.predict` (image score options, TTA, ensembles and all). A
    non-finite result comes back as ``(nan, map)`` for the app to refuse."""
    size = int(model.config.image_size)
    out = []
    for pred in model.predict_batch(images):
        if pred.error is not None:
            out.append((float("nan"), np.full((size, size), np.nan, dtype=np.float32)))
        else:
            out.append((float(pred.score), pred.anomaly_map))
    return out


@dataclass
class _Job:
    image: torch.Tensor
    future: asyncio.Future[ScoredImage]
    submitted: float


class MicroBatcher:
    """Collects images for one model and scores them in batches (see the module docs).

    Args:
        name: the model's name (metrics label).
        model: the fitted model.
        max_batch: most images per backbone call.
        max_delay_s: longest wait for more images once the first has arrived.
        executor: where the model runs (one thread: one backbone call at a time); ``None`` = the
            loop's default executor.
        expected: returns how many more requests for this model are on their way; the batcher
            waits (up to ``max_delay_s``) only while that is positive. ``None`` = always wait.
        on_batch: called with ``(batch_size, seconds)`` after each backbone call (metrics).
    """

    def __init__(
        self,
        name: str,
        model: Any,
        *,
        max_batch: int = 8,
        max_delay_s: float = 0.005,
        executor: Executor | None = None,
        expected: Callable[[], int] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.max_batch = int(max_batch)
        self.max_delay_s = float(max_delay_s)
        self.executor = executor
        self.expected = expected
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def start(self) -> None:
        """Start the batching task on the running loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name=f"patchknn-batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the task; images still waiting get an error."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, image: torch.Tensor) -> ScoredImage:
        """Score one ``(3, S, S)`` uint8 image; returns when its batch is done."""
        if self._queue is None or not self.running:
            raise RuntimeError(f"the batcher of model {self.name!r} is not running")
        future: asyncio.Future[ScoredImage] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(image, future, time.perf_counter()))
        return await future

    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        queue = self._queue
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or (self.expected is not None and self.expected() <= 0):
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), timeout=min(remaining, 0.001)))
            except TimeoutError:
                continue  # look at expected() again, then wait for the rest of the delay
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [job for job in batch if not job.future.done()]
            if not live:
                continue
            images = torch.stack([job.image for job in live])
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, score_batch, self.model, images)
            except asyncio.CancelledError:
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request, loop goes on
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - start
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(live), seconds)
            for job, (score, amap) in zip(live, results, strict=True):
                if not job.future.done():
                    job.future.set_result(ScoredImage(score, amap, len(live), start - job.submitted, seconds))
