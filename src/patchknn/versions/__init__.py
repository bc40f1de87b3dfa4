"""Model versions: a model folder that keeps every version of its model, with who, when and what
(the implementation and the folder layout: :mod:`patchknn.versions.store`).

Importing this package imports nothing heavy (PEP 562): the CLI registers ``partial-fit``,
``history`` and ``rollback`` from :mod:`patchknn.versions.commands` without numpy at start.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers; at run time see __getattr__ below
    from patchknn.versions.store import (
        HISTORY_FILE,
        VERSIONS_DIR,
        VersionError,
        VersionInfo,
        current_version,
        history,
        list_versions,
        load_version,
        rollback,
        save_version,
        version_path,
    )

__all__ = [
    "HISTORY_FILE",
    "VERSIONS_DIR",
    "VersionError",
    "VersionInfo",
    "current_version",
    "history",
    "list_versions",
    "load_version",
    "rollback",
    "save_version",
    "version_path",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from patchknn.versions import store

        return getattr(store, name)
    raise AttributeError(f"module 'patchknn.versions' has no attribute {name!r}")
