"""The command line's shared options: the typer option types of the method and run flags, and
the functions that turn them into a configuration (used by every command: ``fit``, ``evaluate``,
``fit-many``, ...). Light: importing it imports neither torch nor the package's models.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

Preset = Annotated[str, typer.Option("--preset", help="Named configuration: paper (default), ...")]
BackboneOpt = Annotated[str | None, typer.Option("--backbone", help="Backbone name (see `patchknn info`).")]
WeightsOpt = Annotated[
    str | None, typer.Option("--weights", help="Local backbone weights file (offline use).")
]
LayersOpt = Annotated[
    str | None, typer.Option("--layers", help="Comma-separated layer names, e.g. layer1,layer2,layer3.")
]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="Input resize (pixels).")]
GridOpt = Annotated[int | None, typer.Option("--grid-size", help="Patch grid side.")]
PcaOpt = Annotated[
    float | None, typer.Option("--pca-variance", help="Variance PCA keeps, in (0,1]; 0 disables PCA.")
]
KOpt = Annotated[int | None, typer.Option("--k", "-k", help="Nearest neighbours averaged per patch.")]
AggOpt = Annotated[int | None, typer.Option("--aggregation", help="Local feature averaging (odd; 1=off).")]
LayerNormOpt = Annotated[
    bool | None, typer.Option("--layer-norm/--no-layer-norm", help="L2-normalise each layer's features.")
]
SigmaOpt = Annotated[float | None, typer.Option("--smoothing-sigma", help="Map blur in grid cells (0=off).")]
ScoreOpt = Annotated[str | None, typer.Option("--image-score", help="max (paper) or topk_mean.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
IndexOpt = Annotated[str | None, typer.Option("--index", help="Search: flat (exact), ivf or hnsw.")]
CoresetOpt = Annotated[
    float | None, typer.Option("--coreset-ratio", help="Share of the memory bank kept (1 = all).")
]
TtaOpt = Annotated[str | None, typer.Option("--tta", help="Flip test-time augmentation: hflip,vflip.")]
ThresholdOpt = Annotated[
    str | None, typer.Option("--threshold-method", help="Threshold calibration: quantile, sigma, none.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any other method option as NAME=VALUE (repeatable), e.g. index_nprobe=16."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per backbone call.")]
WorkersOpt = Annotated[
    str,
    typer.Option(
        "--workers", help="Image-decoding worker processes, or auto (none for one batch, else 1-2)."
    ),
]


def workers_option(value: str) -> Any:
    """``--workers``: ``auto`` or a non-negative integer."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        from patchknn.errors import ConfigError

        raise ConfigError(f"--workers must be an integer >= 0 or auto, got {value!r}") from None
OnErrorOpt = Annotated[
    str, typer.Option("--on-error", help="Unreadable image: stop (default) or skip and report it.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")]
MaxPixelsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-pixels", min=0, help="Largest width*height of an input image (decompression-bomb guard; "
        "default 64000000; 0 = no limit).",
    ),
]


def method_options(
    preset_name: str,
    backbone: str | None = None,
    layers: str | None = None,
    image_size: int | None = None,
    grid_size: int | None = None,
    pca_variance: float | None = None,
    k: int | None = None,
    aggregation: int | None = None,
    layer_norm: bool | None = None,
    smoothing_sigma: float | None = None,
    image_score: str | None = None,
    seed: int | None = None,
    index: str | None = None,
    coreset_ratio: float | None = None,
    tta: str | None = None,
    threshold_method: str | None = None,
    settings: list[str] | None = None,
) -> Any:
    """The configuration from ``--preset`` plus every flag that was given."""
    from patchknn.config import preset

    given: dict[str, Any] = {
        "backbone": backbone,
        "layers": tuple(x.strip() for x in layers.split(",") if x.strip()) if layers else None,
        "image_size": image_size,
        "grid_size": grid_size,
        "k": k,
        "aggregation": aggregation,
        "layer_norm": layer_norm,
        "smoothing_sigma": smoothing_sigma,
        "image_score": image_score,
        "seed": seed,
        "index": index,
        "coreset_ratio": coreset_ratio,
        "tta": tuple(x.strip() for x in tta.split(",") if x.strip()) if tta is not None else None,
        "threshold_method": threshold_method,
    }
    overrides = {key: v for key, v in given.items() if v is not None}
    if pca_variance is not None:
        overrides["pca_variance"] = None if pca_variance == 0 else pca_variance
    overrides |= parse_settings(settings or [])
    return preset(preset_name, **overrides)


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["k=3", "tta=hflip,vflip", "pca_variance=none"]`` -> typed option values
    (:func:`patchknn.config.parse_option`, the one parser of option values)."""
    from patchknn.config import parse_option
    from patchknn.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects NAME=VALUE, got {item!r}")
        key, value = parse_option(name, raw, where="--set")
        out[key] = value
    return out


def max_pixels_option(value: int | None) -> dict[str, Any]:
    """``--max-pixels``: not given -> the package default; 0 -> no limit."""
    return {} if value is None else {"max_pixels": value or None}


def runtime_options(
    weights: str | None, device: str, batch_size: int, workers: str, on_error: str, quiet: bool,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """The keyword-only :class:`~patchknn.PatchKNN` options from the CLI's run flags."""
    return {
        **max_pixels_option(max_pixels),
        "weights": weights,
        "device": device,
        "batch_size": batch_size,
        "num_workers": workers_option(workers),
        "on_error": on_error,
        "progress": not quiet,
    }
