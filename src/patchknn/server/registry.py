"""The served models and their hot swap: which version of each model answers, and when an old one stops.

The registry holds one :class:`LiveModel` per model name: the :class:`ServedModel` (one version of
the model) and its own :class:`MicroBatcher`, so a batch only ever holds images of one version. A
request takes a reference to the current live model when it is admitted (:meth:`ModelRegistry.lease`)
and finishes on it, whatever happens meanwhile. :meth:`ModelRegistry.swap` starts a batcher for the
new version, then replaces the reference in one assignment on the event loop (atomic for every
request: one admitted before sees the old version, one admitted after sees the new one); the old
version's batcher is stopped once its last request has finished, so no request is dropped.

Example:
    >>> registry = ModelRegistry(models, make_batcher)       # doctest: +SKIP
    >>> async with registry.lease("bottle") as live:         # doctest: +SKIP
    ...     result = await live.batcher.submit(image)
    >>> await registry.swap("bottle", new_served)            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from patchknn.server.batching import MicroBatcher
from patchknn.server.errors import ApiError
from patchknn.server.settings import ServedModel

__all__ = ["BatcherFactory", "LiveModel", "ModelRegistry"]

log = logging.getLogger("patchknn.server")

BatcherFactory = Callable[["LiveModel"], MicroBatcher]
"""Makes the (not yet started) batcher of a live model; it may read ``live.expected``."""


@dataclass(eq=False)
class LiveModel:
    """One version of a model as it is being served.

    Attributes:
        served: the model version.
        batcher: its micro-batcher (only this version's images).
        expected: requests admitted for it and still being read or decoded (the batcher waits for
            company only while this is positive).
        in_flight: requests holding a reference to it.
        retired: replaced by a newer version; its batcher stops after its last request.
    """

    served: ServedModel
    batcher: MicroBatcher | None = None
    expected: int = 0
    in_flight: int = 0
    retired: bool = False
    stopped: bool = False


class ModelRegistry:
    """The current version of every served model (see the module docs)."""

    def __init__(self, models: Mapping[str, ServedModel], make_batcher: BatcherFactory) -> None:
        self._live = {name: LiveModel(served) for name, served in models.items()}
        self._make_batcher = make_batcher
        self._retiring: set[LiveModel] = set()
        self.swaps = 0

    # ------------------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        """The served model names, sorted."""
        return sorted(self._live)

    def served(self) -> list[ServedModel]:
        """The current version of every model, in the order given."""
        return [live.served for live in self._live.values()]

    def current(self, name: str) -> LiveModel:
        """The live model that a request admitted now would get (404 ``model_not_found`` if none)."""
        live = self._live.get(name)
        if live is None:
            names = ", ".join(sorted(self._live))
            raise ApiError(404, "model_not_found", f"no model named {name[:100]!r}; served models: {names}")
        return live

    @property
    def running(self) -> bool:
        """Whether every current model's batcher runs."""
        return all(live.batcher is not None and live.batcher.running for live in self._live.values())

    @property
    def queued(self) -> int:
        """Images waiting for a backbone call, over all versions still serving requests."""
        lives = [*self._live.values(), *self._retiring]
        return sum(live.batcher.queued for live in lives if live.batcher is not None)

    # ------------------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Start a batcher for every model."""
        for live in self._live.values():
            await self._start(live)

    async def stop(self) -> None:
        """Stop every batcher, the retiring ones too."""
        for live in [*self._live.values(), *self._retiring]:
            await self._stop(live)
        self._retiring.clear()

    async def _start(self, live: LiveModel) -> None:
        live.batcher = self._make_batcher(live)
        await live.batcher.start()

    async def _stop(self, live: LiveModel) -> None:
        if live.batcher is not None and not live.stopped:
            live.stopped = True
            await live.batcher.stop()

    def acquire(self, name: str) -> LiveModel:
        """Take the current version of ``name`` (404 for an unknown name); give it back with :meth:`release`."""
        live = self.current(name)
        live.in_flight += 1
        return live

    async def release(self, live: LiveModel) -> None:
        """Give back a version taken by :meth:`acquire`; a replaced one stops after its last request."""
        live.in_flight -= 1
        if live.retired and live.in_flight == 0:
            await self._retire(live)

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[LiveModel]:
        """The current version of ``name``, held until the block ends (404 for an unknown name)."""
        live = self.acquire(name)
        try:
            yield live
        finally:
            await self.release(live)

    async def swap(self, name: str, served: ServedModel) -> ServedModel:
        """Serve ``served`` as ``name`` from now on; returns the version it replaced.

        The new version's batcher is started first; requests already holding the old version finish
        on it, and its batcher stops after the last of them.
        """
        old = self.current(name)
        new = LiveModel(served)
        await self._start(new)
        self._live[name] = new  # the swap: one assignment, no await between the check and it
        self.swaps += 1
        old.retired = True
        log.info("model %s: now serving version %s (was %s)", name, _label(served), _label(old.served))
        if old.in_flight == 0:
            await self._retire(old)
        else:
            self._retiring.add(old)
        return old.served

    async def _retire(self, live: LiveModel) -> None:
        self._retiring.discard(live)
        await self._stop(live)


def _label(served: ServedModel) -> str:
    return served.version if served.number is None else f"{served.number} ({served.version})"
