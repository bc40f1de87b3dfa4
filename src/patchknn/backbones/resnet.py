"""ResNet backbones: torchvision ResNet-50 / Wide-ResNet-50-2 and the paper's Keras/Caffe ResNet-50.

Registered names:

* ``resnet50`` -- torchvision ResNet-50, ``IMAGENET1K_V1`` weights.
* ``wide_resnet50_2`` -- torchvision Wide-ResNet-50-2, ``IMAGENET1K_V1`` weights.
* ``resnet50-keras`` -- the paper's network, exactly: ``tf.keras.applications.ResNet50`` with its
  ImageNet weights (converted from the original MSRA/Caffe model): stride 2 on the first 1x1 conv of
  the downsampling blocks, BGR input minus the Caffe mean, and Keras' stem pooling
  ``ZeroPadding2D(1)`` + ``MaxPooling2D(3, 2)`` (= ``MaxPool2d(3, 2, padding=1)`` after the ReLU).
  The default of the ``paper`` preset. Only the stem and ``layer1``..``layer3`` exist.
* ``resnet50-caffe`` -- the same weights in the original Caffe network, which differs from Keras'
  only in the stem max-pool: ``3/2`` without padding in ceil mode (the same 56x56 output at 224 px,
  on a grid shifted by one pixel). Kept by name; models saved with it load and score as before.

Layers (all three families): ``layer1`` (stride 4, 256 channels, alias ``conv2_block3_out``),
``layer2`` (8, 512, ``conv3_block4_out``), ``layer3`` (16, 1024, ``conv4_block6_out``) and, for the
torchvision networks, ``layer4`` (32, 2048, ``conv5_block3_out``). Parameter names follow torchvision
(``conv1.weight``, ``layer3.5.bn2.running_var``, ...), so :meth:`Backbone.state_dict` of a built
backbone is a (truncated) torchvision state dict.

Weights (the ``weights`` argument of :func:`~patchknn.backbones.build_backbone`):

* ``None`` -- the pretrained default. torchvision networks: ``$PATCHKNN_WEIGHTS_DIR/<torchvision file>``
  if present, else torchvision's download/cache. Keras/Caffe networks: ``$PATCHKNN_WEIGHTS_DIR`` holding
  :data:`CAFFE_SAFETENSORS_NAME` or :data:`KERAS_H5_NAME`, then ``~/.keras/models/<h5>``, then
  ``~/.cache/patchknn/<h5>``, then a download of Keras' file into ``~/.cache/patchknn``.
* a path -- ``.safetensors`` (torchvision key names), ``.h5`` (Keras layout; Keras/Caffe networks
  only) or a ``torch.save``-d state dict (a torchvision ``.pth``), told apart by the file's content
  and read without unpickling anything but tensors. A folder is searched for the file names of the
  default weights (as ``$PATCHKNN_WEIGHTS_DIR`` is).
* ``"random"`` / ``"random:SEED"`` -- seeded random initialisation, nothing is read or downloaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from patchknn.backbones.base import (
    WEIGHTS_DIR_ENV,
    Backbone,
    LayerInfo,
    WeightsArg,
    load_checked_state_dict,
    random_seed,
    read_state_dict_file,
    register_backbone,
    resolve_weights_path,
    sha256_file,
)
from patchknn.errors import ImageError, WeightsError

__all__ = [
    "CAFFE_BGR_MEAN",
    "CAFFE_SAFETENSORS_NAME",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KERAS_H5_MD5",
    "KERAS_H5_NAME",
    "KERAS_H5_URL",
    "CaffeResNet50",
    "KerasResNet50",
    "ResNetBackbone",
    "TorchvisionResNet50",
    "TorchvisionWideResNet50",
    "keras_h5_to_state_dict",
    "load_weights_file",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
"""Per-channel mean subtracted by the Caffe/Keras preprocessing, in B, G, R order (0..255 scale)."""

CAFFE_SAFETENSORS_NAME = "resnet50-caffe-msra-stem-layer3.safetensors"
KERAS_H5_NAME = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_H5_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + KERAS_H5_NAME
KERAS_H5_MD5 = "4d473c1dd8becc155b73f8504c6f6626"
"""MD5 Keras publishes for :data:`KERAS_H5_NAME`; checked after a download."""

_KERAS_LAYER_NAMES = ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")
_BLOCKS = (3, 4, 6, 3)
_PLANES = (64, 128, 256, 512)
_STAGE_PREFIX = re.compile(r"^(layer\d+)\.")


def _layer_infos(depth: int) -> tuple[LayerInfo, ...]:
    return tuple(LayerInfo(f"layer{i + 1}", _PLANES[i] * 4, 4 * 2**i, (_KERAS_LAYER_NAMES[i],)) for i in range(depth))


class ResNetBackbone(Backbone):
    """A ResNet-50-style network (torchvision module names) truncated after the deepest layer in use.

    Subclasses fix :attr:`width_per_group`, :attr:`caffe`, :attr:`caffe_pool` and the normalisation.
    Build instances with :func:`~patchknn.backbones.build_backbone` rather than directly.

    Example:
        >>> from patchknn.backbones import build_backbone
        >>> net = build_backbone("resnet50", ["layer1", "layer2"], weights="random")
        >>> feats = net(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
        >>> {k: tuple(v.shape) for k, v in feats.items()}
        {'layer1': (1, 256, 16, 16), 'layer2': (1, 512, 8, 8)}
    """

    width_per_group: int = 64
    caffe: bool = False
    """MSRA/Caffe block layout: the downsampling stride on the first 1x1 conv, not on the 3x3."""
    caffe_pool: bool = False
    """Caffe's stem pool ``MaxPool2d(3, 2, padding=0, ceil_mode=True)``; otherwise torchvision's and
    Keras' ``MaxPool2d(3, 2, padding=1)`` (Keras: ``ZeroPadding2D(1)`` + ``MaxPooling2D(3, 2)``, the
    same after the ReLU since every value is >= 0)."""

    def __init__(self, layers: Sequence[str]) -> None:
        super().__init__(layers)
        names = [info.name for info in self.layer_infos]
        self.depth = 1 + max(names.index(n) for n in self.layers)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.relu = nn.ReLU(inplace=True)
        if self.caffe_pool:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        else:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i in range(self.depth):
            stride = 1 if i == 0 else 2
            self.add_module(f"layer{i + 1}", self._make_stage(inplanes, _PLANES[i], _BLOCKS[i], stride))
            inplanes = _PLANES[i] * Bottleneck.expansion
        self._init_random()

    def _make_stage(self, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        first = Bottleneck(inplanes, planes, stride, downsample, base_width=self.width_per_group)
        if self.caffe and stride != 1:
            # MSRA/Caffe ResNet: the stride sits on the first 1x1 conv, not on the 3x3.
            first.conv1.stride = (stride, stride)
            first.conv2.stride = (1, 1)
        rest = [Bottleneck(out, planes, base_width=self.width_per_group) for _ in range(blocks - 1)]
        return nn.Sequential(first, *rest)

    def _init_random(self) -> None:
        # torchvision's initialisation scheme (used only for weights="random").
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def built_stages(self) -> tuple[str, ...]:
        """Names of the stages that exist in this (truncated) network."""
        return tuple(f"layer{i + 1}" for i in range(self.depth))

    def is_unbuilt_key(self, key: str) -> bool:
        """Whether a torchvision state-dict key belongs to a part that is not built (deeper stages, fc)."""
        match = _STAGE_PREFIX.match(key)
        if match:
            return match.group(1) not in self.built_stages
        return key.split(".", 1)[0] in {"fc", "avgpool"}

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised input -> ``{layer: (B, C, h, w)}`` for every layer in :attr:`layers`."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        found: dict[str, torch.Tensor] = {}
        for stage in self.built_stages:
            x = getattr(self, stage)(x)
            if stage in self.layers:
                found[stage] = x
        return {name: found[name] for name in self.layers}

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Load a torchvision-named state dict, checking keys of the built part (deeper parts ignored).

        Raises:
            WeightsError: keys missing, unexpected or of the wrong shape.
        """
        load_checked_state_dict(self, state_dict, source, ignore=self.is_unbuilt_key)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ImageError(None, f"expected RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")


class _TorchvisionNormalize(ResNetBackbone):
    def __init__(self, layers: Sequence[str]) -> None:
        super().__init__(layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``(B, 3, H, W)`` (values 0..255) -> ``(x / 255 - mean) / std`` (ImageNet stats).

        Example:
            >>> from patchknn.backbones import build_backbone
            >>> net = build_backbone("resnet50", ["layer1"], weights="random")
            >>> net.normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)).flatten()
            tensor([2.2489, 2.4286, 2.6400])
        """
        _check_images(images)
        x = images.to(device=self.mean.device, dtype=torch.float32) / 255.0
        return (x - self.mean) / self.std


class TorchvisionResNet50(_TorchvisionNormalize):
    """torchvision ResNet-50 (``ResNet50_Weights.IMAGENET1K_V1`` by default)."""

    name = "resnet50"
    layer_infos = _layer_infos(4)
    default_layers = ("layer1", "layer2", "layer3")


class TorchvisionWideResNet50(_TorchvisionNormalize):
    """torchvision Wide-ResNet-50-2 (``Wide_ResNet50_2_Weights.IMAGENET1K_V1`` by default)."""

    name = "wide_resnet50_2"
    layer_infos = _layer_infos(4)
    default_layers = ("layer1", "layer2", "layer3")
    width_per_group = 128


class CaffeResNet50(ResNetBackbone):
    """The MSRA/Caffe ResNet-50 with Caffe's ceil-mode stem pool, stem..layer3 (the paper's weights;
    the paper's network is :class:`KerasResNet50`)."""

    name = "resnet50-caffe"
    layer_infos = _layer_infos(3)
    default_layers = ("layer1", "layer2", "layer3")
    caffe = True
    caffe_pool = True

    def __init__(self, layers: Sequence[str]) -> None:
        super().__init__(layers)
        self.register_buffer("mean", torch.tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``(B, 3, H, W)`` -> float BGR minus ``[103.939, 116.779, 123.68]``, not scaled.

        Example:
            >>> from patchknn.backbones import build_backbone
            >>> net = build_backbone("resnet50-caffe", ["layer1"], weights="random")
            >>> rgb = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1, 1)
            >>> net.normalize(rgb).flatten()
            tensor([ -73.9390,  -96.7790, -113.6800])
        """
        _check_images(images)
        x = images.to(device=self.mean.device, dtype=torch.float32).flip(1)  # RGB -> BGR
        return x - self.mean


class KerasResNet50(CaffeResNet50):
    """Keras' ``ResNet50`` (the paper's network): :class:`CaffeResNet50` with Keras' stem pooling,
    ``ZeroPadding2D(1)`` + ``MaxPooling2D(3, 2)`` = ``MaxPool2d(3, 2, padding=1)`` after the ReLU.

    Example:
        >>> from patchknn.backbones import build_backbone
        >>> net = build_backbone("resnet50-keras", ["layer1"], weights="random")
        >>> (net.maxpool.padding, net.maxpool.ceil_mode)
        (1, False)
    """

    name = "resnet50-keras"
    caffe_pool = False


# -- reading weights files ------------------------------------------------------------------------
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
        stage = _STAGE_PREFIX.match(prefix + ".")
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


def _torchvision_default(net: ResNetBackbone, weights_enum: Any) -> None:
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


def _caffe_default_file(name: str = "resnet50-keras") -> Path:
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


# -- factories ------------------------------------------------------------------------------------
def _build(cls: type[ResNetBackbone], layers: Sequence[str], weights: WeightsArg) -> ResNetBackbone:
    seed = random_seed(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        net = cls(layers)
    if seed is not None:
        net.weights_id = str(weights)
    return net


def _load_path(net: ResNetBackbone, path: str | Path, allow_h5: bool, known_names: Sequence[str] = ()) -> None:
    path = resolve_weights_path(path, known_names)
    state = load_weights_file(path, allow_h5=allow_h5, max_stage=net.depth, backbone=net.name)
    net.load_weights(state, str(path))
    net.weights_id = f"sha256:{sha256_file(path)}"


def _torchvision_factory(
    cls: type[ResNetBackbone], weights_enum: Any
) -> Callable[[Sequence[str], WeightsArg], Backbone]:
    def factory(layers: Sequence[str], weights: WeightsArg) -> Backbone:
        net = _build(cls, layers, weights)
        if random_seed(weights) is not None:
            return net
        if weights is None:
            _torchvision_default(net, weights_enum)
        else:
            _load_path(net, weights, allow_h5=False, known_names=(weights_enum.url.rsplit("/", 1)[-1],))
        return net

    return factory


register_backbone("resnet50", TorchvisionResNet50)(
    _torchvision_factory(TorchvisionResNet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
)
register_backbone("wide_resnet50_2", TorchvisionWideResNet50)(
    _torchvision_factory(TorchvisionWideResNet50, torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1)
)


def _keras_caffe_factory(cls: type[ResNetBackbone]) -> Callable[[Sequence[str], WeightsArg], Backbone]:
    def factory(layers: Sequence[str], weights: WeightsArg) -> Backbone:
        net = _build(cls, layers, weights)
        if random_seed(weights) is not None:
            return net
        path = _caffe_default_file(cls.name) if weights is None else weights
        _load_path(net, path, allow_h5=True, known_names=(CAFFE_SAFETENSORS_NAME, KERAS_H5_NAME))
        return net

    return factory


register_backbone("resnet50-keras", KerasResNet50)(_keras_caffe_factory(KerasResNet50))
register_backbone("resnet50-caffe", CaffeResNet50)(_keras_caffe_factory(CaffeResNet50))
