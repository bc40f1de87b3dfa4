"""The export itself: one ONNX (or OpenVINO IR) graph per member, the bank and the description.

See :mod:`patchknn.export` for what the folder holds and :mod:`patchknn.runtime` for reading it.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patchknn.errors import ConfigError, ModelFileError, NotFittedError
from patchknn.features import PatchFeatureExtractor
from patchknn.model import PatchKNN
from patchknn.serialization import save_model, sha256_file

#: ``export_model(format=...)`` choices.
EXPORT_FORMATS = ("onnx", "openvino")
#: ``kind`` in an exported folder's ``patchknn.json``.
EXPORTED_KIND = "exported"
#: ONNX opset of the graphs (onnxruntime >= 1.14 and OpenVINO >= 2023.0 read it).
OPSET = 17


class RowsGraph(nn.Module):
    """uint8 ``(B, 3, S, S)`` -> float32 ``(B, grid*grid, d)``: what one member searches in its bank.

    The same computation as :meth:`PatchKNN.query_rows <patchknn.model.PatchKNN.query_rows>`, in
    float32 on the CPU: the layer-wise projection for linear features, else the patch vectors
    (then the PCA when there is one).
    """

    def __init__(self, member: PatchKNN) -> None:
        super().__init__()
        ext = member.extractor
        net = getattr(ext.backbone, "inner", ext.backbone)  # an ensemble's shared backbone wrapper
        net = copy.deepcopy(net).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
        self.ext = PatchFeatureExtractor(net, ext.grid_size, ext.aggregation, ext.layer_norm, "float32").eval()
        pca = member.pca_
        self.has_pca = pca is not None
        if pca is not None:
            self.register_buffer("mean", pca.mean_tensor.detach().cpu().float().clone())
            self.register_buffer("components", pca.components_tensor.detach().cpu().float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.has_pca:
            return self.ext(images)
        if self.ext.can_project:
            return self.ext.project(images, self.mean, self.components)
        feats = self.ext(images)
        return (feats - self.mean) @ self.components.T


def _members(model: PatchKNN) -> tuple[list[PatchKNN], np.ndarray | None]:
    members = getattr(model, "members", None)  # an EnsemblePatchKNN: its members and their normalisation
    norm = getattr(model, "norm_", None)
    if members and norm is not None:
        return list(members), np.asarray(norm, dtype=np.float64)
    return [model], None


def _index_description(member: PatchKNN) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """How the runtime rebuilds the member's search (same kind and parameters) and its tensors."""
    cfg = member.config
    index = member.index_
    assert index is not None
    tensors = {"bank": np.ascontiguousarray(index.bank, dtype=np.float32)}
    desc: dict[str, Any] = {"kind": cfg.index, "k": int(cfg.k), "seed": int(cfg.seed)}
    if cfg.index == "ivf":
        centroids = getattr(index, "centroids", None)
        if centroids is None:
            raise ConfigError("this IVF index has no coarse centroids to export")
        tensors["centroids"] = np.ascontiguousarray(centroids, dtype=np.float32)
        desc["nprobe"] = int(min(cfg.index_nprobe, centroids.shape[0]))
    elif cfg.index == "hnsw":
        params = getattr(index, "params", None)
        desc.update(
            hnsw_m=int(cfg.hnsw_m),
            hnsw_ef_search=int(cfg.hnsw_ef_search),
            hnsw_ef_construction=int(getattr(params, "hnsw_ef_construction", 64)),
        )
    return desc, tensors


def _export_onnx(graph: RowsGraph, size: int, path: Path) -> None:
    dummy = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the classic exporter's deprecation and tracer notes
        torch.onnx.export(
            graph,
            (dummy,),
            str(path),
            input_names=["images"],
            output_names=["rows"],
            dynamic_axes={"images": {0: "batch"}, "rows": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _to_openvino(onnx_path: Path, xml_path: Path) -> list[Path]:
    try:
        import openvino as ov
    except ImportError as e:
        raise ConfigError("format='openvino' needs OpenVINO: pip install 'patchknn[openvino]'") from e
    ov_model = ov.convert_model(str(onnx_path))
    ov.save_model(ov_model, str(xml_path), compress_to_fp16=False)  # float32 weights: exact answers
    return [xml_path, xml_path.with_suffix(".bin")]


def export_model(
    model: PatchKNN | str | Path, output_dir: str | Path, format: str = "onnx"
) -> Path:
    """Export a fitted model (or a saved model directory) to ``output_dir``.

    Args:
        model: a fitted :class:`~patchknn.model.PatchKNN` / ensemble, or the path of a saved one.
        output_dir: the folder to write (created; an existing export there is replaced).
        format: ``"onnx"`` (graphs ``member-<i>.onnx``) or ``"openvino"`` (OpenVINO IR
            ``member-<i>.xml`` + ``.bin``, float32).

    Returns:
        ``output_dir``; load it with :func:`patchknn.runtime.load`.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as e:
        raise ConfigError("exporting needs the onnx package: pip install 'patchknn[onnx]'") from e
    if not isinstance(model, PatchKNN):
        model = PatchKNN.load(model, device="cpu", progress=False)
    if not model.is_fitted:
        raise NotFittedError("only a fitted model can be exported; call fit(images) or PatchKNN.load(path)")
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise ModelFileError(f"{root}: exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    members, norm = _members(model)
    size = int(model.config.image_size)
    described: list[dict[str, Any]] = []
    groups: dict[str, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(dir=root, prefix=".export-") as tmp:
        for i, member in enumerate(members):
            graph = RowsGraph(member).eval()
            onnx_path = Path(tmp) / f"member-{i}.onnx"
            _export_onnx(graph, size, onnx_path)
            files = [onnx_path] if format == "onnx" else _to_openvino(onnx_path, Path(tmp) / f"member-{i}.xml")
            for f in files:
                shutil.move(str(f), root / f.name)
            index, tensors = _index_description(member)
            groups[f"member_{i}"] = tensors
            described.append({
                "config": member.config.to_dict(),
                "graph": files[0].name,
                "files": {f.name: sha256_file(root / f.name) for f in files},
                "rows_dim": int(tensors["bank"].shape[1]),
                "index": index,
                "backbone_precision": member.config.precision,
            })
    if norm is not None:
        groups["ensemble"] = {"norm": norm}
    meta = {
        "kind": EXPORTED_KIND,
        "export_format": format,
        "model_kind": "ensemble" if norm is not None else "single",
        "config": model.config.to_dict(),
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW RGB", "size": size},
        "output": {"name": "rows", "dtype": "float32", "shape": ["batch", model.config.grid_size**2, "d"]},
        "members": described,
        "threshold": model.threshold_,
        "fit_info": model.fit_info_,
    }
    return save_model(root, meta, groups)


__all__ = ["EXPORTED_KIND", "EXPORT_FORMATS", "OPSET", "RowsGraph", "export_model"]
