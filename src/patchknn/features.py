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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchknn.backbones import Backbone
from patchknn.reduction import PCA, MomentAccumulator


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
        self._pca_cache: tuple[PCA, torch.Tensor, torch.Tensor] | None = None

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


    @torch.inference_mode()
    def query_rows(self, images: torch.Tensor, pca: PCA | None) -> torch.Tensor:
        """uint8 ``(B, 3, S, S)`` (on this extractor's device) -> the ``(B, grid*grid, d)`` float32
        CPU vectors searched in the memory bank: the patch vectors, or their PCA projection (layer
        by layer where :attr:`can_project`: same values up to round-off, less work)."""
        if pca is None:
            return self(images).float().cpu()
        if self.can_project:
            if self._pca_cache is None or self._pca_cache[0] is not pca:  # the PCA on this device
                self._pca_cache = (pca, pca.mean_tensor.to(images.device), pca.components_tensor.to(images.device))
            return self.project(images, *self._pca_cache[1:]).float().cpu()
        feats = self(images).float().cpu()
        b, p, _ = feats.shape
        return pca.transform(feats.reshape(b * p, -1)).reshape(b, p, -1)

    @torch.inference_mode()
    def fit_parts(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """For :class:`TrainingStore`: the compact per-layer maps and the full patch vectors of a
        batch, float32 on the CPU."""
        parts = self.compact_maps(images)
        return [p.float().cpu() for p in parts], self.assemble(parts).float().cpu()


class TrainingStore:
    """The normal patches seen while fitting, filled batch by batch, with their moments for the PCA.

    With a PCA of linear features (the paper's method) it keeps each layer's map at the smaller of
    its own and the grid's resolution (:meth:`PatchFeatureExtractor.compact_maps`: 43 % less memory
    for the paper's layers) and projects them layer by layer once the PCA is known; otherwise
    (``layer_norm``, or no PCA) it keeps the full patch vectors.

    Args:
        extractor: the extractor that produces the batches (its ``grid_size`` and ``dim``).
        capacity: the most images that will be added (each flipped copy of ``train_flips`` counts
            as one: ``n_images`` counts grids).
        compact: keep compact maps (needs ``extractor.can_project``) or full vectors.
    """

    def __init__(self, extractor: PatchFeatureExtractor, capacity: int, compact: bool) -> None:
        if compact and not extractor.can_project:
            raise ValueError("a compact store needs linear features (layer_norm off)")
        self.extractor = extractor
        self.capacity = int(capacity)
        self.grid_cells = extractor.grid_size**2
        self.dim = extractor.dim
        self.moments = MomentAccumulator(self.dim)
        self.n_images = 0
        self._vectors = None if compact else np.empty((self.capacity * self.grid_cells, self.dim), np.float32)
        self._maps: list[np.ndarray] | None = None  # compact: one (N, h, w, C) array per layer

    @property
    def n_rows(self) -> int:
        """Patch vectors added so far."""
        return self.n_images * self.grid_cells

    def add(self, parts: list[torch.Tensor], feats: torch.Tensor) -> None:
        """Add a batch: its compact maps (CPU, one ``(B, C, h, w)`` per layer) and patch vectors
        (CPU ``(B, grid*grid, dim)``)."""
        b = feats.shape[0]
        if self.n_images + b > self.capacity:
            raise ValueError(f"the store holds at most {self.capacity} images")
        rows = feats.reshape(-1, self.dim)
        if self._vectors is not None:
            self._vectors[self.n_rows : self.n_rows + rows.shape[0]] = rows.numpy()
        else:
            if self._maps is None:
                self._maps = [np.empty((self.capacity, *f.shape[2:], f.shape[1]), np.float32) for f in parts]
            for arr, f in zip(self._maps, parts):
                arr[self.n_images : self.n_images + b] = f.permute(0, 2, 3, 1).numpy()
        self.moments.update(rows)
        self.n_images += b

    def vectors(self) -> np.ndarray:
        """The full patch vectors, ``(n_rows, dim)`` (a store made with ``compact=False``)."""
        if self._vectors is None:
            raise ValueError("a compact store keeps no full vectors; use projected()")
        return self._vectors[: self.n_rows]

    def projected(self, pca: PCA) -> np.ndarray:
        """Every patch vector projected by ``pca``: ``(n_rows, d)`` float32, in chunks."""
        d = pca.n_components
        bank = np.empty((self.n_rows, d), dtype=np.float32)
        if self._maps is None:
            step = 8192  # small chunks: the centred copy of a chunk is a temporary (60 MB here)
            for i in range(0, self.n_rows, step):
                bank[i : i + step] = pca.transform(self._vectors[i : i + step]).numpy()  # type: ignore[index]
            return bank
        step = max(1, 8192 // self.grid_cells)  # images per projection call
        g = self.grid_cells
        with torch.inference_mode():
            for i in range(0, self.n_images, step):
                stop = min(i + step, self.n_images)
                parts = [torch.from_numpy(a[i:stop]).permute(0, 3, 1, 2) for a in self._maps]
                proj = self.extractor.project_compact(parts, pca.mean_tensor, pca.components_tensor)
                bank[i * g : stop * g] = proj.reshape(-1, d).numpy()
        return bank

    def release(self) -> None:
        """Drop the stored features (the moments stay)."""
        self._vectors = None
        self._maps = None
