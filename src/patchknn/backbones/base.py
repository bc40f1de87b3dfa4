"""The interface every backbone implements, and the registry that names them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from patchknn.errors import ConfigError, WeightsError

WeightsArg = str | Path | None
"""``None`` = the backbone's pretrained default (may download), a path = a local weights file,
``"random"`` = seeded random initialisation (for tests; never for real use; ``"random:SEED"`` picks
another seed than the default 0)."""

WEIGHTS_DIR_ENV = "PATCHKNN_WEIGHTS_DIR"
"""Environment variable naming a folder searched for default weights files (offline use)."""


@dataclass(frozen=True)
class LayerInfo:
    """One selectable feature layer of a backbone."""

    name: str
    channels: int
    stride: int
    aliases: tuple[str, ...] = ()


class Backbone(nn.Module):
    """A frozen feature network truncated after the deepest layer in use.

    Subclasses set :attr:`name`, :attr:`layer_infos` (all selectable layers, shallow to deep) and
    implement :meth:`normalize` and :meth:`forward_features`.
    """

    name: str = ""
    layer_infos: tuple[LayerInfo, ...] = ()
    default_layers: tuple[str, ...] = ()
    weights_id: str = ""
    """Provenance of the loaded weights, e.g. ``"torchvision:IMAGENET1K_V1"``, ``"sha256:<hex>"`` of
    a weights file, or ``"random"`` / ``"random:SEED"``; set by the factory."""

    def __init__(self, layers: Sequence[str]) -> None:
        super().__init__()
        self.layers = tuple(self.resolve_layers(layers))

    # -- layer names -------------------------------------------------------------------------
    @classmethod
    def resolve_layer(cls, name: str) -> str:
        """Map a layer name or alias to its canonical name; a clear error for unknown names."""
        for info in cls.layer_infos:
            if name == info.name or name in info.aliases:
                return info.name
        allowed = ", ".join(
            info.name + (f" (alias {', '.join(info.aliases)})" if info.aliases else "")
            for info in cls.layer_infos
        )
        raise ConfigError(f"unknown layer {name!r} for backbone {cls.name!r}; choose from: {allowed}")

    @classmethod
    def resolve_layers(cls, layers: Sequence[str]) -> list[str]:
        if not layers:
            raise ConfigError("layers must name at least one layer")
        resolved = [cls.resolve_layer(n) for n in layers]
        if len(set(resolved)) != len(resolved):
            raise ConfigError(f"layers must be distinct, got {list(layers)}")
        return resolved

    @classmethod
    def layer_info(cls, name: str) -> LayerInfo:
        canonical = cls.resolve_layer(name)
        return next(i for i in cls.layer_infos if i.name == canonical)

    # -- running -----------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``(B, 3, H, W)`` -> the float input this network expects."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised input -> ``{layer: (B, C, h, w)}`` for every layer in :attr:`layers`."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 RGB ``(B, 3, H, W)`` -> ``{layer: feature map}`` for the selected layers."""
        return self.forward_features(self.normalize(images))


# -- helpers for the family modules ------------------------------------------------------------
def random_seed(weights: WeightsArg) -> int | None:
    """The seed when ``weights`` asks for random initialisation, else ``None``.

    Example:
        >>> random_seed("random"), random_seed("random:7"), random_seed(None)
        (0, 7, None)
    """
    if not isinstance(weights, str):
        return None
    if weights == "random":
        return 0
    if weights.startswith("random:"):
        try:
            return int(weights.split(":", 1)[1])
        except ValueError:
            msg = f"weights {weights!r}: expected 'random' or 'random:SEED' (SEED an integer)"
            raise ConfigError(msg) from None
    return None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checked_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    ignore: Callable[[str], bool] = lambda key: False,
) -> None:
    """Load ``state_dict`` into ``module`` after checking keys and shapes.

    Keys for which ``ignore(key)`` is true (parts of the network that were not built, such as deeper
    layers or a classifier head) are dropped. Any other missing, unexpected or mis-shaped key raises
    :class:`~patchknn.errors.WeightsError` naming a few of them. A missing ``num_batches_tracked``
    buffer is not an error (older checkpoints do not store it).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> load_checked_state_dict(net, {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2),
        ...                               "1.weight": torch.zeros(1)}, "demo",
        ...                         ignore=lambda k: k.startswith("1."))
    """
    expected = module.state_dict()
    given = {k: v for k, v in state_dict.items() if k in expected or not ignore(k)}
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in given.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
    if problems:
        label = getattr(module, "name", "") or type(module).__name__
        raise WeightsError(f"weights from {source} do not match backbone {label}: " + "; ".join(problems))
    for k, v in expected.items():
        if k not in given:  # num_batches_tracked
            given[k] = v
    module.load_state_dict(given, strict=True)


BackboneFactory = Callable[[Sequence[str], WeightsArg], Backbone]
_REGISTRY: dict[str, tuple[type[Backbone], BackboneFactory]] = {}


def register_backbone(name: str, cls: type[Backbone]) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``factory(layers, weights) -> Backbone`` under ``name``."""

    def deco(factory: BackboneFactory) -> BackboneFactory:
        _REGISTRY[name] = (cls, factory)
        return factory

    return deco


def backbone_class(name: str) -> type[Backbone]:
    """The class behind a registered name (layer metadata without building weights)."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; choose from: {', '.join(available_backbones())}")
    return _REGISTRY[name][0]


def available_backbones() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def build_backbone(name: str, layers: Sequence[str] | None = None, weights: WeightsArg = None) -> Backbone:
    """Build backbone ``name`` truncated after the deepest of ``layers``, in eval mode, frozen."""
    cls = backbone_class(name)
    net = _REGISTRY[name][1](list(layers or cls.default_layers), weights)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _ensure_loaded() -> None:
    # Importing the family modules registers their backbones.
    from patchknn.backbones import efficientnet, resnet  # noqa: F401
