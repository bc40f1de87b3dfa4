"""A single model's files: what :meth:`PatchKNN.save <patchknn.model.PatchKNN.save>` writes and
:meth:`PatchKNN.load <patchknn.model.PatchKNN.load>` reads back, checked.

:mod:`patchknn.serialization` owns the format (safetensors + JSON, checksums, atomic writes); this
module owns what a :class:`~patchknn.model.PatchKNN` puts in it: the configuration, the threshold
and fit information, the memory bank (and an IVF index's coarse centroids), the PCA, and the
backbone's own weights (so that a model runs offline, anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchknn.backbones import Backbone, build_backbone
from patchknn.config import PatchKNNConfig
from patchknn.errors import ConfigError, ModelFileError
from patchknn.reduction import PCA
from patchknn.serialization import bank_shape, check_model_contents, load_model, save_model

__all__ = ["SavedModel", "read_model", "write_model"]


def write_model(
    path: str | Path,
    config: PatchKNNConfig,
    *,
    index: Any,
    pca: PCA | None,
    backbone: torch.nn.Module,
    threshold: float | None,
    fit_info: dict[str, Any],
) -> Path:
    """Write one fitted model's directory (atomically); returns its path."""
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
    return save_model(path, meta, {"tensors": tensors, "backbone": weights})


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
    """

    doc: dict[str, Any]
    config: PatchKNNConfig
    backbone: Backbone
    pca: PCA | None
    bank: np.ndarray | None
    centroids: np.ndarray | None
    threshold: float | None
    fit_info: dict[str, Any]


def read_model(path: str | Path, *, skip_bank: bool = False) -> SavedModel:
    """Read and check a single model's directory (every checksum, every shape and value).

    ``skip_bank``: leave the memory bank in its file (it is searched elsewhere, e.g. by shard
    actors); the file is still checksummed and its shape checked from the header.

    Raises:
        ModelFileError: missing, damaged, tampered with, or not usable here.
    """
    doc, groups = load_model(path, skip={"tensors": ["bank"]} if skip_bank else None)
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
    )
