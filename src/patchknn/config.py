"""Every option of the method in one frozen dataclass (the named presets: :mod:`patchknn.presets`).

The ``paper`` preset (the defaults) is the method of the paper: Keras' ImageNet ResNet-50
(``resnet50-keras``: the MSRA/Caffe weights in Keras' network, stem pooling included), layers 1-3
resized to a 28x28 grid, PCA keeping 95 % of the variance, an exact 1-nearest-neighbour search.

Example:
    >>> from patchknn.config import PatchKNNConfig
    >>> PatchKNNConfig().k
    1
    >>> PatchKNNConfig(k=3).k
    3
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from patchknn.errors import ConfigError


@dataclass(frozen=True)
class PatchKNNConfig:
    """The method's options. Everything here is stored with a saved model.

    Attributes:
        backbone: registered backbone name (see ``patchknn info``); the default ``resnet50-keras``
            is the paper's network, ``resnet50-caffe`` the same weights with Caffe's stem pool.
        layers: feature layers by name (backbone-specific; Keras aliases accepted for ResNets);
            ``None`` = the backbone's default three layers. Stored as canonical names.
        image_size: images are resized to ``image_size x image_size`` (bilinear) before the backbone.
        grid_size: every layer's feature map is resized (bilinear) to ``grid_size x grid_size``;
            one patch vector per grid cell.
        pca_variance: PCA keeps the fewest components that explain at least this share of the
            variance of the normal patches, in ``(0, 1]``; ``None`` disables PCA.
        k: number of nearest memory-bank patches; a patch's score is the mean distance to them.
        aggregation: side of the local neighbourhood averaged around each feature-map cell before
            resizing (PatchCore's 3x3 average pooling); 1 = none (paper).
        layer_norm: L2-normalise each layer's vector at every cell before concatenation, so no
            layer dominates the distance by scale; off in the paper.
        smoothing_sigma: Gaussian blur of the anomaly map, in grid cells (scaled to the output
            resolution); 0 = none (paper). The image score is always taken from this map.
        guided_filter: the anomaly map's outline drawn from the image: the upsampled grid passed
            through a guided filter (He et al.) with the model's input image as the guide, window
            radius in grid cells; 0 = none (paper). Replaces ``smoothing_sigma`` for the map only:
            the image score, the threshold and the verdict do not change, and the map keeps the
            smoothed map's maximum (the image score with ``image_score="max"``;
            ``patchknn.scoring.grid_to_map``; docs/accuracy.md, "The map's outline from the image").
        guided_eps: the guided filter's regularisation, in squared intensity units of the image
            scaled to [0, 1]: image edges much weaker than its square root are smoothed over.
        image_score: ``"max"`` (paper: maximum of the map), ``"topk_mean"`` (mean of the
            ``image_score_topk`` highest grid cells) or ``"reweighted"`` (PatchCore's eq. 7: the
            maximum times ``1 - softmax`` of the top patch's distances to the ``image_score_topk``
            bank patches nearest its nearest bank patch; lowers scores whose match is a dense,
            common normal pattern).
        image_score_topk: cells averaged by ``"topk_mean"``; neighbourhood ``b`` of ``"reweighted"``
            (PatchCore: 9).
        border_cells: the outer ``border_cells`` rings of the patch grid take the value of the
            nearest cell inside them before the map and the image score are formed; 0 = none
            (paper). The cells at an image's edge see the backbone's zero padding and the crop's
            edge, which a memory bank of other crops covers badly: on magnetic_tile 28 of 33 good
            test tiles had their highest patch on the outermost ring (docs/accuracy.md). A defect
            that reaches into the image keeps its inner cells' scores. Not with ``"reweighted"``.
        grid_highpass: an ensemble member's local contrast: its z-scored grid minus the grid's
            Gaussian blur of this sigma (grid cells), negative parts set to 0, before the members
            are combined (after the border fill); 0 = the grid as it is (paper). It keeps what a
            view sees in a cell or two more than around it (small, dark defects) and drops its broad
            rises (docs/accuracy.md, "The bank, the distances and the raw view's local contrast").
            Only for ensemble members: a single model refuses it at fit.
        index: nearest-neighbour search: ``"flat"`` (exact, paper), ``"ivf"`` (inverted lists,
            approximate) or ``"hnsw"`` (graph, approximate).
        index_nlist: IVF lists; 0 = about ``4 * sqrt(bank size)``.
        index_nprobe: IVF lists visited per query.
        hnsw_m: HNSW graph degree.
        hnsw_ef_search: HNSW search breadth.
        coreset_ratio: share of the memory bank kept by greedy k-center coreset subsampling
            (PatchCore); 1.0 = keep every patch (paper).
        coreset_dim: dimension of the random projection used to select the coreset.
        threshold_method: how :meth:`PatchKNN.fit` calibrates the decision threshold from normal
            images only: ``"defects"`` (the lowest cut that best separates held-out normal image
            scores from synthetic defects made on the same images, never above the
            ``"quantile"`` rule's; see :mod:`patchknn.threshold`), ``"quantile"`` (a quantile of
            held-out normal image scores), ``"sigma"`` (mean + ``threshold_sigma`` standard
            deviations of them) or ``"none"``.
        threshold_quantile: the quantile for ``"quantile"`` (and the upper bound of ``"defects"``).
        threshold_sigma: the number of standard deviations for ``"sigma"``.
        calibration_images: at most this many training images are scored against the bank
            without their own patches (cross-validation, so no image is lost to the bank).
        tta: test-time augmentations whose maps are averaged: a subset of ``("hflip", "vflip")``;
            empty = none (paper). Only for categories whose normal images are flip-invariant.
        precision: number format of the backbone: ``"float32"`` (paper), ``"bfloat16"`` (autocast:
            about 2x faster on CPUs with native bfloat16 (AVX512-BF16/AMX) and on GPUs, features
            within ~0.5 % of float32; on a CPU without it, slower than float32: a warning says so)
            or ``"auto"`` (bfloat16 where it is native, float32 elsewhere; the ``fast`` preset).
            The PCA, memory bank and search stay float32.
        seed: seeds every random choice (random projections, coreset start, index training).
        ensemble: more members of an ensemble (see :mod:`patchknn.ensemble`), each given as the
            options in which it differs from this configuration, ``"NAME=VALUE+NAME=VALUE"``
            (e.g. ``"layer_norm=true"``, ``"backbone=efficientnet-lite2"``; a tuple value is
            written ``a/b``). Each member is scored on its own memory bank; the maps of all members
            (this configuration's first) are averaged after z-scoring each on held-out normal
            patches. Members share image and grid size and the threshold options. Empty = one
            model (paper).
        ensemble_weights: how the members' z-scored maps are weighed (:mod:`patchknn.member_weights`):
            ``"equal"`` (their mean) or ``"auto"`` (chosen at fit from normal images only: the
            weights, each member 0, 1 or 2 up to scale, whose maps best outline the synthetic
            defects the calibration makes on held-out normal images; at most ``MAX_AUTO_MEMBERS``
            members; a member weighted 0 is not scored). No effect on one model.
        train_flips: flipped copies of each training image whose patches join the memory bank too:
            a subset of ``("hflip", "vflip", "rot180")`` (rot180 = both flips); empty = none (paper).
            Only for products whose normal images may appear flipped (e.g. magnetic tiles, fabric);
            the bank grows by one image's patches per flip (``coreset_ratio`` applies to all of
            them), and a fit batch puts ``batch_size * (1 + len(train_flips))`` images through the
            backbone. The threshold's held-out scoring leaves an image's flipped copies out with it.
            Shared by every ensemble member.
    """

    backbone: str = "resnet50-keras"
    layers: tuple[str, ...] | None = None
    image_size: int = 224
    grid_size: int = 28
    pca_variance: float | None = 0.95
    k: int = 1
    aggregation: int = 1
    layer_norm: bool = False
    smoothing_sigma: float = 0.0
    guided_filter: float = 0.0
    guided_eps: float = 1e-4
    image_score: str = "max"
    image_score_topk: int = 10
    border_cells: int = 0
    grid_highpass: float = 0.0
    index: str = "flat"
    index_nlist: int = 0
    index_nprobe: int = 8
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    coreset_ratio: float = 1.0
    coreset_dim: int = 128
    threshold_method: str = "defects"
    threshold_quantile: float = 0.99
    threshold_sigma: float = 3.0
    calibration_images: int = 32
    tta: tuple[str, ...] = ()
    precision: str = "float32"
    seed: int = 0
    ensemble: tuple[str, ...] = ()
    ensemble_weights: str = "equal"
    train_flips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # a sequence of names; a bare string or a number is a mistake
        for name in ("layers", "tta", "ensemble", "train_flips"):
            value = getattr(self, name)
            if value is None and name == "layers":
                continue
            if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
                raise ConfigError(f"{name} must be a list of names, e.g. {_EXAMPLES[name]}, got {value!r}")
            if name == "layers" and not value:
                raise ConfigError("layers must name at least one layer (or be None for the backbone's default)")
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.backbone, str):  # e.g. a list from a damaged file: not a registry key
            from patchknn.backbones import available_backbones

            choices = ", ".join(available_backbones())
            raise ConfigError(f"unknown backbone {self.backbone!r}; choose from: {choices}")
        for name in _REAL_FIELDS:  # True/False are ints to Python, not a valid number here
            if isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a number, got {getattr(self, name)!r}")
        self.validate()
        # store canonical layer names, so equal configurations compare equal
        object.__setattr__(self, "layers", self.resolved_layers)

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every value that can be checked without building the backbone."""
        from patchknn.backbones import backbone_class

        cls = backbone_class(self.backbone)  # unknown backbone -> ConfigError listing the names
        layers = cls.resolve_layers(self.layers or cls.default_layers)
        _check_int("image_size", self.image_size, 32, 4096)
        _check_int("grid_size", self.grid_size, 1, 1024)
        deepest = max(cls.layer_info(n).stride for n in layers)
        finest = min(cls.layer_info(n).stride for n in layers)
        if self.image_size % deepest:
            raise ConfigError(
                f"image_size must be a multiple of {deepest} (the stride of the deepest layer), "
                f"got {self.image_size}"
            )
        finest_map = self.image_size // finest
        if self.grid_size > finest_map:
            raise ConfigError(
                f"grid_size {self.grid_size} is larger than the finest feature map of the layers "
                f"{list(layers)} ({finest_map}x{finest_map} for image_size {self.image_size}); "
                f"use at most {finest_map}"
            )
        if self.pca_variance is not None and not (
            isinstance(self.pca_variance, int | float) and 0.0 < float(self.pca_variance) <= 1.0
        ):
            raise ConfigError(f"pca_variance must be in (0, 1] or None, got {self.pca_variance!r}")
        _check_int("k", self.k, 1, 10_000)
        _check_int("aggregation", self.aggregation, 1, 15)
        if self.aggregation % 2 == 0:
            raise ConfigError(f"aggregation must be odd (1, 3, 5, ...), got {self.aggregation}")
        if not isinstance(self.smoothing_sigma, int | float) or not 0 <= self.smoothing_sigma <= 32:
            raise ConfigError(f"smoothing_sigma must be in [0, 32] grid cells, got {self.smoothing_sigma!r}")
        if self.image_score not in IMAGE_SCORES:
            raise ConfigError(f"image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        _check_int("image_score_topk", self.image_score_topk, 1, 1_000_000)
        _check_int("border_cells", self.border_cells, 0, 64)
        if self.border_cells and 2 * self.border_cells >= self.grid_size:
            raise ConfigError(
                f"border_cells {self.border_cells} leaves no inner cell of the {self.grid_size}x{self.grid_size} "
                f"grid; use at most {(self.grid_size - 1) // 2}"
            )
        if not isinstance(self.guided_filter, int | float) or not 0 <= self.guided_filter <= 16:
            raise ConfigError(f"guided_filter must be in [0, 16] grid cells, got {self.guided_filter!r}")
        if not isinstance(self.guided_eps, int | float) or not 0 < self.guided_eps <= 1:
            raise ConfigError(f"guided_eps must be in (0, 1], got {self.guided_eps!r}")
        if not isinstance(self.grid_highpass, int | float) or not 0 <= self.grid_highpass <= 16:
            raise ConfigError(f"grid_highpass must be in [0, 16] grid cells, got {self.grid_highpass!r}")
        if self.border_cells and self.image_score == "reweighted":
            raise ConfigError("border_cells needs image_score 'max' or 'topk_mean' (not 'reweighted')")
        if self.index not in INDEX_KINDS:
            raise ConfigError(f"index must be one of {INDEX_KINDS}, got {self.index!r}")
        _check_int("index_nlist", self.index_nlist, 0, 1_000_000)
        _check_int("index_nprobe", self.index_nprobe, 1, 1_000_000)
        _check_int("hnsw_m", self.hnsw_m, 2, 256)
        _check_int("hnsw_ef_search", self.hnsw_ef_search, 1, 100_000)
        if not isinstance(self.coreset_ratio, int | float) or not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio!r}")
        _check_int("coreset_dim", self.coreset_dim, 1, 100_000)
        if self.threshold_method not in THRESHOLD_METHODS:
            raise ConfigError(
                f"threshold_method must be one of {THRESHOLD_METHODS}, got {self.threshold_method!r}"
            )
        if not isinstance(self.threshold_quantile, int | float) or not 0.0 < self.threshold_quantile <= 1.0:
            raise ConfigError(f"threshold_quantile must be in (0, 1], got {self.threshold_quantile!r}")
        if not isinstance(self.threshold_sigma, int | float) or not 0.0 <= self.threshold_sigma <= 100:
            raise ConfigError(f"threshold_sigma must be in [0, 100], got {self.threshold_sigma!r}")
        _check_int("calibration_images", self.calibration_images, 0, 100_000)
        for name, kinds in (("tta", TTA_KINDS), ("train_flips", TRAIN_FLIPS)):  # flips: distinct known kinds
            value = getattr(self, name)
            if any(t not in kinds for t in value) or len(set(value)) != len(value):
                raise ConfigError(f"{name} must be distinct values from {kinds}, got {list(value)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _check_int("seed", self.seed, 0, 2**32 - 1)
        if self.ensemble_weights not in ENSEMBLE_WEIGHTS:
            raise ConfigError(f"ensemble_weights must be one of {ENSEMBLE_WEIGHTS}, got {self.ensemble_weights!r}")
        if self.ensemble_weights == "auto" and len(self.ensemble) >= MAX_AUTO_MEMBERS:
            raise ConfigError(f"ensemble_weights='auto' weighs at most {MAX_AUTO_MEMBERS} members; use 'equal'")
        if self.ensemble:
            self.ensemble_members()  # every member parses, validates and differs from the others

    @property
    def grids_per_image(self) -> int:
        """How many patch grids each training image puts in the bank: itself and its ``train_flips``."""
        return 1 + len(self.train_flips)

    @property
    def rows_per_image(self) -> int:
        """The full bank's rows per training image: ``grid_size**2`` for each of its grids."""
        return self.grid_size**2 * self.grids_per_image

    @property
    def resolved_layers(self) -> tuple[str, ...]:
        """Canonical names of the layers in use."""
        from patchknn.backbones import backbone_class

        cls = backbone_class(self.backbone)
        return tuple(cls.resolve_layers(self.layers or cls.default_layers))

    def ensemble_members(self) -> list[PatchKNNConfig]:
        """The configurations of the ensemble's members, this one (without ``ensemble``) first.

        Example:
            >>> [c.layer_norm for c in PatchKNNConfig(ensemble=("layer_norm=true",)).ensemble_members()]
            [False, True]
        """
        base = dataclasses.replace(self, ensemble=())
        members, seen = [base], {_config_key(base)}
        for spec in self.ensemble:
            opts = network_options(parse_member(spec), base.backbone)
            try:
                member = dataclasses.replace(base, **opts)
            except ConfigError as e:
                raise ConfigError(f"ensemble member {spec!r}: {e}") from None
            key = _config_key(member)
            if key in seen:
                raise ConfigError(f"ensemble member {spec!r} repeats another member; members must differ")
            seen.add(key)
            members.append(member)
        return members

    def replace(self, **changes: Any) -> PatchKNNConfig:
        """A copy with some options changed (validated)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """``backbone=...`` and every option that differs from its default, as ``k=v`` text."""
        changed = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default
        }
        return ", ".join(f"{k}={v!r}" for k, v in {"backbone": self.backbone, **changed}.items())

    def as_kwargs(self) -> dict[str, Any]:
        """Every option as ``name -> value`` (the keyword arguments of :class:`~patchknn.PatchKNN`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.resolved_layers)
        d["tta"] = list(self.tta)
        d["ensemble"] = list(self.ensemble)
        d["train_flips"] = list(self.train_flips)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchKNNConfig:
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise ConfigError(f"a configuration must be a mapping of option names to values, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; known: {sorted(names)}")
        data = dict(data)
        for key in ("layers", "tta", "ensemble", "train_flips"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)


_EXAMPLES = {
    "layers": "['layer2', 'layer3']", "tta": "['hflip']", "ensemble": "['layer_norm=true']",
    "train_flips": "['hflip', 'vflip']",
}
_REAL_FIELDS = (
    "pca_variance", "smoothing_sigma", "guided_filter", "guided_eps", "grid_highpass", "coreset_ratio",
    "threshold_quantile", "threshold_sigma",
)

IMAGE_SCORES = ("max", "topk_mean", "reweighted")
INDEX_KINDS = ("flat", "ivf", "hnsw")
THRESHOLD_METHODS = ("defects", "quantile", "sigma", "none")
TTA_KINDS = ("hflip", "vflip")
TRAIN_FLIPS = ("hflip", "vflip", "rot180")
PRECISIONS = ("float32", "bfloat16", "auto")
ENSEMBLE_WEIGHTS = ("equal", "auto")
MAX_AUTO_MEMBERS = 4  # ensemble_weights="auto" tries 3^n - 1 weight vectors (65 up to scale for 4 members)
#: options every ensemble member shares with the main configuration
ENSEMBLE_SHARED = (
    "image_size", "grid_size", "border_cells", "guided_filter", "guided_eps", "ensemble", "ensemble_weights",
    "threshold_method", "threshold_quantile", "threshold_sigma", "calibration_images", "train_flips",
)

def network_options(opts: dict[str, Any], backbone: str | None) -> dict[str, Any]:
    """``opts`` applied over a configuration on ``backbone``: if they name another backbone but no
    ``layers``, that network gets its own default layers (``layers=None``), since layer names belong
    to one network. Used by presets, ensemble members and their configurations alike.

    Example:
        >>> network_options({"backbone": "resnet50"}, "efficientnet-lite2")
        {'backbone': 'resnet50', 'layers': None}
        >>> network_options({"layer_norm": True}, "efficientnet-lite2")
        {'layer_norm': True}
    """
    if opts.get("backbone", backbone) != backbone and "layers" not in opts:
        return {**opts, "layers": None}
    return opts


#: Options whose "off"/default value is ``None``, written ``none`` (or ``null``) in text.
NONE_FIELDS = ("pca_variance", "layers")


def parse_option(name: str, raw: str, *, list_sep: str = ",", where: str = "--set") -> tuple[str, Any]:
    """One option from text: ``("k", "3")`` -> ``("k", 3)``; the one parser of option values (the
    CLI's ``--set NAME=VALUE``, ensemble member specs, server and Ray job settings).

    Names may use ``-`` for ``_``; booleans are true/false/yes/no/on/off/1/0; lists (``layers``,
    ``tta``, ``ensemble``, ``train_flips``) are split on ``list_sep``; ``none``/``null`` is ``None`` for the options
    of :data:`NONE_FIELDS`. The value is checked when the configuration is built.

    Example:
        >>> parse_option("layer-norm", "yes"), parse_option("layers", "layer2/layer3", list_sep="/")
        (('layer_norm', True), ('layers', ('layer2', 'layer3')))
    """
    fields = {f.name: f for f in dataclasses.fields(PatchKNNConfig)}
    name, raw = name.strip().replace("-", "_"), raw.strip()
    if name not in fields:
        raise ConfigError(
            f"{where} expects NAME=VALUE with NAME an option, got {name!r}; the options are {sorted(fields)}"
        )
    default = fields[name].default
    if raw.lower() in ("none", "null") and name in NONE_FIELDS:
        return name, None
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ConfigError(f"{where} {name}= expects true or false, got {raw!r}")
        return name, raw.lower() in ("true", "1", "yes", "on")
    if isinstance(default, tuple) or name == "layers":
        return name, tuple(x.strip() for x in raw.split(list_sep) if x.strip())
    if isinstance(default, int | float) or name in _REAL_FIELDS:
        kind = float if (isinstance(default, float) or name in _REAL_FIELDS) else int
        try:
            return name, kind(raw)
        except ValueError:
            raise ConfigError(f"{where} {name}: {raw!r} is not a valid {kind.__name__}") from None
    return name, raw


def parse_member(spec: str) -> dict[str, Any]:
    """The options of one ensemble member: ``"backbone=efficientnet-lite2+layer_norm=true"`` -> dict
    (lists inside a member are separated by ``/``: ``layers=layer2/layer3``).

    Example:
        >>> parse_member("backbone=efficientnet-lite2+layer_norm=true")
        {'backbone': 'efficientnet-lite2', 'layer_norm': True}
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"an ensemble member must be a non-empty 'NAME=VALUE[+NAME=VALUE]' string, got {spec!r}")
    out: dict[str, Any] = {}
    for part in spec.split("+"):
        name, sep, raw = part.partition("=")
        if not sep:
            raise ConfigError(
                f"ensemble member {spec!r}: expected NAME=VALUE[+NAME=VALUE...] with NAME an option, got {part!r}"
            )
        name, value = parse_option(name, raw, list_sep="/", where=f"ensemble member {spec!r}")
        if name in ENSEMBLE_SHARED:
            raise ConfigError(f"ensemble member {spec!r}: {name} is shared by all members and cannot differ")
        out[name] = value
    return out


def member_spec(base: PatchKNNConfig, member: PatchKNNConfig) -> str:
    """The ensemble-member string of ``member`` relative to ``base`` (inverse of :func:`parse_member`).

    Example:
        >>> member_spec(PatchKNNConfig(), PatchKNNConfig(backbone="efficientnet-lite2", layer_norm=True))
        'backbone=efficientnet-lite2+layer_norm=true'
    """
    from patchknn.backbones import backbone_class

    parts = []
    for f in dataclasses.fields(PatchKNNConfig):
        value = getattr(member, f.name)
        if f.name == "ensemble" or value == getattr(base, f.name):
            continue
        if f.name in ENSEMBLE_SHARED:
            raise ConfigError(f"ensemble members must share {f.name} ({getattr(base, f.name)!r} vs {value!r})")
        if (
            f.name == "layers"
            and member.backbone != base.backbone
            and tuple(value) == tuple(backbone_class(member.backbone).default_layers)
        ):
            continue  # the other network's default layers: implied by the backbone
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = "/".join(value)
        else:
            text = "none" if value is None else str(value)
        parts.append(f"{f.name}={text}")
    if not parts:
        raise ConfigError("an ensemble member must differ from the main configuration")
    return "+".join(parts)


def _config_key(config: PatchKNNConfig) -> str:
    import json

    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
