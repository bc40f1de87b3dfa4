"""The hot folder (``patchknn watch``): score every image that appears in a folder, once, when complete.

Modules:
    folder:   :class:`HotFolder`: finding files, the completeness rule, batches, results
    running:  :func:`watch`, :func:`load_model` (saved or exported), stopping on Ctrl-C / SIGTERM
    ledger:   :class:`Ledger`, ``results.jsonl`` appended and fsynced per image, read back on restart
    commands: ``register(app)`` adds ``patchknn watch`` to the CLI

File-system events come from ``watchdog`` (the ``watch`` extra: ``pip install 'patchknn[watch]'``);
without it, or with ``poll``, the folder is listed every few seconds. Importing this package loads
neither watchdog nor torch. docs/watch.md describes the behaviour and the files written.

Example:
    >>> from patchknn.watch import watch                                       # doctest: +SKIP
    >>> watch("camera/", "bottle.model", "results/", once=True)                # doctest: +SKIP
    WatchSummary(scored=12, ng=1, errors=0, already_done=0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from patchknn.watch.folder import HotFolder, WatchEvent, WatchSummary
    from patchknn.watch.ledger import Ledger, WatchError
    from patchknn.watch.running import load_model, watch

_WHERE = {
    "HotFolder": "folder", "WatchEvent": "folder", "WatchSummary": "folder",
    "Ledger": "ledger", "WatchError": "ledger",
    "load_model": "running", "watch": "running",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"patchknn.watch.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'patchknn.watch' has no attribute {name!r}")


__all__ = ["HotFolder", "Ledger", "WatchError", "WatchEvent", "WatchSummary", "load_model", "watch"]
