"""Feature backbones: a small registry, one module per family."""

from patchknn.backbones.base import (
    Backbone,
    LayerInfo,
    available_backbones,
    backbone_class,
    build_backbone,
    register_backbone,
)

__all__ = [
    "Backbone",
    "LayerInfo",
    "available_backbones",
    "backbone_class",
    "build_backbone",
    "register_backbone",
]
