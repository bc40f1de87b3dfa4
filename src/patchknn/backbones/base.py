"""The interface every backbone implements, and the registry that names them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from patchknn.checksums import sha256_file as sha256_file  # the weights' identity; re-exported
from patchknn.errors import ConfigError, WeightsError

WeightsArg = str | Path | None
"""``None`` = the backbone's pretrained default (may download), a path = a local weights file,
``"random"`` = seeded random initialisation (for tests; never for real use; ``"random:SEED"`` picks
another seed than the default 0)."""

WEIGHTS_DIR_ENV = "PATCHKNN_WEIGHTS_DIR"
"""Environment variable naming a folder searched for default weights files (offline use)."""

B = TypeVar("B", bound="Backbone")


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


def build_network(cls: type[B], layers: Sequence[str], weights: WeightsArg) -> B:
    """``cls(layers)`` with its random initialisation seeded (by ``random:SEED``, else 0), so every
    build is the same network; with random weights its ``weights_id`` is that ``weights`` text."""
    seed = random_seed(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        net = cls(layers)
    if seed is not None:
        net.weights_id = str(weights)
    return net


# -- weights files -------------------------------------------------------------------------------
SUPPORTED_WEIGHTS_FORMATS = (
    "a .safetensors file, a Keras .h5 file (resnet50-keras / resnet50-caffe only) "
    "or a PyTorch state dict saved with torch.save (.pth, .pt)"
)
H5_SUFFIXES = (".h5", ".hdf5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def resolve_weights_path(weights: str | Path, known_names: Sequence[str] = ()) -> Path:
    """The weights file a ``weights`` path names: the file itself, or, for a folder, the first of
    ``known_names`` found in it (the files a backbone's default weights are published as).

    Raises:
        WeightsError: nothing exists at the path, or it is a folder without any of ``known_names``;
            the message says what is expected.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "w.safetensors").write_bytes(b"")
        >>> resolve_weights_path(folder, ["x.h5", "w.safetensors"]).name
        'w.safetensors'
    """
    path = Path(weights).expanduser()
    if path.is_dir():
        for name in known_names:
            if (path / name).is_file():
                return path / name
        if known_names:
            expected = f"a weights file such as {' or '.join(known_names)}"
        else:
            expected = f"a weights file ({SUPPORTED_WEIGHTS_FORMATS})"
        raise WeightsError(
            f"weights {path} is a folder, not a weights file: pass {expected}"
            + (", or a folder holding one of them" if known_names else "")
        )
    if not path.is_file():
        raise WeightsError(
            f"weights file not found: {path} (pass an existing file: {SUPPORTED_WEIGHTS_FORMATS}; "
            "or leave weights unset for the backbone's pretrained default)"
        )
    return path


def sniff_weights_format(path: str | Path) -> str | None:
    """``"safetensors"``, ``"h5"`` or ``"torch"`` from a file's first bytes; ``None`` for anything else.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "README.md"
        >>> _ = f.write_text("# not weights")
        >>> print(sniff_weights_format(f))
        None
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(_HDF5_SIGNATURE):
        return "h5"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip container
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a legacy torch.save pickle
        return "torch"
    if len(head) >= 10:  # safetensors: u64 little-endian header length, then a JSON object
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    return None


def read_state_dict_file(path: str | Path, *, h5_reader: Callable[[Path], dict[str, torch.Tensor]] | None = None,
                         backbone: str = "") -> dict[str, torch.Tensor]:
    """Read a weights file (resolved with :func:`resolve_weights_path` first) into a state dict.

    The format is told by the file's content, not its name: safetensors, HDF5 (read by
    ``h5_reader``; a backbone without one rejects ``.h5`` files) or ``torch.save`` (read with
    ``weights_only=True``; a checkpoint with a ``"state_dict"`` entry is unwrapped). Nothing is
    ever unpickled beyond tensors.

    Raises:
        WeightsError: the file is not in a supported format, is corrupt, or is not a state dict.
    """
    path = Path(path)
    kind = sniff_weights_format(path)
    if (kind == "h5" or path.suffix.lower() in H5_SUFFIXES) and h5_reader is None:
        raise WeightsError(
            f"{path}: Keras .h5 weights are only supported for resnet50-keras and resnet50-caffe, "
            f"not {backbone or 'this backbone'}"
        )
    if kind is None:
        raise WeightsError(f"{path} is not a weights file in a supported format ({SUPPORTED_WEIGHTS_FORMATS})")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if kind == "h5":
            assert h5_reader is not None
            return h5_reader(path)
        with open(path, "rb") as fh:  # a file object: torch.load must not guess the format from the name
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:
        if type(exc).__name__ == "UnpicklingError":  # torch.load(weights_only=True) refused an object
            raise WeightsError(
                f"{path} holds Python objects other than tensors, which patchknn never unpickles: expected "
                f"a state dict (names -> tensors) in a supported format ({SUPPORTED_WEIGHTS_FORMATS})"
            ) from None
        # a truncated or corrupt file
        raise WeightsError(f"could not read weights file {path} ({kind}): {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors)")
    return dict(obj)


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
