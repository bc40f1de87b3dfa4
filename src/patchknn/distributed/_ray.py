"""Starting, joining and leaving Ray; Ray is optional (``pip install 'patchknn[distributed]'``).

Nothing here imports Ray at module import time, so the core package and the CLI work without it.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from patchknn.errors import ConfigError

# On Linux Ray binds its processes to the machine's network address by default. A local instance
# started by patchknn binds to 127.0.0.1 only (Ray's own switch for this is the variable below,
# read when Ray is imported).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray() -> Any:
    """``import ray``, or a clear :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigError(
            "this needs Ray, an optional dependency: pip install 'patchknn[distributed]'"
        ) from exc
    return ray


def local_only() -> None:
    """Make a Ray instance started by this process listen on 127.0.0.1 only.

    Sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (unless the user set it) before Ray is imported;
    if Ray was already imported, the constant it read is switched too.
    """
    if _LOCAL_ONLY_ENV in os.environ:
        return
    os.environ[_LOCAL_ONLY_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


@contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    quiet: bool = False,
) -> Iterator[Any]:
    """Use Ray inside a ``with`` block; yields the ``ray`` module.

    * Ray already initialised in this process (a notebook, a test session): used as it is and left
      running.
    * ``address`` given (``"auto"``, ``"ray://host:10001"``, ``"10.0.0.5:6379"``): join that
      cluster, disconnect at the end (the cluster keeps running).
    * otherwise: start a private local instance on 127.0.0.1 (``num_cpus``/``num_gpus`` default to
      what the machine has), stop it at the end.
    """
    if address is None:
        local_only()
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    level = logging.WARNING if quiet else logging.INFO
    if address is not None:
        ray.init(address=address, logging_level=level)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            logging_level=level,
        )
    try:
        yield ray
    finally:
        shutdown(ray)


def shutdown(ray: Any, fault_file: Any = None) -> None:
    """``ray.shutdown()``, leaving this process as it was before ``ray.init``.

    * Garbage is collected first: an object reference or actor handle in a reference cycle, freed
      by a later collection once Ray's core worker is gone, may crash the process.
    * Ray replaces Python's fault handler (:mod:`faulthandler`) by its own while it runs and leaves
      none at all after ``shutdown``: a later crash would print nothing. If a fault handler was
      enabled, it is enabled again, writing to ``fault_file`` (a file or descriptor; default
      ``sys.stderr``).
    """
    gc.collect()
    had_handler = faulthandler.is_enabled()
    ray.shutdown()
    if not had_handler:
        return
    file = sys.stderr if fault_file is None else fault_file
    try:
        faulthandler.disable()  # its flag still says enabled: enable() alone would do nothing
        faulthandler.enable(file=file, all_threads=True)
    except (AttributeError, ValueError, OSError):  # pragma: no cover - a stderr without a descriptor
        pass
