"""The estimator: :class:`PatchKNN` composes backbone -> patch features -> PCA -> memory bank.

Example:
    >>> from patchknn import PatchKNN
    >>> model = PatchKNN(backbone="efficientnet-lite2")            # doctest: +SKIP
    >>> model.fit(["train/000.png", "train/001.png"])              # doctest: +SKIP
    >>> pred = model.predict(["test/broken.png"])[0]                # doctest: +SKIP
    >>> pred.score, pred.anomaly_map.shape                         # doctest: +SKIP
    (3.71, (224, 224))
    >>> model.save("bottle.model"); PatchKNN.load("bottle.model")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from patchknn import member_weights, scoring
from patchknn._version import __version__
from patchknn.backbones import build_backbone
from patchknn.backbones.base import WeightsArg
from patchknn.bank import TrainingBank, build_memory_bank, check_store, collect_features, extend_memory_bank
from patchknn.calibration_defects import fit_defects
from patchknn.config import PatchKNNConfig
from patchknn.data import DEFAULT_MAX_PIXELS, as_sources, iter_batches, source_name
from patchknn.errors import ConfigError, ModelFileError, NotFittedError, PatchKNNError
from patchknn.execution import (
    check_device,
    check_run_options,
    native_bf16,
    progress_bar,
    resolve_precision,
    seed_everything,
)
from patchknn.features import PatchFeatureExtractor, TrainingStore
from patchknn.index import IndexParams, MemoryBankIndex, build_index
from patchknn.kinds import BUILTIN_KINDS, MODEL_KINDS, model_kind
from patchknn.persistence import read_model, write_model
from patchknn.presets import preset
from patchknn.reduction import PCA
from patchknn.scoring import OutputSize, Prediction
from patchknn.serialization import read_meta
from patchknn.threshold import calibrate_model

OnError = Literal["stop", "skip"]
IndexFactory = Callable[[Path, "PatchKNN"], Any]
"""``(model_dir, model) -> index``: builds a loaded model's search index from its directory."""

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(PatchKNNConfig))


class PatchKNN:
    """Anomaly detector: nearest-neighbour distance of test patches to a bank of normal patches.

    The constructor only stores and validates options (scikit-learn style); :meth:`fit` learns
    from normal images; :meth:`predict` scores new ones. Method options are those of
    :class:`~patchknn.config.PatchKNNConfig` (the defaults are the paper's method); the keyword-only
    options are about how it runs and are not part of the saved model.

    Args:
        backbone ... ensemble: the method's options, every field of
            :class:`~patchknn.config.PatchKNNConfig` (defaults = the paper). ``ensemble`` members
            make an :class:`~patchknn.ensemble.EnsemblePatchKNN`: use :meth:`from_config` /
            :meth:`from_preset` (which return one) or that class.
        weights: ``None`` = the backbone's pretrained default, a file or folder, or ``"random"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        batch_size: images per backbone call.
        num_workers: image-decoding worker processes (0 = decode in this process); ``"auto"``
            (default) = none for a single batch, else ``min(2, CPUs - 1)`` (at least 1), so images
            decode while the backbone runs (see :func:`patchknn.data.auto_workers`).
        progress: show progress bars (only when stderr is a terminal).
        on_error: ``"stop"`` raises on the first unreadable image; ``"skip"`` leaves it out of
            fitting (listed in :attr:`skipped_`) and returns a :class:`Prediction` with ``error``
            set from :meth:`predict`.
        max_pixels: largest ``height * width`` of an input image, checked from the file header
            before decoding (a decompression-bomb guard); ``None`` = no limit of ours (Pillow's own
            guard still applies). Default 64 megapixels.

    Example:
        >>> model = PatchKNN(backbone="resnet50", weights="random", image_size=64, grid_size=8)
        >>> model.config.k
        1
    """

    def __init__(
        self,
        backbone: str = "resnet50-keras",
        layers: Sequence[str] | None = None,
        image_size: int = 224,
        grid_size: int = 28,
        pca_variance: float | None = 0.95,
        k: int = 1,
        aggregation: int = 1,
        layer_norm: bool = False,
        smoothing_sigma: float = 0.0,
        guided_filter: float = 0.0,
        guided_eps: float = 1e-4,
        image_score: str = "max",
        image_score_topk: int = 10,
        border_cells: int = 0,
        grid_highpass: float = 0.0,
        index: str = "flat",
        index_nlist: int = 0,
        index_nprobe: int = 8,
        hnsw_m: int = 32,
        hnsw_ef_search: int = 64,
        coreset_ratio: float = 1.0,
        coreset_dim: int = 128,
        threshold_method: str = "defects",
        threshold_quantile: float = 0.99,
        threshold_sigma: float = 3.0,
        calibration_images: int = 32,
        tta: Sequence[str] = (),
        precision: str = "float32",
        seed: int = 0,
        ensemble: Sequence[str] = (),
        ensemble_weights: str = "equal",
        train_flips: Sequence[str] = (),
        *,
        weights: WeightsArg = None,
        device: str = "cpu",
        batch_size: int = 16,
        num_workers: int | Literal["auto"] = "auto",
        progress: bool = True,
        on_error: OnError = "stop",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        # the config owns the options (validation, defaults, saving): every parameter above is one of its fields
        given = locals()
        self.config = PatchKNNConfig(**{name: given[name] for name in CONFIG_FIELDS})
        if self.config.ensemble and not self._is_ensemble:
            raise ConfigError(
                "a configuration with ensemble members makes an EnsemblePatchKNN: use "
                "PatchKNN.from_config / PatchKNN.from_preset, or patchknn.ensemble.EnsemblePatchKNN"
            )
        self.weights = weights
        self.device = check_device(device)
        check_run_options(batch_size=batch_size, num_workers=num_workers, on_error=on_error, max_pixels=max_pixels)
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress
        self.on_error: OnError = on_error
        self._extractor: PatchFeatureExtractor | None = None
        self.pca_: PCA | None = None
        self.index_: MemoryBankIndex | None = None
        self.threshold_: float | None = None
        self.training_: TrainingBank | None = None  # a coreset model's training bank (partial_fit)
        self.skipped_: list[tuple[str, str]] = []
        self.fit_info_: dict[str, Any] = {}

    # ---------------------------------------------------------------------------- constructors
    _is_ensemble = False  # EnsemblePatchKNN (a subclass) sets it

    @classmethod
    def from_config(cls, config: PatchKNNConfig, **runtime: Any) -> PatchKNN:
        """Build from a :class:`PatchKNNConfig`; ``runtime`` are the keyword-only options.

        A configuration with ``ensemble`` members gives an :class:`~patchknn.ensemble.EnsemblePatchKNN`.
        """
        if config.ensemble and not cls._is_ensemble:
            return model_kind("ensemble").from_config(config, **runtime)
        return cls(**config.as_kwargs(), **runtime)

    @classmethod
    def from_preset(cls, name: str = "paper", **options: Any) -> PatchKNN:
        """Build from a named preset (``paper``, ...) with some options overridden.

        Example:
            >>> PatchKNN.from_preset("paper", k=3, weights="random").config.k
            3
        """
        method = {k: v for k, v in options.items() if k in CONFIG_FIELDS}
        runtime = {k: v for k, v in options.items() if k not in CONFIG_FIELDS}
        return cls.from_config(preset(name, **method), **runtime)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The method options (scikit-learn style: the constructor's parameters, read from :attr:`config`,
        the one owner of their values and defaults); ``deep``: scikit-learn's API (no nested estimators)."""
        return self.config.as_kwargs()

    def set_params(self, **params: Any) -> PatchKNN:
        """Change method options (scikit-learn style); returns ``self``.

        The new configuration is validated as a whole (:class:`ConfigError` names the option), and
        the fitted state is discarded: a model is always what its options say, so fit again.
        """
        fields = set(self.config.as_kwargs())
        unknown = sorted(set(params) - fields)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; the options are {sorted(fields)}")
        config = self.config.replace(**params)
        if config.ensemble and not self._is_ensemble:
            raise ConfigError("ensemble members make an EnsemblePatchKNN: build one with PatchKNN.from_config")
        self.config = config
        self._extractor = None
        self.pca_, self.index_, self.threshold_, self.training_ = None, None, None, None
        self.fit_info_ = {}
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.describe()})"

    # ------------------------------------------------------------------------------- fitting
    @property
    def is_fitted(self) -> bool:
        return self.index_ is not None

    @property
    def extractor(self) -> PatchFeatureExtractor:
        """The backbone + grid resampling (built on first use)."""
        if self._extractor is None:
            net = build_backbone(self.config.backbone, self.config.resolved_layers, self.weights)
            self._extractor = self._make_extractor(net)
        return self._extractor

    def _make_extractor(self, net: torch.nn.Module) -> PatchFeatureExtractor:
        ext = PatchFeatureExtractor(
            net, self.config.grid_size, self.config.aggregation, self.config.layer_norm,
            resolve_precision(self.config.precision, self.device),
        )
        if self.config.precision == "bfloat16" and self.device.type == "cpu" and not native_bf16():
            warnings.warn(
                "precision='bfloat16' on a CPU without native bfloat16 (AVX512-BF16 or AMX) is emulated "
                "and slower than float32; set precision='float32' for speed on this machine",
                UserWarning,
                stacklevel=3,
            )
        # channels-last convolutions: about a third faster on CPUs (oneDNN); same values up to
        # float round-off (the weights keep their logical layout, so saved files do not change)
        return ext.to(self.device, memory_format=torch.channels_last).eval()

    def fit(self, images: Sequence[Any] | str | Path) -> PatchKNN:
        """Learn normality from defect-free ``images`` (paths, a folder, PIL images or arrays); ``self``."""
        member_weights.refuse_single(self.config, self._is_ensemble)
        t0 = time.perf_counter()
        got = collect_features(self, images, "fit")
        return self.fit_store(got.store, t0, sources=got.sources)

    def partial_fit(self, images: Sequence[Any] | str | Path) -> PatchKNN:
        """Add normal ``images`` (e.g. false alarms marked normal) to the fitted model; ``self``.

        Exact: equal to a fit on the old and new images with the old PCA (a coreset is continued,
        see :mod:`patchknn.bank`); the threshold is recalibrated by :meth:`fit`'s rule.
        ``fit_info_["added"]`` names the images added; :func:`patchknn.versions.save_version`
        saves the result as a new version."""
        self._check_fitted()
        member_weights.refuse_single(self.config, self._is_ensemble)
        t0 = time.perf_counter()
        return self.extend_store(*collect_features(self, images, "partial_fit")[:2], t0)

    def extend_store(
        self, store: TrainingStore, names: Sequence[str], t0: float, *, keep_held_out: bool = False
    ) -> PatchKNN:
        """:meth:`partial_fit` of the images ``names`` in ``store`` (``keep_held_out``: see :meth:`fit_store`)."""
        self._check_fitted()
        seed_everything(self.config.seed)
        coreset = self.config.coreset_ratio < 1.0
        old = (self.training_ or TrainingBank(None, None)) if coreset else getattr(self.index_, "bank", None)
        built = extend_memory_bank(self.pca_, old, check_store(store, "partial_fit"), self.config, self._build_index)
        self._set_bank(built)
        n = built.full.shape[0] // self.config.rows_per_image  # images, not their flips
        added = {"names": list(names), "count": n - self.fit_info_.get("n_train_images", 0)}
        self.fit_info_ |= {"n_train_images": n, "n_skipped": len(self.skipped_), "bank_size": built.index.bank.shape[0]}
        self.fit_info_ |= {"bank_size_full": built.full.shape[0], **built.seconds, "added": added}
        self.fit_info_["partial_fit_seconds"] = round(time.perf_counter() - t0, 3)
        calibrate_model(self, built.full, built.kept, keep_held_out)
        return self

    def batches(self, sources: Sequence[Any]) -> Any:
        """Decoded, resized batches of ``sources`` with this model's run options (see
        :func:`patchknn.data.iter_batches`; unreadable images are in its ``errors``)."""
        return iter_batches(
            sources,
            image_size=self.config.image_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            on_error=self.on_error,
            max_pixels=self.max_pixels,
        )

    def fit_store(
        self, store: TrainingStore, t0: float, *, keep_held_out: bool = False, pca: PCA | None = None,
        sources: Sequence[Any] | None = None,
    ) -> PatchKNN:
        """Everything after the features: PCA, bank, coreset, index, threshold (``skipped_`` set).

        ``keep_held_out``: also keep ``held_out_`` = the calibration images and their held-out
        grids (:func:`patchknn.threshold.held_out_grids`), for an ensemble that combines its
        members' grids and calibrates on the result by the same folds. ``pca``: project by this
        fitted PCA instead of fitting one (what :meth:`partial_fit` equals: the PCA of fewer images).
        ``sources``: the images of ``store`` (in its order), on which the calibration makes its
        synthetic defects (``threshold_method="defects"``; without them it keeps the quantile rule).
        """
        seed_everything(self.config.seed)
        ext, defects = self.extractor, fit_defects(self, check_store(store, "fit"), sources, keep_held_out)
        dim, filled = store.dim, store.n_rows
        t_feat = time.perf_counter()
        built = build_memory_bank(store, self.config, self._build_index, pca, defects)
        self._set_bank(built)
        bank, kept, index_bank = built.full, built.kept, built.index.bank
        self.fit_info_ = {
            "n_train_images": filled // self.config.rows_per_image, "n_skipped": len(self.skipped_),
            "bank_size": int(index_bank.shape[0]), "bank_size_full": int(bank.shape[0]), **built.seconds,
            "feature_dim": int(dim), "n_components": int(bank.shape[1]),
            "fit_seconds": round(time.perf_counter() - t0, 3), "feature_seconds": round(t_feat - t0, 3),
            "weights_id": str(getattr(ext.backbone, "weights_id", "unknown")),
        }
        calibrate_model(self, bank, kept, keep_held_out, defects)
        return self

    def _set_bank(self, built: Any) -> None:
        self.pca_, self.index_ = built.pca, built.index
        self.training_ = None if built.kept is None else TrainingBank(built.full, built.kept)

    # ---------------------------------------------------------------------------- predicting
    def predict(
        self,
        images: Sequence[Any] | str | Path,
        output_size: OutputSize = None,
        *,
        threshold: float | None = None,
    ) -> list[Prediction]:
        """Score ``images``; one :class:`Prediction` per input, in order.

        Args:
            images: paths, a folder, PIL images or arrays.
            output_size: size of the anomaly maps: ``None``/``"input"`` = ``image_size``;
                ``"original"`` = each image's own size; an int or ``(H, W)`` = that size.
            threshold: decision threshold for these predictions (verdict and mask); ``None`` =
                the model's own ``threshold_`` (calibrated by :meth:`fit`; set
                ``model.threshold_`` to change it for good, or to ``None`` for no decision).
        """
        return list(self.predict_iter(images, output_size=output_size, threshold=threshold))

    def predict_iter(
        self,
        images: Sequence[Any] | str | Path,
        output_size: OutputSize = None,
        *,
        threshold: float | None = None,
    ) -> Iterator[Prediction]:
        """Like :meth:`predict`, but yields results as batches finish (constant memory)."""
        self._check_fitted()
        sources = as_sources(images)
        batches = self.batches(sources)
        names = [source_name(s, i) for i, s in enumerate(sources)]
        reported = 0
        with self.progress_bar(len(sources), "predict") as bar:
            for batch in batches:
                preds = self.predict_batch(
                    batch.images,
                    names=[names[i] for i in batch.indices],
                    sizes=batch.sizes,
                    output_size=output_size,
                    threshold=threshold,
                )
                for i, pred in zip(batch.indices, preds, strict=True):
                    yield from self._errors_before(batches, names, reported, i)
                    reported = i + 1
                    if pred.error is not None and self.on_error == "stop":
                        raise PatchKNNError(f"{pred.source}: {pred.error}")
                    yield pred
                bar.update(len(batch.indices))
        yield from self._errors_before(batches, names, reported, len(sources))

    @torch.inference_mode()
    def predict_batch(
        self,
        images: torch.Tensor,
        *,
        names: Sequence[str] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
        output_size: OutputSize = None,
        threshold: float | None = None,
    ) -> list[Prediction]:
        """The one path from a decoded batch to predictions (used by :meth:`predict_iter`, so by
        ``predict``/``evaluate``/``score-archive``/sharded search, and by the server).

        Args:
            images: uint8 ``(B, 3, S, S)``, already resized to ``image_size`` by the loader.
            names: each image's :attr:`Prediction.source` (default ``"<image i>"``).
            sizes: each image's original ``(H, W)`` (only used with ``output_size="original"``).
            output_size: as in :meth:`predict`; the score and verdict never depend on it (:mod:`patchknn.scoring`).
            threshold: as in :meth:`predict` (``None`` = the model's ``threshold_``).

        A map or score that is not finite gives a :class:`Prediction` with ``error`` set (the
        caller decides whether that stops the run).
        """
        grids, weights = self.score_batch(images)
        decision = self.threshold_ if threshold is None else float(threshold)
        guides = images.cpu().numpy() if self.config.guided_filter else None  # the map's outline (scoring)
        return scoring.predictions(grids, weights, self.config, names=names, sizes=sizes, output_size=output_size,
                                   threshold=decision, guides=guides)

    @staticmethod
    def _errors_before(batches: Any, names: list[str], start: int, stop: int) -> Iterator[Prediction]:
        for idx, _src, reason in getattr(batches, "errors", []):
            if start <= idx < stop:
                yield Prediction(names[idx], None, None, None, error=reason)

    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(B, 3, S, S)`` (already resized) -> ``(B, grid, grid)`` patch anomaly scores (with
        ``tta``, the flipped images' grids, flipped back, averaged in), plus each image's score
        weight (1 unless ``image_score`` is ``"reweighted"``: PatchCore's re-weighting of the most
        anomalous patch, see :func:`patchknn.scoring.reweight`)."""
        self._check_fitted()
        grids, rows = self._grid_and_rows(images)
        weights = np.ones(grids.shape[0], dtype=np.float64)
        if self.config.image_score == "reweighted":
            weights = scoring.reweight(grids, rows, self.index_.bank, self.config.image_score_topk)  # type: ignore[union-attr]
        for kind in self.config.tta:
            axis = 3 if kind == "hflip" else 2  # images (B, 3, H, W) -> grid axis = axis - 1
            flipped, _ = self._grid_and_rows(torch.flip(images, dims=(axis,)))
            grids += np.flip(flipped, axis=axis - 1)
        if self.config.tta:
            grids /= 1 + len(self.config.tta)
        return grids, weights

    def query_rows(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, S, S)`` -> the ``(B, grid*grid, d)`` vectors searched in the bank."""
        return self.extractor.query_rows(images.to(self.device), self.pca_)

    def fit_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The compact per-layer maps (CPU) and the full patch vectors (CPU) of a batch."""
        return self.extractor.fit_parts(images.to(self.device))

    def _grid_and_rows(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        rows = self.query_rows(images).numpy()
        return scoring.patch_grid(rows, self.index_, self.config), rows

    # ------------------------------------------------------------------------------- storage
    def save(self, path: str | Path, *, training: bool = True) -> Path:
        """Save the fitted model as a directory of safetensors files + ``patchknn.json`` (see
        :mod:`patchknn.persistence`). ``training=False``: leave out a coreset model's training bank
        (a smaller file, which :meth:`partial_fit` then refuses; see docs/versions.md)."""
        self._check_fitted()
        return write_model(
            path, self.config, index=self.index_, pca=self.pca_, backbone=self.extractor.backbone,
            threshold=self.threshold_, fit_info=self.fit_info_,
            training=None if self.training_ is None or not training else self.training_.rows(),
        )

    @classmethod
    def load(cls, path: str | Path, *, index: IndexFactory | None = None, **runtime: Any) -> PatchKNN:
        """Load a model saved by :meth:`save`; ``runtime`` = keyword-only options (device, ...).

        Args:
            path: the model directory. An ensemble's directory gives an
                :class:`~patchknn.ensemble.EnsemblePatchKNN` (whatever class ``load`` is called on).
            index: where the memory bank is searched, when not in this process: a function
                ``(model_dir, model) -> index`` (e.g. a :class:`~patchknn.distributed.ShardedIndex`
                whose actors read the rows themselves). The bank then never enters this process
                (its file is still checksummed). For an ensemble it is called once per member.
        """
        kind = read_meta(path).get("kind")
        if kind == "exported":  # patchknn.export's output: graphs for onnxruntime/OpenVINO, no backbone weights
            raise ModelFileError(f"{path}: an exported model (patchknn export); load it with patchknn.runtime.load")
        if kind in BUILTIN_KINDS or kind in MODEL_KINDS:
            other = model_kind(kind)
            if not issubclass(cls, other):
                return other.load(path, index=index, **runtime)
        saved = read_model(path, skip_bank=index is not None)
        model = cls.from_config(saved.config, **{"weights": "random", **runtime})
        model._extractor = model._make_extractor(saved.backbone)
        model.pca_ = saved.pca
        if index is None:
            model.index_ = model._build_index(saved.bank, saved.centroids)  # type: ignore[arg-type]
        else:
            model.index_ = index(Path(path), model)
        model.threshold_, model.fit_info_ = saved.threshold, saved.fit_info
        if saved.training is not None and model.config.coreset_ratio < 1.0:
            model.training_ = TrainingBank(None, None, saved.training)
        return model

    # ------------------------------------------------------------------------------- helpers
    def _build_index(self, bank: np.ndarray, centroids: np.ndarray | None = None) -> MemoryBankIndex:
        """The configured search index (kind, parameters, seed) of ``bank`` on this device;
        ``centroids``: an IVF's saved coarse centroids (so a loaded model searches the same lists)."""
        params = IndexParams.from_config(self.config)
        return build_index(bank, self.config.index, params, self.config.seed, self.device, centroids=centroids)

    def _check_fitted(self) -> None:
        if self.index_ is None:
            raise NotFittedError("this PatchKNN is not fitted yet; call fit(images) or PatchKNN.load(path)")

    def progress_bar(self, total: int, desc: str) -> Any:
        return progress_bar(total, desc, self.progress)


__all__ = ["PatchKNN", "Prediction", "__version__"]
