"""Weights of the ResNet backbones: files (safetensors, Keras h5, torch state dicts), Keras' h5
layout converted to torchvision's names, and the default files (environment folder, caches, the
download of Keras' file with its published checksum)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from patchknn.backbones.base import (
    WEIGHTS_DIR_ENV,
    Backbone,
    read_state_dict_file,
    resolve_weights_path,
    sha256_file,
)
from patchknn.errors import WeightsError

STAGE_PREFIX = re.compile(r"^(layer\d+)\.")
"""Matches the stage of a torchvision parameter name (``layer3.``)."""

CAFFE_SAFETENSORS_NAME = "resnet50-caffe-msra-stem-layer3.safetensors"
KERAS_H5_NAME = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_H5_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + KERAS_H5_NAME
KERAS_H5_MD5 = "4d473c1dd8becc155b73f8504c6f6626"
"""MD5 Keras publishes for :data:`KERAS_H5_NAME`; checked after a download."""


def load_weights_file(
    path: str | Path, *, allow_h5: bool = False, max_stage: int = 4, known_names: Sequence[str] = (),
    backbone: str = "",
) -> dict[str, torch.Tensor]:
    """Read a weights file into a torchvision-named state dict; the format is told by content.

    Args:
        path: a ``.safetensors`` file, a Keras ``.h5`` file (ResNet50 layout, only with
            ``allow_h5``) or a ``torch.save``-d state dict (``.pth``/``.pt``/...), read with
            ``weights_only=True``; or a folder holding one of ``known_names``.
        allow_h5: accept Keras ``.h5`` files (the Keras/Caffe networks).
        max_stage: for ``.h5`` files, the deepest torchvision stage to convert (deeper ones are skipped).
        known_names: file names looked for when ``path`` is a folder.
        backbone: the backbone's name, for messages.

    Returns:
        The state dict (CPU tensors).

    Raises:
        WeightsError: the file is missing, a folder without a known file, unreadable, or not a
            weights file in a supported format.

    Example:
        >>> sd = load_weights_file("resnet50-0676ba61.pth")  # doctest: +SKIP
    """
    path = resolve_weights_path(path, known_names)

    def h5_reader(p: Path) -> dict[str, torch.Tensor]:
        return keras_h5_to_state_dict(p, max_stage=max_stage)

    return read_state_dict_file(path, h5_reader=h5_reader if allow_h5 else None, backbone=backbone)


_KERAS_CONV = re.compile(r"^conv(\d)_block(\d+)_(\d)_(conv|bn)$")


def _keras_to_torch_prefix(layer: str) -> str | None:
    """``conv3_block1_0_conv`` -> ``layer2.0.downsample.0``; ``conv1_bn`` -> ``bn1``; else ``None``."""
    if layer == "conv1_conv":
        return "conv1"
    if layer == "conv1_bn":
        return "bn1"
    match = _KERAS_CONV.match(layer)
    if not match:
        return None
    stage, block, part, kind = int(match[1]), int(match[2]), int(match[3]), match[4]
    if part == 0:
        return f"layer{stage - 1}.{block - 1}.downsample.{0 if kind == 'conv' else 1}"
    return f"layer{stage - 1}.{block - 1}.{kind}{part}"


def _h5_layers(handle: Any, keep: Callable[[str], bool]) -> dict[str, dict[str, Any]]:
    """``{layer: {weight ('kernel', 'bias', 'gamma', ...): numpy array}}`` for the kept Keras layers."""
    import h5py

    root = handle.get("model_weights", handle)
    layers: dict[str, dict[str, Any]] = {}
    for layer_name, group in root.items():
        if not isinstance(group, h5py.Group) or not keep(layer_name):
            continue
        weights: dict[str, Any] = {}

        def visit(name: str, obj: Any, weights: dict[str, Any] = weights) -> None:
            if isinstance(obj, h5py.Dataset):
                weights[name.rsplit("/", 1)[-1].split(":", 1)[0]] = obj[()]

        group.visititems(visit)
        if weights:
            layers[layer_name] = weights
    return layers


def keras_h5_to_state_dict(path: str | Path, max_stage: int = 4) -> dict[str, torch.Tensor]:
    """Convert Keras' ``ResNet50`` weights (``.h5``) into a torchvision-named state dict.

    Kernels go from HWIO to OIHW; a conv bias is folded into the following batch norm's
    ``running_mean`` (``bn(conv(x) + b) == bn'(conv(x))`` with ``mean' = mean - b``), and Keras'
    batch-norm epsilon 1.001e-5 is folded into ``running_var`` (``var' = var + 1e-8``) so that the
    result computes the same with PyTorch's eps 1e-5. Layers of stages beyond ``max_stage``
    (Keras ``conv5_*`` = torchvision ``layer4``, with the default) and non-ResNet layers such as a
    classifier head are skipped.

    Args:
        path: the ``.h5`` file (Keras weights-only or full-model layout).
        max_stage: deepest torchvision stage to convert (``3`` = up to ``layer3``).

    Returns:
        The state dict, float32 CPU tensors.

    Raises:
        WeightsError: a conv/bn pair or a weight is missing.

    Example:
        >>> sd = keras_h5_to_state_dict(KERAS_H5_NAME, max_stage=3)  # doctest: +SKIP
        >>> sd["layer3.5.conv3.weight"].shape  # doctest: +SKIP
        torch.Size([1024, 256, 1, 1])
    """
    import h5py
    import numpy as np

    def keep(layer_name: str) -> bool:
        prefix = _keras_to_torch_prefix(layer_name)
        if prefix is None:
            return False
        stage = STAGE_PREFIX.match(prefix + ".")
        return not stage or int(stage.group(1)[len("layer") :]) <= max_stage

    with h5py.File(path, "r") as handle:
        layers = _h5_layers(handle, keep)
    convs: dict[str, dict[str, Any]] = {}
    bns: dict[str, dict[str, Any]] = {}
    for layer_name, weights in layers.items():
        (convs if layer_name.endswith("_conv") else bns)[layer_name] = weights

    def need(weights: dict[str, Any], key: str, layer_name: str) -> Any:
        if key not in weights:
            raise WeightsError(f"{path}: Keras layer {layer_name!r} has no {key!r} (has {sorted(weights)})")
        return np.asarray(weights[key], dtype=np.float64)

    state: dict[str, torch.Tensor] = {}
    for conv_name, conv in convs.items():
        bn_name = conv_name[: -len("conv")] + "bn"
        if bn_name not in bns:
            raise WeightsError(f"{path}: Keras layer {conv_name!r} has no batch norm {bn_name!r}")
        bn = bns[bn_name]
        kernel = need(conv, "kernel", conv_name)
        if kernel.ndim != 4:
            raise WeightsError(f"{path}: {conv_name}/kernel has shape {kernel.shape}, expected 4-d HWIO")
        bias = np.asarray(conv["bias"], dtype=np.float64) if "bias" in conv else 0.0
        conv_key, bn_key = _keras_to_torch_prefix(conv_name), _keras_to_torch_prefix(bn_name)
        state[f"{conv_key}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).astype(np.float32))
        state[f"{bn_key}.weight"] = torch.from_numpy(need(bn, "gamma", bn_name).astype(np.float32))
        state[f"{bn_key}.bias"] = torch.from_numpy(need(bn, "beta", bn_name).astype(np.float32))
        mean = need(bn, "moving_mean", bn_name) - bias
        var = need(bn, "moving_variance", bn_name) + (1.001e-5 - 1e-5)
        state[f"{bn_key}.running_mean"] = torch.from_numpy(mean.astype(np.float32))
        state[f"{bn_key}.running_var"] = torch.from_numpy(var.astype(np.float32))
    orphans = sorted(set(bns) - {c[: -len("conv")] + "bn" for c in convs})
    if orphans:
        raise WeightsError(f"{path}: batch norms without their conv: {', '.join(orphans[:5])}")
    return state


# -- default weights ------------------------------------------------------------------------------
def _env_file(*names: str) -> Path | None:
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if not folder:
        return None
    for name in names:
        candidate = Path(folder).expanduser() / name
        if candidate.is_file():
            return candidate
    return None


def _how_to(filename: str) -> str:
    return (
        f"pass a local weights file instead: weights=PATH in Python, --weights FILE on the command "
        f"line, or put {filename} in a folder named by the environment variable {WEIGHTS_DIR_ENV}"
    )


def torchvision_default(net: Backbone, weights_enum: Any) -> None:
    url: str = weights_enum.url
    filename = url.rsplit("/", 1)[-1]
    tag = f"torchvision:{weights_enum.name}"
    local = _env_file(filename)
    if local is not None:
        # torchvision file names carry the first hex digits of the file's sha256.
        prefix = filename.rsplit("-", 1)[-1].split(".", 1)[0]
        if not sha256_file(local).startswith(prefix):
            raise WeightsError(f"{local}: its sha256 does not start with {prefix}: corrupt or another file")
        net.load_weights(load_weights_file(local), str(local))
    else:
        try:
            state = weights_enum.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
        except Exception as exc:  # offline, proxy, truncated or corrupt download, ...
            raise WeightsError(
                f"could not get the pretrained {net.name} weights ({tag}) from {url}: {exc}. "
                f"If this machine is offline, {_how_to(filename)}."
            ) from exc
        net.load_weights(state, tag)
    net.weights_id = tag


def _cache_dir() -> Path:
    return Path.home() / ".cache" / "patchknn"


def _md5_file(path: Path) -> str:
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def caffe_default_file(name: str = "resnet50-keras") -> Path:
    local = _env_file(CAFFE_SAFETENSORS_NAME, KERAS_H5_NAME)
    if local is not None:
        return local
    for candidate in (Path.home() / ".keras" / "models" / KERAS_H5_NAME, _cache_dir() / KERAS_H5_NAME):
        if candidate.is_file():
            return candidate
    target = _cache_dir() / KERAS_H5_NAME
    how = (
        f"pass the file instead: weights=PATH in Python or --weights FILE on the command line "
        f"({KERAS_H5_NAME} from Keras, or {CAFFE_SAFETENSORS_NAME}), or put either file in a folder "
        f"named by the environment variable {WEIGHTS_DIR_ENV}, or {KERAS_H5_NAME} in ~/.keras/models"
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(KERAS_H5_URL, str(target), progress=True)
    except Exception as exc:  # offline, proxy, disk full, ...
        raise WeightsError(
            f"could not download the {name} weights from {KERAS_H5_URL}: {exc}. "
            f"If this machine is offline, {how}."
        ) from exc
    if _md5_file(target) != KERAS_H5_MD5:
        target.unlink(missing_ok=True)
        raise WeightsError(f"the download of {KERAS_H5_URL} is corrupt (md5 mismatch); retry, or {how}.")
    return target
