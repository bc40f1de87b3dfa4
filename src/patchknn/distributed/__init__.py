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

from patchknn.distributed._ray import ray_session
from patchknn.distributed.fit_many import (
    FitManyReport,
    Variant,
    discover_variants,
    fit_many,
    fit_variant,
    is_up_to_date,
    training_fingerprint,
)
from patchknn.distributed.score_archive import ArchiveScorer, ArchiveSummary, PartStore, list_archive, score_archive
from patchknn.distributed.sharded import (
    ShardedIndex,
    bank_dirs,
    load_sharded,
    merge_topk,
    shard_bounds,
    shard_model,
)

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
