"""Backbone feature maps -> one vector per grid cell ("patch features").

The paper: each selected layer's map is resized bilinearly to ``grid x grid`` and the maps are
concatenated along channels (layer1+layer2+layer3 of ResNet-50: 256+512+1024 = 1792 dims).

Example:
    >>> import torch
    >>> from patchknn.backbones import build_backbone
    >>> net = build_backbone("resnet50", weights="random")
    >>> ext = PatchFeatureExtractor(net, grid_size=28)
    >>> ext(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)).shape
    torch.Size([1, 784, 1792])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchknn.backbones import Backbone


class PatchFeatureExtractor(nn.Module):
    """A backbone plus the grid resampling that turns its layers into patch vectors.

    Args:
        backbone: a built :class:`~patchknn.backbones.Backbone` (its ``layers`` are used).
        grid_size: side of the patch grid.
        aggregation: odd side of the average-pooling neighbourhood applied to each layer's map
            before resizing (1 = none, the paper; 3 = PatchCore's local aggregation).
        layer_norm: scale every layer's vector at each cell to unit L2 norm, so that each layer
            contributes equally to distances whatever its channel count and activation scale.
    """

    def __init__(self, backbone: Backbone, grid_size: int, aggregation: int = 1, layer_norm: bool = False):
        super().__init__()
        self.backbone = backbone
        self.grid_size = int(grid_size)
        self.aggregation = int(aggregation)
        self.layer_norm = bool(layer_norm)

    @property
    def dim(self) -> int:
        """Length of one patch vector."""
        return sum(self.backbone.layer_info(n).channels for n in self.backbone.layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``(B, 3, H, W)`` -> float32 ``(B, grid*grid, dim)`` patch vectors."""
        maps = self.backbone(images)
        size = (self.grid_size, self.grid_size)
        parts = []
        for name in self.backbone.layers:
            f = maps[name].float()
            if self.aggregation > 1:
                pad = self.aggregation // 2
                f = F.avg_pool2d(f, self.aggregation, stride=1, padding=pad, count_include_pad=False)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            if self.layer_norm:
                f = F.normalize(f, dim=1)
            parts.append(f)
        feats = torch.cat(parts, dim=1)  # (B, D, G, G)
        return feats.flatten(2).transpose(1, 2).contiguous()
