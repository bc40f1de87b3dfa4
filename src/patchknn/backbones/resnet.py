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

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from patchknn.backbones.base import (
    Backbone,
    LayerInfo,
    WeightsArg,
    build_network,
    load_checked_state_dict,
    random_seed,
    register_backbone,
    resolve_weights_path,
    sha256_file,
)
from patchknn.backbones.folding import inference_network
from patchknn.backbones.resnet_weights import (
    CAFFE_SAFETENSORS_NAME,
    KERAS_H5_MD5,
    KERAS_H5_NAME,
    KERAS_H5_URL,
    STAGE_PREFIX,
    caffe_default_file,
    keras_h5_to_state_dict,
    load_weights_file,
    torchvision_default,
)
from patchknn.errors import ImageError

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

_KERAS_LAYER_NAMES = ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")
_BLOCKS = (3, 4, 6, 3)
_PLANES = (64, 128, 256, 512)


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
        match = STAGE_PREFIX.match(key)
        if match:
            return match.group(1) not in self.built_stages
        return key.split(".", 1)[0] in {"fc", "avgpool"}

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised input -> ``{layer: (B, C, h, w)}`` for every layer in :attr:`layers`.

        In eval mode the network runs with its batch norms folded into the convolutions
        (:mod:`patchknn.backbones.folding`: the same function up to float round-off, ~20 % faster on
        a CPU); the modules and ``state_dict`` stay the unfolded network's."""
        net = inference_network(self)
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        found: dict[str, torch.Tensor] = {}
        for stage in self.built_stages:
            x = getattr(net, stage)(x)
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
# -- factories ------------------------------------------------------------------------------------
def _load_path(net: ResNetBackbone, path: str | Path, allow_h5: bool, known_names: Sequence[str] = ()) -> None:
    path = resolve_weights_path(path, known_names)
    state = load_weights_file(path, allow_h5=allow_h5, max_stage=net.depth, backbone=net.name)
    net.load_weights(state, str(path))
    net.weights_id = f"sha256:{sha256_file(path)}"


def _torchvision_factory(
    cls: type[ResNetBackbone], weights_enum: Any
) -> Callable[[Sequence[str], WeightsArg], Backbone]:
    def factory(layers: Sequence[str], weights: WeightsArg) -> Backbone:
        net = build_network(cls, layers, weights)
        if random_seed(weights) is not None:
            return net
        if weights is None:
            torchvision_default(net, weights_enum)
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
        net = build_network(cls, layers, weights)
        if random_seed(weights) is not None:
            return net
        path = caffe_default_file(cls.name) if weights is None else weights
        _load_path(net, path, allow_h5=True, known_names=(CAFFE_SAFETENSORS_NAME, KERAS_H5_NAME))
        return net

    return factory


register_backbone("resnet50-keras", KerasResNet50)(_keras_caffe_factory(KerasResNet50))
register_backbone("resnet50-caffe", CaffeResNet50)(_keras_caffe_factory(CaffeResNet50))
