"""Saved-model kinds: which class builds and loads a model directory of a given ``kind``.

A plugin registry, like the backbones': the estimator (:mod:`patchknn.model`) looks a kind up here
and never imports its subclasses; :mod:`patchknn.ensemble` registers ``"ensemble"`` when imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from patchknn.model import PatchKNN

__all__ = ["BUILTIN_KINDS", "MODEL_KINDS", "model_kind", "register_model_kind"]

#: Saved-model kinds beyond a single model: the ``kind`` in ``patchknn.json`` -> the class that
#: builds and loads it. A plugin registry (as the backbones'): :mod:`patchknn.ensemble` registers
#: ``"ensemble"`` when imported, so this module never imports its subclass.
MODEL_KINDS: dict[str, type[PatchKNN]] = {}


def register_model_kind(kind: str, cls: type[PatchKNN]) -> type[PatchKNN]:
    """Make ``PatchKNN.load`` / ``PatchKNN.from_config`` hand models of ``kind`` to ``cls``."""
    MODEL_KINDS[kind] = cls
    return cls


#: Where the built-in kinds live: imported by name on first use (an entry-point table).
BUILTIN_KINDS = {"ensemble": "patchknn.ensemble"}


def model_kind(kind: str) -> type[PatchKNN]:
    """The class registered for ``kind`` (a built-in kind's module is imported on first use)."""
    if kind not in MODEL_KINDS and kind in BUILTIN_KINDS:
        importlib.import_module(BUILTIN_KINDS[kind])
    return MODEL_KINDS[kind]
