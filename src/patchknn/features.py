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
        precision: ``"float32"`` or ``"bfloat16"`` (the backbone runs under autocast; the patch
            vectors are float32 either way).
    """

    def __init__(
        self,
        backbone: Backbone,
        grid_size: int,
        aggregation: int = 1,
        layer_norm: bool = False,
        precision: str = "float32",
    ):
        super().__init__()
        self.precision = precision
        self.backbone = backbone
        self.grid_size = int(grid_size)
        self.aggregation = int(aggregation)
        self.layer_norm = bool(layer_norm)

    @property
    def dim(self) -> int:
        """Length of one patch vector."""
        return sum(self.backbone.layer_info(n).channels for n in self.backbone.layers)

    def _maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.precision == "bfloat16":
            with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16):
                return self.backbone(images)
        return self.backbone(images)

    def _pooled(self, f: torch.Tensor) -> torch.Tensor:
        f = f.float()
        if self.aggregation > 1:
            pad = self.aggregation // 2
            f = F.avg_pool2d(f, self.aggregation, stride=1, padding=pad, count_include_pad=False)
        return f

    def compact_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's map, average-pooled (``aggregation``) and shrunk to the grid if it is larger.

        Maps smaller than the grid (layer3: 14x14 for a 28x28 grid) stay at their own resolution:
        :meth:`assemble` enlarges them, :meth:`project_compact` projects them first. Holding these
        instead of the patch vectors takes 43 % less memory for the paper's layers.

        Returns:
            one float32 ``(B, C, h, w)`` tensor per layer.
        """
        maps = self._maps(images)
        g = self.grid_size
        parts = []
        for name in self.backbone.layers:
            f = self._pooled(maps[name])
            if f.shape[-2] * f.shape[-1] > g * g:
                f = F.interpolate(f, size=(g, g), mode="bilinear", align_corners=False)
            parts.append(f)
        return parts

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`compact_maps` -> float32 ``(B, grid*grid, dim)`` patch vectors."""
        size = (self.grid_size, self.grid_size)
        out = []
        for f in parts:
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            if self.layer_norm:
                f = F.normalize(f, dim=1)
            out.append(f)
        feats = torch.cat(out, dim=1)  # (B, D, G, G)
        return feats.flatten(2).transpose(1, 2).contiguous()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``(B, 3, H, W)`` -> float32 ``(B, grid*grid, dim)`` patch vectors."""
        return self.assemble(self.compact_maps(images))

    @property
    def can_project(self) -> bool:
        """Whether :meth:`project` applies (every step before the projection is linear per channel)."""
        return not self.layer_norm

    def project(self, images: torch.Tensor, mean: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
        """``(forward(images) - mean) @ components.T`` without building the full patch vectors.

        Bilinear resizing and average pooling act on each channel alike, so they commute with a
        linear map of the channels: each layer is projected at whichever of its own resolution
        and the grid's has fewer cells (layer3 at 14x14, layer1 after shrinking to 28x28) and only
        the ``d`` projected channels are resized and summed. Same result up to float round-off,
        a fraction of the work (no ``grid*grid x dim`` tensor). Not with ``layer_norm`` (it is
        not linear): see :attr:`can_project`.

        Args:
            images: uint8 RGB ``(B, 3, H, W)``.
            mean: ``(dim,)`` float32, on the images' device.
            components: ``(d, dim)`` float32, on the images' device.

        Returns:
            float32 ``(B, grid*grid, d)``.
        """
        return self.project_compact(self.compact_maps(images), mean, components)

    def project_compact(
        self, parts: list[torch.Tensor], mean: torch.Tensor, components: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`project` from :meth:`compact_maps` (e.g. stored during fitting)."""
        if not self.can_project:
            raise ValueError("project() needs linear features: layer_norm must be off")
        g = self.grid_size
        total: torch.Tensor | None = None
        offset = 0
        for f in parts:  # (B, C, h, w), h * w <= g * g
            c = f.shape[1]
            w = components[:, offset : offset + c]  # (d, C)
            offset += c
            p = f.permute(0, 2, 3, 1) @ w.T  # (B, h, w, d)
            if p.shape[1:3] != (g, g):  # projected first: only the d channels are enlarged
                p = p.permute(0, 3, 1, 2)
                p = F.interpolate(p, size=(g, g), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
            total = p if total is None else total + p
        assert total is not None
        total = total - (mean @ components.T)
        return total.reshape(total.shape[0], g * g, -1).contiguous()
