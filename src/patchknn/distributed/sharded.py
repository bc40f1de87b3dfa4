"""A memory bank split across Ray actors, searched as one: :class:`ShardedIndex`.

Each actor holds a contiguous slice ("shard") of the bank in an exact (flat) faiss index and returns
the ``k`` smallest distances of every query to its slice; the caller keeps the ``k`` smallest of all
shards (for ``k = 1`` the minimum). The result equals :meth:`MemoryBankIndex.search` on the whole
bank, bit for bit: shard boundaries fall on multiples of faiss's distance block
(``faiss.cvar.distance_compute_blas_database_bs`` = 1024 rows), so every bank row is compared with
every query by exactly the same arithmetic as in the single index. (Consequently a bank of fewer
than ``1024 * n`` rows gets fewer than ``n`` shards.)

:class:`ShardedIndex` has the interface :class:`PatchKNN` uses (``search(queries, k)``, ``size``,
``bank``), so it can replace a model's index: ``model.index_ = ShardedIndex.from_bank(...)``, or
:func:`load_sharded` loads a saved model whose bank never enters the calling process (each shard
actor reads its own rows from the model file).

Example:
    >>> import numpy as np
    >>> from patchknn.distributed import ShardedIndex
    >>> bank = np.random.default_rng(0).normal(size=(5000, 16)).astype(np.float32)
    >>> with ShardedIndex.from_bank(bank, 3) as index:                       # doctest: +SKIP
    ...     d = index.search(bank[:4], k=2)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patchknn.errors import ConfigError, ModelFileError, NotFittedError


def faiss_block_rows() -> int:
    """Bank rows per faiss distance block (shard boundaries are aligned to it)."""
    import faiss

    return int(getattr(faiss.cvar, "distance_compute_blas_database_bs", 1024))


def shard_bounds(n_rows: int, n_shards: int, align: int | None = None) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` row ranges of about equal size, starting on multiples of ``align``.

    Example:
        >>> shard_bounds(5000, 3, align=1024)
        [(0, 2048), (2048, 4096), (4096, 5000)]
    """
    if n_rows < 1:
        raise ConfigError(f"cannot shard an empty memory bank ({n_rows} rows)")
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ConfigError(f"the number of shards must be a positive integer, got {n_shards!r}")
    align = faiss_block_rows() if align is None else int(align)
    if align < 1:
        raise ConfigError(f"align must be at least 1, got {align}")
    n_blocks = -(-n_rows // align)
    groups = np.array_split(np.arange(n_blocks), min(n_shards, n_blocks))
    return [(int(g[0]) * align, min((int(g[-1]) + 1) * align, n_rows)) for g in groups]


# -------------------------------------------------------------------------------- model files
def bank_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """The directories of a saved model that hold a memory bank: the model's own, or each member's
    of an ensemble."""
    from patchknn.serialization import read_meta

    root = Path(path)
    doc = read_meta(root)
    if doc.get("kind") != "ensemble":
        return [root]
    members = doc.get("members")
    if not isinstance(members, list) or not all(isinstance(m, str) and Path(m).name == m for m in members):
        raise ModelFileError(f"{root}: the ensemble's member folders are missing or not plain names")
    return [root / m for m in members]


def shard_model(
    path: str | os.PathLike[str], n_shards: int, *, align: int | None = None, num_cpus: float = 0
) -> dict[str, ShardedIndex]:
    """A :class:`ShardedIndex` for each memory bank of a saved model (see :func:`bank_dirs`), keyed
    by the bank directory's absolute path: made once, then shared by every :func:`load_sharded`."""
    return {
        os.path.abspath(d): ShardedIndex.from_model(d, n_shards, align=align, num_cpus=num_cpus)
        for d in bank_dirs(path)
    }


def load_sharded(
    path: str | os.PathLike[str],
    n_shards: int,
    *,
    align: int | None = None,
    shard_cpus: float = 0,
    indexes: dict[str, ShardedIndex] | None = None,
    **runtime: Any,
) -> Any:
    """Load a saved model whose memory bank lives in ``n_shards`` Ray actors (see :class:`ShardedIndex`).

    :meth:`PatchKNN.load <patchknn.model.PatchKNN.load>` with an injected index: every check of a
    normal load, but the bank never enters this process (each shard actor reads its own rows from
    the model file). Ensembles shard each member's bank. Pass ``indexes`` (from :func:`shard_model`)
    to reuse shards already made for this model. ``runtime`` = the keyword-only options of
    :class:`PatchKNN`.
    """
    from patchknn.model import PatchKNN

    def sharded(model_dir: Path, model: Any) -> ShardedIndex:
        if model.config.image_score == "reweighted":
            raise ConfigError(
                "image_score='reweighted' reads the whole memory bank in the scoring process; "
                "it cannot be used with a sharded bank"
            )
        key = os.path.abspath(model_dir)
        if indexes is not None:
            if key not in indexes:
                raise ConfigError(f"no shards were made for the bank in {model_dir}")
            return indexes[key]
        return ShardedIndex.from_model(model_dir, n_shards, align=align, num_cpus=shard_cpus)

    return PatchKNN.load(path, index=sharded, **runtime)


# ------------------------------------------------------------------------------------- actors
class BankShard:
    """One shard of a memory bank (a Ray actor class: used through :class:`ShardedIndex`)."""

    def __init__(
        self,
        bank: np.ndarray | None = None,
        model_path: str | None = None,
        start: int = 0,
        stop: int | None = None,
        verify: bool = True,
        threads: int | None = None,
        centroids: np.ndarray | None = None,
        nprobe: int = 8,
    ) -> None:
        from patchknn.index import IndexParams, IVFIndex, MemoryBankIndex
        from patchknn.serialization import read_tensor_rows

        if threads:
            import faiss

            faiss.omp_set_num_threads(int(threads))
        if bank is None:
            if model_path is None or stop is None:
                raise ConfigError("a bank shard needs either the bank rows or a model path and a row range")
            bank = read_tensor_rows(model_path, "bank", start, stop, verify=verify)
        if not np.isfinite(bank).all():
            raise ModelFileError(f"{model_path or 'bank'}: the memory bank contains NaN or infinite values")
        if centroids is not None:  # an IVF bank: the model's own lists, so probes match the single index
            params = IndexParams(nprobe=int(nprobe))
            self.index: MemoryBankIndex = IVFIndex(params, centroids=centroids).build(bank)
        else:
            self.index = MemoryBankIndex().build(bank)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(queries, min(int(k), self.index.size))

    def info(self) -> dict[str, Any]:
        bank = self.index.bank
        return {"rows": int(bank.shape[0]), "dim": int(bank.shape[1]), "bytes": int(bank.nbytes),
                "node": os.uname().nodename, "pid": os.getpid()}

    def bank(self) -> np.ndarray:
        return self.index.bank


_remote_shard: list[Any] = []


def _shard_class() -> Any:
    from patchknn.distributed._ray import import_ray

    ray = import_ray()
    if not _remote_shard:
        _remote_shard.append(ray.remote(BankShard))
    return _remote_shard[0]


class ShardedIndex:
    """A memory bank spread over Ray actors; ``search`` equals the single index's search exactly.

    Build it with :meth:`from_bank` (rows from this process) or :meth:`from_model` (each actor reads
    its rows from a saved model). Ray must be initialised. Call :meth:`close` (or use ``with``) to
    stop the actors; they also stop when the process that created them ends.

    Attributes:
        bounds: ``[start, stop)`` bank rows of each shard.
        dim: vector dimension.
    """

    kind = "sharded"
    device = "cpu"

    def __init__(self, actors: Sequence[Any], bounds: Sequence[tuple[int, int]], dim: int) -> None:
        self.actors = list(actors)
        self.bounds = [(int(a), int(b)) for a, b in bounds]
        self.dim = int(dim)

    # ------------------------------------------------------------------------- constructors
    @staticmethod
    def _options(num_cpus: float, memory: int | None, spread: bool) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": num_cpus}
        if memory:
            opts["memory"] = int(memory)
        if spread:
            opts["scheduling_strategy"] = "SPREAD"
        return opts

    @classmethod
    def from_bank(
        cls,
        bank: np.ndarray,
        n_shards: int,
        *,
        align: int | None = None,
        num_cpus: float = 0,
        threads: int | None = None,
        spread: bool = True,
        reserve_memory: bool = False,
    ) -> ShardedIndex:
        """Split ``bank`` ``(N, d)`` over ``n_shards`` actors (fewer for a small bank, see module doc).

        Args:
            num_cpus: Ray CPUs reserved by each actor (0: the searches run on CPUs not reserved).
            threads: faiss threads in each actor.
            spread: ask Ray to place the actors on different nodes.
            reserve_memory: reserve each shard's size as Ray ``memory`` (so Ray places shards where
                they fit).
        """
        from patchknn.distributed._ray import import_ray

        ray = import_ray()
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ConfigError(f"memory bank must be a non-empty (N, d) array, got shape {bank.shape}")
        bounds = shard_bounds(bank.shape[0], n_shards, align)
        actors = []
        for start, stop in bounds:
            rows = bank[start:stop]
            mem = rows.nbytes * 2 if reserve_memory else None
            actors.append(
                _shard_class().options(**cls._options(num_cpus, mem, spread)).remote(
                    bank=ray.put(rows), threads=threads
                )
            )
        index = cls(actors, bounds, bank.shape[1])
        index.wait_ready()
        return index

    @classmethod
    def from_model(
        cls,
        model_path: str | os.PathLike[str],
        n_shards: int,
        *,
        align: int | None = None,
        num_cpus: float = 0,
        threads: int | None = None,
        spread: bool = True,
        reserve_memory: bool = False,
        verify: bool = True,
    ) -> ShardedIndex:
        """Shard the bank of a saved model; each actor reads only its rows from the model file
        (which must be readable at the same path on every node)."""
        from patchknn.serialization import bank_shape, read_meta, read_tensor_rows

        rows, dim = bank_shape(model_path)
        config = read_meta(model_path).get("config") or {}
        kind = config.get("index", "flat")
        search: dict[str, Any] = {}
        if kind == "ivf":  # each shard: the model's coarse lists over its own rows (probes identical)
            try:
                centroids = read_tensor_rows(model_path, "ivf_centroids", 0, None, verify=verify)
            except ModelFileError as e:
                raise ModelFileError(
                    f"{model_path}: an IVF model saved without its centroids cannot be sharded exactly; "
                    "load and save it again with this version"
                ) from e
            search = {"centroids": centroids, "nprobe": int(config.get("index_nprobe", 8))}
        elif kind != "flat":
            raise ConfigError(f"a {kind!r} index cannot be split across shards; use index 'flat' or 'ivf'")
        bounds = shard_bounds(rows, n_shards, align)
        path = os.path.abspath(model_path)
        actors = [
            _shard_class().options(**cls._options(num_cpus, (stop - start) * dim * 8 if reserve_memory else None,
                                                  spread)).remote(
                model_path=path, start=start, stop=stop, verify=verify, threads=threads, **search
            )
            for start, stop in bounds
        ]
        index = cls(actors, bounds, dim)
        index.wait_ready()
        return index

    def wait_ready(self) -> list[dict[str, Any]]:
        """Block until every shard is loaded; returns each shard's ``info()`` (raises its error)."""
        from patchknn.distributed._ray import import_ray

        return import_ray().get([a.info.remote() for a in self.actors])

    # ------------------------------------------------------------------------------ queries
    @property
    def n_shards(self) -> int:
        return len(self.actors)

    @property
    def size(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    def search(self, queries: np.ndarray, k: int = 1) -> np.ndarray:
        """Euclidean distances ``(M, k)`` from each query to its ``k`` nearest bank vectors, sorted."""
        from patchknn.distributed._ray import import_ray

        if not self.actors:
            raise NotFittedError("the sharded index has no shards (it was closed)")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        if k > self.size:
            raise ConfigError(f"k={k} is larger than the memory bank ({self.size} patches)")
        if hasattr(queries, "detach"):  # a torch tensor
            queries = queries.detach().cpu().numpy()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ConfigError(f"queries must be (M, {self.dim}), got shape {tuple(q.shape)}")
        if q.shape[0] == 0:
            return np.zeros((0, int(k)), dtype=np.float32)
        ray = import_ray()
        ref = ray.put(q)
        parts = ray.get([a.search.remote(ref, k) for a in self.actors])
        return merge_topk(parts, k)

    @property
    def bank(self) -> np.ndarray:
        """The whole bank, gathered from the shards (as large as the bank: for saving small models)."""
        from patchknn.distributed._ray import import_ray

        if not self.actors:
            raise NotFittedError("the sharded index has no shards (it was closed)")
        ray = import_ray()
        return np.concatenate(ray.get([a.bank.remote() for a in self.actors]), axis=0)

    def close(self) -> None:
        """Stop the shard actors."""
        if not self.actors:
            return
        from patchknn.distributed._ray import import_ray

        ray = import_ray()
        for a in self.actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(a)
        self.actors = []

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedIndex(shards={self.n_shards}, rows={self.size}, dim={self.dim})"


def merge_topk(parts: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Merge per-shard ``(M, k_i)`` sorted distances into the ``(M, k)`` smallest, sorted.

    Example:
        >>> import numpy as np
        >>> merge_topk([np.array([[1.0, 4.0]]), np.array([[2.0, 3.0]])], 3).tolist()
        [[1.0, 2.0, 3.0]]
    """
    if len(parts) == 1:
        return parts[0][:, :k]
    if k == 1:
        return np.min(np.concatenate(parts, axis=1), axis=1, keepdims=True)
    d = np.concatenate(parts, axis=1)
    d.sort(axis=1)
    return np.ascontiguousarray(d[:, :k])
