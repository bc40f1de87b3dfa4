"""A single model's files: what :meth:`PatchKNN.save <patchknn.model.PatchKNN.save>` writes and
:meth:`PatchKNN.load <patchknn.model.PatchKNN.load>` reads back, checked.

:mod:`patchknn.serialization` owns the format (safetensors + JSON, checksums, atomic writes); this
module owns what a :class:`~patchknn.model.PatchKNN` puts in it: the configuration, the threshold
and fit information, the memory bank (and an IVF index's coarse centroids), the PCA, and the
backbone's own weights (so that a model runs offline, anywhere). A coreset model also keeps its
training bank (every training patch in the index's space and the coreset's row numbers, group
``training``): what :meth:`~patchknn.model.PatchKNN.partial_fit` and its recalibration need, read
only when used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchknn.backbones import Backbone, build_backbone
from patchknn.config import PatchKNNConfig
from patchknn.errors import ConfigError, ModelFileError
from patchknn.reduction import PCA
from patchknn.serialization import bank_shape, load_model, save_model, sha256_file

__all__ = ["SavedModel", "check_model_contents", "read_model", "write_model"]


def write_model(
    path: str | Path,
    config: PatchKNNConfig,
    *,
    index: Any,
    pca: PCA | None,
    backbone: torch.nn.Module,
    threshold: float | None,
    fit_info: dict[str, Any],
    training: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Write one fitted model's directory (atomically); returns its path. ``training``: a coreset
    model's ``(full bank, kept row numbers)`` (see the module docstring)."""
    tensors = {"bank": index.bank}
    centroids = getattr(index, "centroids", None)
    if centroids is not None:  # IVF: the coarse centroids, so that every loader probes the same lists
        tensors["ivf_centroids"] = centroids
    if pca is not None:
        tensors |= {
            "pca_mean": pca.mean,
            "pca_components": pca.components,
            "pca_explained_variance_ratio": pca.explained_variance_ratio,
        }
    weights = {k: v.detach().cpu().numpy() for k, v in backbone.state_dict().items()}
    meta = {"config": config.to_dict(), "threshold": threshold, "fit_info": fit_info}
    groups = {"tensors": tensors, "backbone": weights}
    if training is not None:
        groups["training"] = {"full": training[0], "kept": np.asarray(training[1], dtype=np.int64)}
    return save_model(path, meta, groups)


@dataclass
class SavedModel:
    """What :func:`read_model` found, checked.

    Attributes:
        doc: the whole ``patchknn.json``.
        config: the model's configuration.
        backbone: the backbone network with the saved weights.
        pca: the fitted PCA, or ``None``.
        bank: the memory bank, or ``None`` when it was not read (``skip_bank``).
        centroids: an IVF index's coarse centroids, or ``None``.
        threshold: the decision threshold, or ``None``.
        fit_info: what fitting recorded.
        training: a coreset model's training bank reader (``() -> (full, kept)``, reads and checks
            the ``training`` group when called), or ``None`` (no coreset, or saved without it).
    """

    doc: dict[str, Any]
    config: PatchKNNConfig
    backbone: Backbone
    pca: PCA | None
    bank: np.ndarray | None
    centroids: np.ndarray | None
    threshold: float | None
    fit_info: dict[str, Any]
    training: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None


def read_model(path: str | Path, *, skip_bank: bool = False) -> SavedModel:
    """Read and check a single model's directory (every checksum, every shape and value).

    ``skip_bank``: leave the memory bank in its file (it is searched elsewhere, e.g. by shard
    actors); the file is still checksummed and its shape checked from the header.

    Raises:
        ModelFileError: missing, damaged, tampered with, or not usable here.
    """
    skip: dict[str, list[str]] = {"training": ["full", "kept"]}  # read when partial_fit needs it
    if skip_bank:
        skip["tensors"] = ["bank"]
    doc, groups = load_model(path, skip=skip)
    try:
        config = PatchKNNConfig.from_dict(doc["config"])
    except (KeyError, TypeError) as e:
        raise ModelFileError(f"{path}: the configuration is missing or damaged ({e})") from e
    except ConfigError as e:
        raise ModelFileError(f"{path}: the saved configuration is not usable here: {e}") from e
    shape = bank_shape(path) if skip_bank else None
    check_model_contents(path, doc, groups, config, bank_shape=shape)  # types, shapes, finiteness
    tensors, weights = groups["tensors"], groups["backbone"]
    net = build_backbone(config.backbone, config.resolved_layers, "random")
    try:
        net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()}, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: backbone weights do not fit {config.backbone}: {e}") from e
    pca = None
    if "pca_components" in tensors:
        pca = PCA(tensors["pca_mean"], tensors["pca_components"], tensors["pca_explained_variance_ratio"])
    fit_info = dict(doc.get("fit_info") or {})
    net.weights_id = str(fit_info.get("weights_id", "unknown"))  # provenance, not a path
    thr = doc.get("threshold")
    return SavedModel(
        doc=doc,
        config=config,
        backbone=net,
        pca=pca,
        bank=tensors.get("bank"),
        centroids=tensors.get("ivf_centroids"),
        threshold=None if thr is None else float(thr),
        fit_info=fit_info,
        training=_training_reader(Path(path), doc, config, shape or tensors["bank"].shape),
    )


def _training_reader(
    root: Path, doc: dict[str, Any], config: PatchKNNConfig, bank_shape: tuple[int, ...]
) -> Callable[[], tuple[np.ndarray, np.ndarray]] | None:
    """A function that reads and checks the ``training`` group of the file as it was when loaded
    (its name and checksum are taken now: a model saved over it later is not mixed in)."""
    entry = doc.get("files", {}).get("training")
    if not isinstance(entry, dict):
        return None
    file, digest = root / str(entry["file"]), str(entry["sha256"])
    cells = config.rows_per_image
    n_images = (doc.get("fit_info") or {}).get("n_train_images")

    def read() -> tuple[np.ndarray, np.ndarray]:
        from safetensors.numpy import load_file

        if not file.is_file() or sha256_file(file) != digest:
            raise ModelFileError(f"{file}: the training bank changed since the model was loaded; load it again")
        try:
            tensors = load_file(str(file))
            full, kept = tensors["full"], tensors["kept"]
        except Exception as e:  # noqa: BLE001 - safetensors' error types on malformed data vary
            raise ModelFileError(f"{file}: not a valid training bank ({type(e).__name__}: {e})") from e
        ok = (
            full.ndim == 2 and full.dtype == np.float32 and full.shape[1] == bank_shape[1]
            and full.shape[0] == (n_images or -1) * cells and np.isfinite(full).all()
            and kept.ndim == 1 and kept.dtype == np.int64 and kept.shape[0] == bank_shape[0]
            and bool((np.diff(kept) > 0).all()) and kept[0] >= 0 and kept[-1] < full.shape[0]
        )
        if not ok:
            raise ModelFileError(f"{file}: the training bank disagrees with the model ({n_images} images)")
        return full, kept

    return read


_COUNT_KEYS = ("n_train_images", "n_skipped", "bank_size", "feature_dim", "n_components")


def check_model_contents(
    path: str | Path,
    doc: dict[str, Any],
    groups: dict[str, Any],
    config: Any,
    bank_shape: tuple[int, int] | None = None,
) -> None:
    """Check what :func:`load_model` read for a :class:`~patchknn.model.PatchKNN` against its
    configuration, so that a damaged or hand-edited model fails here with a clear message.

    Checks: ``threshold`` is a finite number or null; ``fit_info`` is an object whose counts are
    non-negative integers; the ``tensors`` and ``backbone`` groups exist; the bank is a non-empty,
    finite, floating-point ``(N, d)`` matrix with ``N >= k``; the PCA tensors come together, are
    finite and agree with each other, with the bank and with the backbone's feature size (without
    PCA the bank has the feature size); every backbone tensor is finite. Extra tensors are allowed.
    A bank that was not read (``load_model(skip=...)``) is checked by its ``bank_shape`` (from
    the file's header); its values are then checked by whoever reads them.

    Raises:
        ModelFileError: naming ``path`` and the problem.
    """
    from patchknn.backbones import backbone_class

    def fail(reason: str) -> ModelFileError:
        return ModelFileError(f"{path}: {reason}")

    thr = doc.get("threshold")
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, int | float) or not math.isfinite(thr)):
        raise fail(f"the threshold must be a finite number or null, got {thr!r}")
    info = doc.get("fit_info", {})
    if info is None:
        info = {}
    if not isinstance(info, dict):
        raise fail(f"fit_info must be a JSON object, got {type(info).__name__}")
    for key in _COUNT_KEYS:
        value = info.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise fail(f"fit_info.{key} must be a non-negative integer, got {value!r}")

    tensors, backbone = groups.get("tensors"), groups.get("backbone")
    has_bank = isinstance(tensors, dict) and ("bank" in tensors or bank_shape is not None)
    if not isinstance(tensors, dict) or not isinstance(backbone, dict) or not has_bank:
        raise fail("tensors are missing from the model (need the memory bank and the backbone weights)")
    bank = tensors.get("bank")
    shape = tuple(bank.shape) if bank is not None else tuple(bank_shape)  # type: ignore[arg-type]
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1 or (bank is not None and bank.dtype.kind != "f"):
        kind = bank.dtype if bank is not None else "bank of shape"
        raise fail(f"the memory bank must be a non-empty float (N, d) matrix, got {kind} {shape}")
    if config.k > shape[0]:
        raise fail(f"k={config.k} is larger than the memory bank ({shape[0]} patches)")
    cls = backbone_class(config.backbone)
    feature_dim = sum(cls.layer_info(n).channels for n in config.resolved_layers)
    pca_keys = ("pca_mean", "pca_components", "pca_explained_variance_ratio")
    present = [k for k in pca_keys if k in tensors]
    if present:
        if len(present) != len(pca_keys):
            raise fail(f"incomplete PCA: has {present}, needs {list(pca_keys)}")
        mean, comps, ratio = (tensors[k] for k in pca_keys)
        if comps.ndim != 2 or comps.shape[1] != feature_dim or comps.shape[0] < 1:
            raise fail(
                f"PCA components have shape {comps.shape}, expected (d, {feature_dim}) for the "
                f"{config.backbone} layers {list(config.resolved_layers)}"
            )
        if mean.shape != (feature_dim,) or ratio.shape != (comps.shape[0],):
            raise fail(f"PCA mean {mean.shape} / variance ratios {ratio.shape} disagree with components {comps.shape}")
        if shape[1] != comps.shape[0]:
            raise fail(f"PCA and memory bank dimensions disagree ({comps.shape[0]} vs {shape[1]})")
        for k in pca_keys:
            _check_finite(fail, k, tensors[k])
    elif shape[1] != feature_dim:
        raise fail(f"the memory bank has {shape[1]} dimensions, the backbone's features {feature_dim}")
    if bank is not None:
        _check_finite(fail, "the memory bank", bank)
    for name, value in backbone.items():
        _check_finite(fail, f"backbone tensor {name!r}", value)


def _check_finite(fail: Any, what: str, value: np.ndarray) -> None:
    if value.dtype.kind in "fc" and not np.isfinite(value).all():
        raise fail(f"{what} contains NaN or infinite values")
