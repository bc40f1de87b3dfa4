"""Running a hot folder: loading the model, the ``watch`` function, stopping on Ctrl-C / SIGTERM."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from patchknn.watch.folder import HotFolder, WatchSummary


def load_model(
    path: str | os.PathLike[str], *, device: str = "cpu", batch_size: int = 16, threshold: float | None = None,
    **limits: Any,
) -> tuple[Any, str]:
    """A saved model (``patchknn fit``) or an exported folder (``patchknn export``) loaded for watching,
    and its version (:func:`patchknn.server.settings.model_version`, a fingerprint of its ``patchknn.json``).

    Images are decoded by the hot folder, so the model gets no decoding workers; ``threshold``
    replaces the model's decision threshold, as ``patchknn predict --threshold`` does; ``limits``
    (``max_pixels``) go to the loader.
    """
    from patchknn.runtime import is_exported
    from patchknn.server.settings import model_version

    if is_exported(path):  # onnxruntime / OpenVINO, no torch
        from patchknn.runtime import load as load_exported

        model: Any = load_exported(path, batch_size=batch_size, on_error="skip", **limits)
    else:
        from patchknn.model import PatchKNN

        model = PatchKNN.load(path, device=device, batch_size=batch_size, num_workers=0, on_error="skip",
                              progress=False, **limits)
    if threshold is not None:
        model.threshold_ = float(threshold)
    return model, model_version(path)


def watch(
    input_dir: str | os.PathLike[str], model: Any, output: str | os.PathLike[str], *, once: bool = False,
    device: str = "cpu", **options: Any,
) -> WatchSummary:
    """Score every image that appears in ``input_dir`` with ``model`` into ``output`` (see :class:`HotFolder`).

    Args:
        model: a fitted model, or the path of a saved or exported one (loaded on ``device``).
        once: score what is there (waiting for files still being written) and return; else watch
            until :meth:`HotFolder.stop` or ``KeyboardInterrupt``.
        options: those of :class:`HotFolder`.

    Example:
        >>> from patchknn.watch import watch                                   # doctest: +SKIP
        >>> watch("camera/", "bottle.model", "results/", once=True).scored     # doctest: +SKIP
        12
    """
    if isinstance(model, str | os.PathLike):
        model, version = load_model(model, device=device, batch_size=options.pop("batch_size", None) or 16)
        options.setdefault("model_version", version)
    hot = HotFolder(input_dir, output, model, **options)
    with stop_on_signals(hot):
        return hot.run(once=once)


@contextmanager
def stop_on_signals(hot: HotFolder) -> Iterator[None]:
    """In the main thread, Ctrl-C and SIGTERM ask ``hot`` to stop after its current batch (the lines
    written are on disk) instead of interrupting it; the previous handlers are restored after."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None]
    before = {s: signal.getsignal(s) for s in wanted}

    def ask_to_stop(*_: Any) -> None:
        if hot.stop_event.is_set():  # asked twice: stop now (the line being written may be lost)
            raise KeyboardInterrupt
        hot.stop()

    for s in wanted:
        signal.signal(s, ask_to_stop)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


__all__ = ["load_model", "stop_on_signals", "watch"]
