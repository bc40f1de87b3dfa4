"""The export itself: one ONNX (or OpenVINO IR) graph per member, the bank and the description.

See :mod:`patchknn.export` for what the folder holds and :mod:`patchknn.runtime` for reading it.
"""

from __future__ import annotations

import copy
import dataclasses
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
#: The options the export reproduces (graph, search, scoring; ``tests/test_export.py`` checks each).
#: An option added to :class:`~patchknn.config.PatchKNNConfig` later is refused at export time
#: unless it has its default value, until the export handles it.
REPRODUCED_OPTIONS = frozenset({
    "backbone", "layers", "image_size", "grid_size", "pca_variance", "k", "aggregation", "layer_norm",
    "smoothing_sigma", "image_score", "image_score_topk", "index", "index_nlist", "index_nprobe", "hnsw_m",
    "hnsw_ef_search", "coreset_ratio", "coreset_dim", "threshold_method", "threshold_quantile",
    "threshold_sigma", "calibration_images", "tta", "precision", "seed", "ensemble", "border_cells",
    "ensemble_weights", "grid_highpass", "train_flips",  # train_flips: only the bank, which is exported
    "guided_filter", "guided_eps",  # the maps: patchknn.scoring, shared by the runtime
})


class _OnePass(nn.Module):
    """A backbone that runs once per graph call however many members read its maps (the ensemble's
    shared pass, in the traced graph: the second member gets the first one's traced outputs)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.layers = net.layers
        self._last: tuple[torch.Tensor, Any] | None = None

    def layer_info(self, name: str) -> Any:
        return self.net.layer_info(name)

    def forward(self, images: torch.Tensor) -> Any:
        if self._last is None or self._last[0] is not images:
            self._last = (images, self.net(images))
        return self._last[1]


class RowsGraph(nn.Module):
    """uint8 ``(B, 3, S, S)`` -> float32 ``(B, grid*grid, d_i)`` for each member: what it searches in
    its bank. Members given together share one backbone pass (same network and weights).

    The same computation as :meth:`PatchKNN.query_rows <patchknn.model.PatchKNN.query_rows>`, in
    float32 on the CPU: the layer-wise projection for linear features, else the patch vectors
    (then the PCA when there is one).
    """

    def __init__(self, members: PatchKNN | list[PatchKNN]) -> None:
        super().__init__()
        members = members if isinstance(members, list) else [members]
        first = members[0].extractor
        net = getattr(first.backbone, "inner", first.backbone)  # an ensemble's shared backbone wrapper
        net = copy.deepcopy(net).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
        self.backbone = _OnePass(net)
        self.exts = nn.ModuleList()
        self.pcas: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for i, member in enumerate(members):
            ext = member.extractor
            self.exts.append(PatchFeatureExtractor(self.backbone, ext.grid_size, ext.aggregation, ext.layer_norm,
                                                   "float32").eval())  # type: ignore[arg-type]
            pca = member.pca_
            if pca is None:
                self.pcas.append(None)
                continue
            mean = pca.mean_tensor.detach().cpu().float().clone()
            comps = pca.components_tensor.detach().cpu().float().clone()
            self.register_buffer(f"mean_{i}", mean)
            self.register_buffer(f"components_{i}", comps)
            self.pcas.append((mean, comps))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.backbone._last = None
        out = []
        for ext, pca in zip(self.exts, self.pcas):
            if pca is None:
                out.append(ext(images))
            elif ext.can_project:
                out.append(ext.project(images, *pca))
            else:
                out.append((ext(images) - pca[0]) @ pca[1].T)
        self.backbone._last = None
        return tuple(out)


def _same_pass(a: PatchKNN, b: PatchKNN) -> bool:
    """Whether two members compute the same backbone maps (network, layers, precision, image size and
    weights), so that one pass serves both."""
    ca, cb = a.config, b.config
    if (ca.backbone, tuple(ca.resolved_layers), ca.precision, ca.image_size) != (
        cb.backbone, tuple(cb.resolved_layers), cb.precision, cb.image_size
    ):
        return False
    na = getattr(a.extractor.backbone, "inner", a.extractor.backbone)
    nb = getattr(b.extractor.backbone, "inner", b.extractor.backbone)
    if na is nb:
        return True
    sa, sb = na.state_dict(), nb.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _passes(members: list[PatchKNN]) -> list[list[int]]:
    """The members grouped by backbone pass, in member order."""
    groups: list[list[int]] = []
    for i, m in enumerate(members):
        for g in groups:
            if _same_pass(members[g[0]], m):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def check_reproduced(config: Any) -> None:
    """Refuse a configuration with an option the export does not reproduce (see
    :data:`REPRODUCED_OPTIONS`), rather than export a model that answers differently."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name not in REPRODUCED_OPTIONS and value != f.default:
            raise ConfigError(
                f"the export does not reproduce the option {f.name}={value!r} yet (the exported model would "
                f"answer differently from predict); export a model with {f.name}={f.default!r}, or score "
                "it with the torch model"
            )


def _members(model: PatchKNN) -> tuple[list[PatchKNN], dict[str, np.ndarray] | None]:
    """The models to export and, for an ensemble, its normalisation and member weights."""
    members = getattr(model, "members", None)  # an EnsemblePatchKNN: its members, normalisation and weights
    norm = getattr(model, "norm_", None)
    if members and norm is not None:
        weights = np.asarray(model.member_weights_, dtype=np.float64)  # type: ignore[attr-defined]
        return list(members), {"norm": np.asarray(norm, dtype=np.float64), "weights": weights}
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


def _export_onnx(graph: RowsGraph, size: int, path: Path, outputs: list[str]) -> None:
    dummy = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the classic exporter's deprecation and tracer notes
        torch.onnx.export(
            graph,
            (dummy,),
            str(path),
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
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
    members, ensemble = _members(model)
    for m in [model, *members]:
        check_reproduced(m.config)
    size = int(model.config.image_size)
    groups: dict[str, dict[str, np.ndarray]] = {}
    described: list[dict[str, Any]] = [{} for _ in members]
    with tempfile.TemporaryDirectory(dir=root, prefix=".export-") as tmp:
        for group in _passes(members):
            graph = RowsGraph([members[i] for i in group]).eval()
            outputs = ["rows"] if len(group) == 1 else [f"rows_{i}" for i in group]
            stem = f"member-{group[0]}" if len(group) == 1 else "members-" + "-".join(map(str, group))
            onnx_path = Path(tmp) / f"{stem}.onnx"
            _export_onnx(graph, size, onnx_path, outputs)
            files = [onnx_path] if format == "onnx" else _to_openvino(onnx_path, Path(tmp) / f"{stem}.xml")
            for f in files:
                shutil.move(str(f), root / f.name)
            for i, output in zip(group, outputs):
                index, tensors = _index_description(members[i])
                groups[f"member_{i}"] = tensors
                described[i] = {
                    "config": members[i].config.to_dict(),
                    "graph": files[0].name,
                    "output": output,
                    "files": {f.name: sha256_file(root / f.name) for f in files},
                    "rows_dim": int(tensors["bank"].shape[1]),
                    "index": index,
                    "backbone_precision": members[i].config.precision,
                }
    if ensemble is not None:
        groups["ensemble"] = ensemble

    meta = {
        "kind": EXPORTED_KIND,
        "export_format": format,
        "model_kind": "ensemble" if ensemble is not None else "single",
        "config": model.config.to_dict(),
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW RGB", "size": size},
        "output": {"name": "rows (rows_<i> for member i of a shared graph)", "dtype": "float32",
                   "shape": ["batch", model.config.grid_size**2, "d"]},
        "members": described,
        "threshold": model.threshold_,
        "fit_info": model.fit_info_,
    }
    return save_model(root, meta, groups)


__all__ = ["EXPORTED_KIND", "EXPORT_FORMATS", "OPSET", "REPRODUCED_OPTIONS", "RowsGraph", "check_reproduced",
           "export_model"]
