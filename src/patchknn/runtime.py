"""Score images with an exported model (:func:`patchknn.export.export_model`) without PyTorch.

Needs numpy, Pillow, scipy, safetensors, faiss-cpu, threadpoolctl and one graph runtime: onnxruntime
(``pip install 'patchknn[onnx]'``) or OpenVINO (``'patchknn[openvino]'``). This module never imports
torch (``tests/test_export.py`` runs it where importing torch fails).

The path is the torch model's, step by step: images are decoded and resized by
:func:`patchknn.data.load_resized`; the graphs give the rows to search (one graph per backbone pass:
the members of an ensemble that share a pass read one graph's outputs, run once per batch); the
search is built by the torch model's own factory, :func:`patchknn.index.build_index`, with the saved
options and seed (flat: the exact search, whose answer is the float64 scan's; IVF: the saved coarse
centroids and ``nprobe``; HNSW: the same graph); an ensemble z-scores its members with the saved
normalisation; maps, scores and verdicts come from the very functions of :mod:`patchknn.scoring`
that :meth:`PatchKNN.predict_batch <patchknn.model.PatchKNN.predict_batch>` calls.

Example:
    >>> from patchknn.runtime import load                               # doctest: +SKIP
    >>> model = load("bottle.onnx")                                     # doctest: +SKIP
    >>> [p.verdict for p in model.predict("bottle/test/broken_large")]  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np

from patchknn import scoring
from patchknn.data import DEFAULT_MAX_PIXELS, as_sources, load_resized, source_name
from patchknn.errors import ConfigError, ModelFileError, PatchKNNError
from patchknn.member_weights import saved_weights, score_members
from patchknn.scoring import OutputSize, Prediction
from patchknn.serialization import load_model, read_meta, sha256_file

EXPORTED_KIND = "exported"  # the same string as patchknn.export.graphs.EXPORTED_KIND (which imports torch)
BACKENDS = ("auto", "onnxruntime", "openvino")


class SavedOptions(SimpleNamespace):
    """The saved configuration, read-only by convention: ``options.image_size``, ``options.to_dict()``
    (the torch-free stand-in for :class:`~patchknn.config.PatchKNNConfig`, which validates
    backbone names through the torch registry)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`patchknn.export.export_model`."""
    try:
        return read_meta(path).get("kind") == EXPORTED_KIND
    except (ModelFileError, OSError):
        return False


# ------------------------------------------------------------------------------------------- graphs
class _Graph:
    """One graph: uint8 ``(B, 3, S, S)`` -> float32 ``(B, grid*grid, d)`` for each member it serves
    (one backbone pass). Safe to call from several threads at once: it keeps no state between
    calls (the members of a shared graph reuse one run through :class:`BatchOutputs`), and
    OpenVINO runs on an infer request of the calling thread's own (onnxruntime's session is
    thread-safe as it is)."""

    def __init__(self, path: Path, backend: str, threads: int | None) -> None:
        self.backend = backend
        if backend == "onnxruntime":
            try:
                import onnxruntime as ort
            except ImportError as e:
                raise ConfigError("this runtime needs onnxruntime: pip install 'patchknn[onnx]'") from e
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = int(threads)
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.output_names = [o.name for o in self._session.get_outputs()]
        else:
            try:
                import openvino as ov
            except ImportError as e:
                raise ConfigError("this runtime needs OpenVINO: pip install 'patchknn[openvino]'") from e
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # never bf16/fp16 behind our back
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            self._compiled = ov.Core().compile_model(str(path), "CPU", config)
            self.output_names = [o.get_any_name() for o in self._compiled.outputs]
            self._requests = threading.local()  # one infer request per thread (a request runs one call at a time)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph for ``images``, by name (float32)."""
        x = np.ascontiguousarray(images, dtype=np.uint8)
        if self.backend == "onnxruntime":
            values = self._session.run(self.output_names, {"images": x})
        else:
            request = getattr(self._requests, "request", None)
            if request is None:
                request = self._requests.request = self._compiled.create_infer_request()
            result = request.infer([x], share_inputs=True)  # as CompiledModel.__call__ (x is ours)
            values = [result[o] for o in self._compiled.outputs]
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(self.output_names, values)}


class BatchOutputs:
    """The graphs' outputs for one batch, each graph run once per view of it (the batch as it is,
    or flipped for test-time augmentation) however many members read it. Made for one
    :meth:`ExportedModel.score_batch` call and never shared between calls."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self._runs: dict[tuple[int, int | None], dict[str, np.ndarray]] = {}

    def rows(self, graph: _Graph, output: str, flip_axis: int | None = None) -> np.ndarray:
        """``graph``'s ``output`` for the batch (flipped along ``flip_axis`` when given)."""
        key = (id(graph), flip_axis)
        if key not in self._runs:
            view = self.images if flip_axis is None else np.flip(self.images, axis=flip_axis)
            self._runs[key] = graph.run(view)
        return self._runs[key][output]


def _pick_backend(backend: str, fmt: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if fmt == "openvino":
        if backend == "onnxruntime":
            raise ConfigError("an OpenVINO export runs on OpenVINO; export with format='onnx' for onnxruntime")
        return "openvino"
    if backend != "auto":
        return backend
    # OpenVINO first: the fastest for paper, fast and best alike in benchmarks/export.py (docs/export.md;
    # the search and the scoring are the same code whichever runs the graphs); it reads ONNX too
    import importlib.util

    return "openvino" if importlib.util.find_spec("openvino") is not None else "onnxruntime"


# ------------------------------------------------------------------------------------------- model
class _Member:
    def __init__(self, desc: dict[str, Any], tensors: dict[str, np.ndarray], graph: _Graph,
                 threads: int | None) -> None:
        from patchknn.index import IndexParams, build_index

        self.config = SavedOptions(**desc["config"])
        self.graph = graph
        self.output = str(desc.get("output", "rows"))
        # the torch model's own factory, options and seed: the same search (exact: the float64
        # scan's answer; IVF: the saved centroids; HNSW: the same graph)
        cfg = self.config
        self.search = build_index(
            tensors["bank"], cfg.index, IndexParams.from_config(cfg), int(cfg.seed), "cpu", threads=threads,
            centroids=tensors.get("centroids"),
        )
        self.k = int(cfg.k)

    def _grid_and_rows(self, batch: BatchOutputs, flip_axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        rows = batch.rows(self.graph, self.output, flip_axis)
        b, p, d = rows.shape
        flat = rows.reshape(b * p, d)
        scores = self.search.search(flat, self.k).mean(axis=1, dtype=np.float64).astype(np.float32)
        scores[~np.isfinite(flat).all(axis=1)] = np.nan
        g = int(self.config.grid_size)
        return scores.reshape(b, g, g), rows

    def score_batch(self, batch: BatchOutputs) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`PatchKNN.score_batch <patchknn.model.PatchKNN.score_batch>`."""
        grids, rows = self._grid_and_rows(batch)
        weights = np.ones(grids.shape[0], dtype=np.float64)
        if self.config.image_score == "reweighted":
            weights = scoring.reweight(grids, rows, self.search.bank, int(self.config.image_score_topk))
        tta = list(self.config.tta or ())
        for kind in tta:
            axis = 3 if kind == "hflip" else 2
            flipped, _ = self._grid_and_rows(batch, axis)
            grids += np.flip(flipped, axis=axis - 1)
        if tta:
            grids /= 1 + len(tta)
        return grids, weights


class ExportedModel:
    """An exported model, loaded for scoring: :meth:`predict` as :meth:`PatchKNN.predict
    <patchknn.model.PatchKNN.predict>` (same :class:`~patchknn.scoring.Prediction` objects).

    Args:
        path: the folder written by :func:`patchknn.export.export_model`.
        backend: ``"auto"`` (OpenVINO if installed, the fastest in docs/export.md, which also reads
            ONNX; else onnxruntime), ``"onnxruntime"`` or ``"openvino"``.
        threads: threads of the graph runtime (``None`` = its default, all cores).
        batch_size: images per graph call in :meth:`predict`.
        on_error: ``"stop"`` raises on an unreadable image; ``"skip"`` gives a Prediction with ``error``.
        max_pixels: decompression-bomb guard, as for :class:`~patchknn.model.PatchKNN`.

    Attributes:
        config: the saved options (attribute access: ``config.image_size`` ...).
        threshold_: the decision threshold (``None`` = no verdicts); may be changed.
        fit_info_: what fitting recorded.
    """

    def __init__(
        self,
        path: str | Path,
        backend: str = "auto",
        *,
        threads: int | None = None,
        batch_size: int = 16,
        on_error: Literal["stop", "skip"] = "stop",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        root = Path(path)
        doc, groups = load_model(root)
        if doc.get("kind") != EXPORTED_KIND:
            raise ModelFileError(f"{root}: not an exported model (export it with `patchknn export`)")
        if on_error not in ("stop", "skip"):
            raise ConfigError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
        try:
            self.format = str(doc["export_format"])
            self.backend = _pick_backend(backend, self.format)
            self.config = SavedOptions(**doc["config"])
            members = list(doc["members"])
            for desc in members:
                for name, digest in dict(desc["files"]).items():
                    if Path(name).name != name or sha256_file(root / name) != digest:
                        raise ModelFileError(f"{root / name}: missing, or its checksum does not match")
            graphs: dict[str, _Graph] = {}
            for desc in members:
                name = str(desc["graph"])
                if name not in graphs:
                    graphs[name] = _Graph(root / name, self.backend, threads)
            self.members = [
                _Member(desc, groups[f"member_{i}"], graphs[str(desc["graph"])], threads)
                for i, desc in enumerate(members)
            ]
            self.norm_ = np.asarray(groups["ensemble"]["norm"], np.float64) if "ensemble" in groups else None
            self.member_weights_: np.ndarray | None = None
            if self.norm_ is not None:
                self.member_weights_ = saved_weights(groups["ensemble"], len(self.members), f"{root}: ")
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{root}: the export's description is missing or damaged ({e})") from e
        except OSError as e:
            raise ModelFileError(f"{root}: a graph file cannot be read ({e})") from e
        thr = doc.get("threshold")
        self.threshold_: float | None = None if thr is None else float(thr)
        self.fit_info_: dict[str, Any] = dict(doc.get("fit_info") or {})
        self.path = root
        self.batch_size = int(batch_size)
        self.on_error = on_error
        self.max_pixels = max_pixels

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def score_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(B, 3, S, S)`` (numpy, or anything numpy converts, such as a CPU tensor) ->
        ``(B, grid, grid)`` patch scores and image weights, as ``PatchKNN.score_batch``."""
        batch = BatchOutputs(np.asarray(images, dtype=np.uint8))  # this call's graph runs, shared by its members
        if self.norm_ is None:
            return self.members[0].score_batch(batch)
        assert self.member_weights_ is not None
        return score_members(lambda m: m.score_batch(batch), self.members, self.norm_, self.member_weights_)

    def score_grid(self, images: np.ndarray) -> np.ndarray:
        """``(B, grid, grid)`` patch scores (see :meth:`score_batch`)."""
        return self.score_batch(images)[0]

    def grid_to_map(self, grid: np.ndarray, size: tuple[int, int], guide: np.ndarray | None = None) -> np.ndarray:
        """The anomaly map at ``size`` (:func:`patchknn.scoring.grid_to_map`; ``guide``: the image,
        uint8 ``(3, S, S)``, needed with ``guided_filter``)."""
        return scoring.grid_to_map(grid, size, self.config, guide=guide)

    def image_score(self, grid: np.ndarray, amap: np.ndarray | None = None, weight: float = 1.0) -> float:
        """As :meth:`PatchKNN.image_score <patchknn.model.PatchKNN.image_score>`."""
        s = self.image_size
        at_input = amap if amap is not None and amap.shape == (s, s) else None
        return scoring.image_score(grid, self.config, weight, amap=at_input)

    def predict_batch(
        self,
        images: np.ndarray,
        *,
        names: Sequence[str] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
        output_size: OutputSize = None,
        threshold: float | None = None,
    ) -> list[Prediction]:
        """uint8 ``(B, 3, S, S)`` (resized by the loader) -> predictions, as ``PatchKNN.predict_batch``."""
        grids, weights = self.score_batch(images)
        decision = self.threshold_ if threshold is None else float(threshold)
        return scoring.predictions(
            grids, weights, self.config, names=names, sizes=sizes, output_size=output_size, threshold=decision,
            guides=np.asarray(images, dtype=np.uint8),
        )

    def predict(
        self, images: Sequence[Any] | str | Path, output_size: OutputSize = None, *, threshold: float | None = None
    ) -> list[Prediction]:
        """Score ``images`` (paths, a folder, PIL images or arrays); one Prediction each, in order."""
        return list(self.predict_iter(images, output_size=output_size, threshold=threshold))

    def predict_iter(
        self, images: Sequence[Any] | str | Path, output_size: OutputSize = None, *, threshold: float | None = None
    ) -> Iterator[Prediction]:
        """Like :meth:`predict`, yielding each batch's results as they are ready."""
        sources = as_sources(images)
        for start in range(0, len(sources), self.batch_size):
            chunk = sources[start : start + self.batch_size]
            arrays, sizes, names, failed = [], [], [], {}
            for j, src in enumerate(chunk):
                name = source_name(src, start + j)
                try:
                    arr, original = load_resized(src, self.image_size, max_pixels=self.max_pixels)
                except PatchKNNError as e:
                    if self.on_error == "stop":
                        raise
                    failed[j] = Prediction(name, None, None, None, error=str(e))
                    continue
                arrays.append(arr.transpose(2, 0, 1))
                sizes.append(original)
                names.append(name)
            preds: list[Prediction] = []
            if arrays:
                preds = self.predict_batch(
                    np.stack(arrays), names=names, sizes=sizes, output_size=output_size, threshold=threshold
                )
            it = iter(preds)
            for j in range(len(chunk)):
                pred = failed[j] if j in failed else next(it)
                if pred.error is not None and j not in failed and self.on_error == "stop":
                    raise PatchKNNError(f"{pred.source}: {pred.error}")
                yield pred


def load(path: str | Path, backend: str = "auto", **options: Any) -> ExportedModel:
    """Load an exported folder (see :class:`ExportedModel` for ``backend`` and ``options``)."""
    return ExportedModel(path, backend, **options)


__all__ = ["BACKENDS", "EXPORTED_KIND", "ExportedModel", "SavedOptions", "is_exported", "load"]
