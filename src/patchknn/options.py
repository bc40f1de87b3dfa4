"""The command line's shared options, defined once.

Two groups of flags recur across commands: the *method* flags (``--preset``, a typed flag per
common :class:`~patchknn.config.PatchKNNConfig` option, ``--set NAME=VALUE``) and the *run* flags
(``--weights``, ``--device``, ``--batch-size``, ``--workers``, ``--on-error``, ``--quiet``,
``--max-pixels``). A command asks for a group by a parameter annotated with its class and
decorated with :func:`with_options`; typer then sees the group's flags in its place, and the
command receives one :class:`MethodChoice` or :class:`RunOptions`::

    @app.command()
    @with_options(method=PRESET_METHOD_FLAGS, run=run_flags("weights", "device", "batch_size"))
    def fit_many(train_dir: Path, method: MethodChoice, run: RunOptions) -> None:
        model = PatchKNN.from_config(method.config(), **run.model_kwargs())

Three variants of the method group: :data:`METHOD_FLAGS` (``--preset`` takes the named presets and
``auto``, which ``patchknn tune`` resolves from the training images: ``fit``, ``evaluate``),
:data:`PRESET_METHOD_FLAGS` (named presets only: ``fit-many``) and :data:`FIXED_METHOD_FLAGS` (no
``--preset``: the options ``patchknn tune`` fixes in every candidate).

The method flags are derived from the configuration's fields: the name (``image_size`` ->
``--image-size``), the value type (the field default's), and the value parser
(:func:`patchknn.config.parse_option`, the one parser of option values, as ``--set`` uses); only
the help text is written here. Light: importing this module imports neither torch nor the models.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from patchknn.config import PatchKNNConfig, parse_option
from patchknn.errors import ConfigError
from patchknn.presets import AUTO_PRESET as AUTO
from patchknn.presets import PRESETS, preset

F = TypeVar("F", bound=Callable[..., Any])

# ------------------------------------------------------------------------------------ method flags
#: The method options that have their own flag: field -> (short flag or "", help). Everything
#: else about a flag comes from the field of PatchKNNConfig; any option at all is ``--set NAME=VALUE``.
METHOD_FLAG_HELP: dict[str, tuple[str, str]] = {
    "backbone": ("", "Backbone name (see `patchknn info`)."),
    "layers": ("", "Comma-separated layer names, e.g. layer1,layer2,layer3."),
    "image_size": ("", "Input resize (pixels)."),
    "grid_size": ("", "Patch grid side."),
    "pca_variance": ("", "Variance PCA keeps, in (0,1]; 0 disables PCA."),
    "k": ("-k", "Nearest neighbours averaged per patch."),
    "aggregation": ("", "Local feature averaging (odd; 1=off)."),
    "layer_norm": ("", "L2-normalise each layer's features."),
    "smoothing_sigma": ("", "Map blur in grid cells (0=off)."),
    "image_score": ("", "max (paper), topk_mean or reweighted."),
    "seed": ("", "Random seed (tune: also of its split and defects)."),
    "index": ("", "Search: flat (exact), ivf or hnsw."),
    "coreset_ratio": ("", "Share of the memory bank kept (1 = all)."),
    "tta": ("", "Flip test-time augmentation: hflip,vflip."),
    "train_flips": ("", "Flipped training images in the bank too: hflip,vflip,rot180."),
    "threshold_method": ("", "Threshold calibration: defects (default), quantile, sigma, none."),
}
#: numeric flags whose 0 means the option's ``None`` (off)
_ZERO_IS_NONE = ("pca_variance",)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any other method option as NAME=VALUE (repeatable), e.g. index_nprobe=16."),
]


def method_flag(name: str) -> Any:
    """The typer annotation of the method flag of configuration field ``name`` (one of
    :data:`METHOD_FLAG_HELP`), for a command that takes that flag alone."""
    field = {f.name: f for f in dataclasses.fields(PatchKNNConfig)}[name]
    short, help_text = METHOD_FLAG_HELP[name]
    flag = "--" + name.replace("_", "-")
    kind = type(field.default) if isinstance(field.default, bool | int | float | str) else str  # lists: text
    decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    return Annotated[kind | None, typer.Option(*decls, *([short] if short else []), help=help_text)]


def _flag_value(name: str, value: Any) -> Any:
    """A method flag's value as the configuration's (through the one parser of option values)."""
    if name in _ZERO_IS_NONE and value == 0:
        return None
    return parse_option(name, str(value).lower() if isinstance(value, bool) else str(value),
                        where=f"--{name.replace('_', '-')}")[1]


@dataclass(frozen=True)
class MethodChoice:
    """What the method flags chose: a preset name and the options given on top of it.

    Attributes:
        preset: the ``--preset`` name.
        overrides: the options given by flags and ``--set``, as configuration values.
    """

    preset: str = "paper"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def config(self) -> PatchKNNConfig:
        """The validated configuration (:class:`~patchknn.errors.ConfigError` on a bad value, and
        for ``auto``, which only ``patchknn tune`` can resolve)."""
        if self.preset == AUTO:
            raise ConfigError(f"--preset {AUTO} is chosen by `patchknn tune` from the training images; "
                              f"this command takes a named preset: {', '.join(PRESETS)}")
        return preset(self.preset, **self.overrides)


def method_choice(preset_name: str = "paper", settings: list[str] | None = None, **flags: Any) -> MethodChoice:
    """The :class:`MethodChoice` of ``--preset``, the method flags (``None`` = not given) and ``--set``."""
    overrides = {name: _flag_value(name, v) for name, v in flags.items() if v is not None}
    return MethodChoice(preset_name, overrides | parse_settings(settings or []))


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["k=3", "tta=hflip,vflip", "pca_variance=none"]`` -> typed option values
    (:func:`patchknn.config.parse_option`, the one parser of option values)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects NAME=VALUE, got {item!r}")
        key, value = parse_option(name, raw, where="--set")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------- run flags
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per backbone call.")]
WorkersOpt = Annotated[
    str, typer.Option("--workers", help="Image-decoding worker processes, or auto (none for one batch, else 1-2).")
]
OnErrorOpt = Annotated[str, typer.Option("--on-error", help="Unreadable image: stop (default) or skip and report it.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")]
MaxPixelsOpt = Annotated[
    int | None,
    typer.Option("--max-pixels", min=0, help="Largest width*height of an input image (decompression-bomb guard; "
                 "default 64000000; 0 = no limit)."),
]
WeightsOpt = Annotated[str | None, typer.Option("--weights", help="Local backbone weights file (offline use).")]
#: ``predict`` and ``score-archive``: what to do with a saved model's answers
ThresholdOverrideOpt = Annotated[
    float | None, typer.Option("--threshold", help="Override the model's decision threshold.")
]
MaxFitImagesOpt = Annotated[
    int | None,
    typer.Option(
        "--max-fit-images", min=2, help="`patchknn tune`: fit candidates on at most this many images (faster)."
    ),
]
ResolutionOpt = Annotated[str, typer.Option("--resolution", help="Map size: input (model input size) or original.")]


def workers_option(value: str) -> Any:
    """``--workers``: ``auto`` or a non-negative integer."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--workers must be an integer >= 0 or auto, got {value!r}") from None


def max_pixels_option(value: int | None) -> dict[str, Any]:
    """``--max-pixels``: not given -> the package default; 0 -> no limit."""
    return {} if value is None else {"max_pixels": value or None}


@dataclass(frozen=True)
class RunOptions:
    """The run flags of a command (those it does not offer keep these defaults)."""

    weights: str | None = None
    device: str = "cpu"
    batch_size: int = 16
    workers: str = "auto"
    on_error: str = "stop"
    quiet: bool = False
    max_pixels: int | None = None

    def load_kwargs(self) -> dict[str, Any]:
        """The run options of :meth:`PatchKNN.load <patchknn.model.PatchKNN.load>`."""
        return {
            **max_pixels_option(self.max_pixels),
            "device": self.device,
            "batch_size": self.batch_size,
            "num_workers": workers_option(self.workers),
            "on_error": self.on_error,
            "progress": not self.quiet,
        }

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword-only :class:`~patchknn.PatchKNN` options (the load options and the weights)."""
        return {**self.load_kwargs(), "weights": self.weights}


_RUN_ANNOTATIONS: dict[str, Any] = {
    "weights": WeightsOpt, "device": DeviceOpt, "batch_size": BatchOpt, "workers": WorkersOpt,
    "on_error": OnErrorOpt, "quiet": QuietOpt, "max_pixels": MaxPixelsOpt,
}


# ------------------------------------------------------------------------------------------ groups
@dataclass(frozen=True)
class OptionGroup:
    """Flags a command receives as one value: typer parameters and the function that builds it."""

    parameters: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]


def _keyword(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def preset_option(auto: bool) -> Any:
    """The typer annotation of ``--preset``: the named presets, and ``auto`` when the command resolves it."""
    text = f"Named configuration: {', '.join(PRESETS)}"
    if auto:
        text += f" or {AUTO} (`patchknn tune` chooses it from the training images)"
    return Annotated[str, typer.Option("--preset", help=f"{text} (default paper).")]


def method_flags(*, preset_flag: bool = True, auto: bool = False) -> OptionGroup:
    """``--preset`` (without ``preset_flag``: none; ``auto``: it may be ``auto``), the method flags
    and ``--set`` -> :class:`MethodChoice` (the preset ``auto`` when there is no ``--preset``)."""
    flags = (
        *(_keyword(name, method_flag(name), None) for name in METHOD_FLAG_HELP),
        _keyword("settings", SetOpt, None),
    )
    if not preset_flag:
        return OptionGroup(flags, functools.partial(method_choice, AUTO))
    return OptionGroup((_keyword("preset_name", preset_option(auto), "paper"), *flags), method_choice)


#: ``fit``, ``evaluate``: ``--preset`` (a named preset or ``auto``), the method flags and ``--set``
METHOD_FLAGS = method_flags(auto=True)
#: ``fit-many``: ``--preset`` (a named preset), the method flags and ``--set``
PRESET_METHOD_FLAGS = method_flags()
#: ``tune``: the method flags and ``--set``, fixed in every candidate (no ``--preset``)
FIXED_METHOD_FLAGS = method_flags(preset_flag=False)


def run_flags(*names: str) -> OptionGroup:
    """The run flags ``names`` (in this order; from :class:`RunOptions`' fields) -> :class:`RunOptions`."""
    defaults = RunOptions()
    return OptionGroup(
        tuple(_keyword(n, _RUN_ANNOTATIONS[n], getattr(defaults, n)) for n in names), RunOptions
    )


def with_options(**groups: OptionGroup) -> Callable[[F], F]:
    """Replace each parameter of the command named in ``groups`` by that group's flags (for typer)
    and hand the command the group's value in its place."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        params: list[inspect.Parameter] = []
        for p in signature.parameters.values():
            if p.name in groups:
                params.extend(groups[p.name].parameters)
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"{command.__name__}: a flag of an option group repeats a parameter: {names}")

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            for name, group in groups.items():
                kwargs[name] = group.build(**{p.name: kwargs.pop(p.name) for p in group.parameters})
            return command(**kwargs)

        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run  # type: ignore[return-value]

    return decorate


#: ``--seed`` alone (``demo``)
SeedOpt = method_flag("seed")
