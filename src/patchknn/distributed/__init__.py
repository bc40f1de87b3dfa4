"""Scaling past one machine with Ray (optional: ``pip install 'patchknn[distributed]'``).

* :func:`fit_many`: one model per product variant, fitted as parallel Ray tasks, skipping the
  variants whose saved model is up to date (``patchknn fit-many``).
* :func:`score_archive`: batch scoring of an image archive with Ray Data, streamed to Parquet,
  resumable (``patchknn score-archive``).
* :class:`ShardedIndex`: a memory bank split across Ray actors, searched exactly like one index.

Without ``address`` every entry point starts (and stops) a local Ray instance on 127.0.0.1, so all of
it runs on one machine with no cluster; with ``address`` it joins an existing cluster. Importing this
package does not import Ray (it is imported when a function needs it).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers; at run time see __getattr__ below
    from patchknn.distributed._ray import ray_session
    from patchknn.distributed.archive import (
        ArchiveScorer,
        ArchiveSummary,
        PartStore,
        list_archive,
        score_archive,
    )
    from patchknn.distributed.sharded import (
        ShardedIndex,
        bank_dirs,
        load_sharded,
        merge_topk,
        shard_bounds,
        shard_model,
    )
    from patchknn.distributed.variants import (
        FitManyReport,
        Variant,
        discover_variants,
        fit_many,
        fit_variant,
        is_up_to_date,
        training_fingerprint,
    )

# The submodules import numpy and the model-file format: loaded on first use (PEP 562), so that
# registering `fit-many` and `score-archive` keeps the CLI's start light.
_LAZY = {
    "ray_session": "_ray",
    **dict.fromkeys(("FitManyReport", "Variant", "discover_variants", "fit_many", "fit_variant", "is_up_to_date",
                     "training_fingerprint"), "variants"),
    **dict.fromkeys(("ArchiveScorer", "ArchiveSummary", "PartStore", "list_archive", "score_archive"),
                    "archive"),
    **dict.fromkeys(("ShardedIndex", "bank_dirs", "load_sharded", "merge_topk", "shard_bounds", "shard_model"),
                    "sharded"),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"patchknn.distributed.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'patchknn.distributed' has no attribute {name!r}")


__all__ = [
    "ArchiveScorer",
    "ArchiveSummary",
    "FitManyReport",
    "PartStore",
    "ShardedIndex",
    "bank_dirs",
    "Variant",
    "discover_variants",
    "fit_many",
    "fit_variant",
    "is_up_to_date",
    "list_archive",
    "load_sharded",
    "merge_topk",
    "ray_session",
    "score_archive",
    "shard_bounds",
    "shard_model",
    "training_fingerprint",
]
