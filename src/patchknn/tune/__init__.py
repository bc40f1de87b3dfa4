"""Choose a product's configuration from its normal images only (``patchknn tune``, ``patchknn fit
--preset auto``): hold some normal images out, give them synthetic defects, score the presets and a
bounded grid on them within a time budget, and keep the best.

Example:
    >>> from patchknn.tune import tune                                  # doctest: +SKIP
    >>> result = tune("bottle/train/good", budget_minutes=10)           # doctest: +SKIP
    >>> print(result.markdown()); result.config                         # doctest: +SKIP

Imports are lazy: ``patchknn --help`` registers the command without loading torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "tune": "patchknn.tune.search",
    "TuneResult": "patchknn.tune.result",
    "CandidateRow": "patchknn.tune.result",
    "Candidate": "patchknn.tune.candidates",
    "default_candidates": "patchknn.tune.candidates",
    "add_defect": "patchknn.defects",
    "defect_set": "patchknn.defects",
    "DEFECT_KINDS": "patchknn.defects",
    "TUNE_KINDS": "patchknn.defects",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'patchknn.tune' has no attribute {name!r}")
