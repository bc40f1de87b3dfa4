"""The ``patchknn`` command line: a thin shell over the Python API.

Commands: ``fit``, ``predict``, ``evaluate``, ``info``, ``demo`` (and those of optional parts).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.exceptions import TyperException

from patchknn.errors import PatchKNNError
from patchknn.options import (
    AUTO,
    METHOD_FLAGS,
    MaxFitImagesOpt,
    MethodChoice,
    QuietOpt,
    ResolutionOpt,
    RunOptions,
    SeedOpt,
    ThresholdOverrideOpt,
    max_pixels_option,
    run_flags,
    with_options,
)

app = typer.Typer(
    name="patchknn",
    help="Unsupervised visual anomaly detection: learn normal from defect-free images, score new ones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: the run flags of the commands that fit a model, in the order of their help
_RUN = ("weights", "device", "batch_size", "workers", "on_error", "quiet", "max_pixels")


# ------------------------------------------------------------------------------------ commands
@app.command()
@with_options(method=METHOD_FLAGS, run=run_flags(*_RUN))
def fit(
    train_dir: Annotated[list[Path], typer.Argument(help="Folder(s) or files of defect-free images.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model directory to write.")],
    method: MethodChoice,
    run: RunOptions,
    budget: Annotated[
        float, typer.Option("--budget", min=0.01, help="With --preset auto: minutes `patchknn tune` may spend.")
    ] = 10.0,
    compact: Annotated[
        bool,
        typer.Option(
            "--compact",
            help="With a coreset: leave the full training bank out of the model (a smaller file; "
            "such a model cannot be taught more normal images with partial-fit).",
        ),
    ] = False,
) -> None:
    """Learn normality from defect-free images and save the model (--preset auto: `patchknn tune`
    chooses the configuration from these images first, and the model records why)."""
    from patchknn.model import PatchKNN
    from patchknn.tune.commands import auto_config

    config, tuned = auto_config(
        method.preset, method.overrides, train_dir, budget, run.model_kwargs(), quiet=run.quiet
    )
    model = PatchKNN.from_config(config, **run.model_kwargs())
    model.fit([str(p) for p in train_dir])
    if tuned is not None:
        model.fit_info_["tune"] = tuned.to_dict()
    model.save(output, training=not compact)
    info = model.fit_info_
    for src, reason in model.skipped_:
        typer.echo(f"skipped {src}: {reason}", err=True)
    if not run.quiet:
        typer.echo(
            f"fitted on {_count(info['n_train_images'], 'image')} in {info['fit_seconds']:.1f} s: "
            f"{info['bank_size']} patches x {info['n_components']} dims -> {output}"
        )


@app.command()
@with_options(run=run_flags(*_RUN[1:]))
def predict(
    model_path: Annotated[
        Path, typer.Argument(metavar="MODEL", help="A model saved by `patchknn fit`, or a `patchknn export` folder.")
    ],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders to score.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for scores and maps.")],
    threshold: ThresholdOverrideOpt = None,
    resolution: ResolutionOpt = "input",
    maps: Annotated[bool, typer.Option("--maps/--no-maps", help="Write .npy maps and overlays.")] = True,
    run: RunOptions = RunOptions(),
) -> None:
    """Score images: scores.csv / scores.json with an OK/NG verdict, and per image the map (.npy), a
    heat-map overlay (colours on the model's fixed scale, predicted region outlined) and, when there
    is a threshold, the binary defect mask (.png)."""
    from patchknn.runtime import is_exported

    if is_exported(model_path):  # a `patchknn export` folder: onnxruntime/OpenVINO, no torch
        from patchknn.runtime import load as load_exported

        model = load_exported(
            model_path, batch_size=run.batch_size, on_error=run.on_error, **max_pixels_option(run.max_pixels)
        )
    else:
        from patchknn.model import PatchKNN

        model = PatchKNN.load(model_path, **run.load_kwargs())
    if threshold is not None:
        model.threshold_ = float(threshold)
    rows = _write_predictions(model, [str(p) for p in images], output, resolution=resolution, maps=maps)
    if not run.quiet:
        typer.echo(_summary(rows, output))


@app.command()
@with_options(method=METHOD_FLAGS, run=run_flags(*(n for n in _RUN if n != "on_error")))
def evaluate(
    data_root: Annotated[Path, typer.Option("--data-root", help="MVTec-AD-style root folder.")],
    category: Annotated[
        list[str] | None, typer.Option("--category", "-c", help="Category to evaluate (repeatable).")
    ] = None,
    all_categories: Annotated[bool, typer.Option("--all", help="Every category under the root.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write results JSON here.")] = None,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write an HTML report (index.html, results.json, assets/) into this folder."),
    ] = None,
    resolution: Annotated[
        str, typer.Option("--resolution", help="input (masks resized to image size) or original.")
    ] = "input",
    method: MethodChoice = MethodChoice(),
    run: RunOptions = RunOptions(),
    budget: Annotated[
        float,
        typer.Option("--budget", min=0.01, help="With --preset auto: minutes `patchknn tune` may spend per category."),
    ] = 10.0,
    max_fit_images: MaxFitImagesOpt = None,
    model_path: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="Evaluate this saved model (`patchknn fit`) with its own threshold instead of fitting one "
            "(the method flags do not apply).",
        ),
    ] = None,
) -> None:
    """Fit on train/good of each category, score its test set, report the paper's metrics
    (--preset auto: `patchknn tune` chooses each category's configuration from train/good alone;
    --model: score a saved model, no fit)."""
    from patchknn.data import list_categories
    from patchknn.errors import ConfigError
    from patchknn.evaluation import evaluate as run_evaluation
    from patchknn.evaluation import evaluate_model, evaluation_config, markdown_table

    if model_path is not None and (method.overrides or method.preset != MethodChoice().preset or max_fit_images):
        raise ConfigError("--model evaluates a saved model as it was fitted: method flags do not apply")
    if max_fit_images is not None and method.preset != AUTO:
        raise ConfigError("--max-fit-images applies to --preset auto (the candidates `patchknn tune` fits)")
    if all_categories:
        names = list_categories(data_root)
    elif category:
        names = list(category)
    else:
        raise ConfigError("give --category NAME (repeatable) or --all")
    collector = None
    if report is not None:
        from patchknn.report import ReportCollector

        collector = ReportCollector(report, progress=not run.quiet)
    if model_path is not None:
        from patchknn.model import PatchKNN

        model = PatchKNN.load(model_path, **run.load_kwargs())
        results = evaluate_model(model, data_root, names, resolution=resolution, on_category=collector)
    else:
        config = evaluation_config(
            method.preset, method.overrides, budget_minutes=budget, max_fit_images=max_fit_images
        )
        results = run_evaluation(
            data_root, names, config, resolution=resolution, on_category=collector, **run.model_kwargs()
        )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2))
    page = collector.finish(results) if collector is not None else None
    if not run.quiet:
        typer.echo(markdown_table(results))
        if output is not None:
            typer.echo(f"\nresults -> {output}")
        if page is not None:
            typer.echo(f"report -> {page}")


@app.command()
def info(
    model_path: Annotated[
        Path | None, typer.Argument(metavar="[MODEL]", help="Show a saved model instead.")
    ] = None,
) -> None:
    """Version, backbones, layers and presets; or the contents of a saved model."""
    from patchknn._version import __version__

    if model_path is not None:
        from patchknn.serialization import read_meta

        doc = read_meta(model_path)
        typer.echo(json.dumps({k: v for k, v in doc.items() if k != "files"}, indent=2))
        return
    from patchknn.backbones import available_backbones, backbone_class
    from patchknn.presets import PRESETS

    typer.echo(f"patchknn {__version__}\n\nbackbones (default layers first):")
    for name in available_backbones():
        cls = backbone_class(name)
        layers = ", ".join(
            f"{i.name}[{i.channels}ch /{i.stride}]" + (f" ({'/'.join(i.aliases)})" if i.aliases else "")
            for i in cls.layer_infos
        )
        typer.echo(f"  {name}: default {','.join(cls.default_layers)}; layers {layers}")
    typer.echo("\npresets:")
    for name, values in PRESETS.items():
        typer.echo(f"  {name}: {values or '(the paper: all defaults)'}")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for data, model and results.")] = Path(
        "demo-output"
    ),
    backbone: Annotated[str, typer.Option("--backbone", help="Backbone (offline default).")] = "efficientnet-lite2",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Offline end-to-end run: make a synthetic defect dataset, fit, evaluate, predict, save; writes
    the HTML report (report/index.html) and the heat-map overlays of the test images."""
    from patchknn.evaluation import evaluate as run_evaluation
    from patchknn.evaluation import markdown_table
    from patchknn.presets import preset
    from patchknn.report import ReportCollector
    from patchknn.synthetic import make_synthetic_dataset

    data_root = output / "data"
    make_synthetic_dataset(data_root, category="synthetic", seed=seed or 0)
    config = preset("paper", backbone=backbone, seed=seed or 0)
    model_dir = output / "model"
    collector = ReportCollector(output / "report", progress=not quiet)
    holder: dict[str, Any] = {}

    def keep(ev: Any) -> None:
        holder["ev"] = ev
        ev.model.save(model_dir)
        collector(ev)

    results = run_evaluation(
        data_root, ["synthetic"], config, on_category=keep, progress=not quiet
    )
    (output / "results.json").write_text(json.dumps(results, indent=2))
    page = collector.finish(results, title="patchknn demo: synthetic defects")
    ev = holder["ev"]
    predictions = output / "predictions"  # what `patchknn predict MODEL TEST -o predictions` writes
    test_dir = data_root / "synthetic" / "test"
    rows = _write_predictions(ev.model, [str(s.path) for s in ev.samples], predictions, names_under=test_dir)
    if not quiet:
        typer.echo(markdown_table(results))
        typer.echo(
            f"\n{_summary(rows, predictions)}\n\nopen next:\n"
            f"  report   {page}  (metrics, curves, threshold, best and worst heat maps)\n"
            f"  overlays {predictions / 'overlays'}\n"
            f"           (a heat map per test image, the region over the threshold outlined)\n"
            f"  model    {model_dir}  (patchknn predict {model_dir} IMAGES -o OUT)\n"
            f"  results  {output / 'results.json'}\n"
            f"  data     {data_root}"
        )


# --------------------------------------------------------------------------------- helpers
def _write_predictions(
    model: Any, sources: list[str], output: Path, *, resolution: str = "input", maps: bool = True,
    names_under: Path | None = None,
) -> list[dict[str, Any]]:
    """Score ``sources`` and write ``scores.csv`` / ``scores.json`` and, with ``maps``, per image the
    map (``maps/*.npy``), the overlay (``overlays/*.png``) and the mask (``masks/*.png``, with a
    threshold) into ``output``; report each unreadable (skipped) file on stderr. Returns the rows.

    Files are named after each image's name, or with ``names_under`` after its path under that
    folder (``broken_large/000.png`` -> ``broken_large_000``)."""
    from patchknn.data import load_image
    from patchknn.visualize import model_scale, save_prediction_files

    output.mkdir(parents=True, exist_ok=True)
    if maps:
        (output / "maps").mkdir(exist_ok=True)
        (output / "overlays").mkdir(exist_ok=True)
        if model.threshold_ is not None:
            (output / "masks").mkdir(exist_ok=True)
    scale = model_scale(model)  # one colour scale for every image (None: uncalibrated -> per image)
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    for pred in model.predict_iter(sources, output_size=resolution):
        row: dict[str, Any] = {"image": pred.source, "score": pred.score, "verdict": pred.verdict,
                               "threshold": pred.threshold, "error": pred.error, "map": None, "overlay": None,
                               "mask": None}
        if pred.error is None and maps:
            src = Path(pred.source)
            name = src.stem
            if names_under is not None and src.resolve().is_relative_to(names_under.resolve()):
                name = "_".join(src.resolve().relative_to(names_under.resolve()).with_suffix("").parts)
            stem = _unique_stem(name, used)
            img = load_image(pred.source, max_pixels=model.max_pixels)
            row.update(save_prediction_files(output, stem, pred, img, scale=scale))
        rows.append(row)
        if pred.error is not None:
            typer.echo(f"skipped {pred.source}: {pred.error}", err=True)
    _write_rows(output, rows)
    return rows


def _summary(rows: list[dict[str, Any]], output: Path) -> str:
    """``scored 3 images (1 NG), 1 skipped (unreadable) -> OUT/scores.csv``: skipped files are not scored."""
    n_skipped = sum(r["error"] is not None for r in rows)
    n_ng = sum(r["verdict"] == "NG" for r in rows)
    text = f"scored {_count(len(rows) - n_skipped, 'image')} ({n_ng} NG)"
    if n_skipped:
        text += f", {n_skipped} skipped (unreadable, see above)"
    return f"{text} -> {output / 'scores.csv'}"


def _count(n: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _unique_stem(stem: str, used: set[str]) -> str:
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def _write_rows(output: Path, rows: list[dict[str, Any]]) -> None:
    fields = ["image", "score", "verdict", "threshold", "error", "map", "overlay", "mask"]
    with open(output / "scores.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (output / "scores.json").write_text(json.dumps(rows, indent=2))


from patchknn.server.commands import register as _register_serve  # noqa: E402 - `serve` (server extra)

_register_serve(app)

from patchknn.distributed.commands import register as _register_distributed  # noqa: E402 - fit-many, score-archive

_register_distributed(app)

from patchknn.report.commands import register as _register_report  # noqa: E402 - report

_register_report(app)

from patchknn.export.commands import register as _register_export  # noqa: E402 - export (onnx/openvino extras)

_register_export(app)

from patchknn.watch.commands import register as _register_watch  # noqa: E402 - watch (hot folder; watch extra)

_register_watch(app)

from patchknn.tune.commands import register as _register_tune  # noqa: E402 - tune (and fit --preset auto)

_register_tune(app)

from patchknn.versions.commands import register as _register_versions  # noqa: E402 - partial-fit, history, rollback

_register_versions(app)


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """``warnings.showwarning`` of the command line: ``warning: <message>``, one line, no source."""
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=file if file is not None else sys.stderr)


def usage_error_line(error: TyperException) -> str:
    """One line for a usage error of the command line (typer would draw a box of several lines):
    ``patchknn: no such command 'fitt' (did you mean 'fit'?)``,
    ``patchknn fit: no such option: --kk (did you mean --k?); see 'patchknn fit --help'``."""
    ctx = getattr(error, "ctx", None)
    where = ctx.command_path if ctx is not None else "patchknn"
    text = " ".join(error.format_message().split()).rstrip(".")
    if text.startswith("No such command"):  # typer's suggestion, in parentheses
        text = re.sub(r"\. Did you mean (.*?)\??$", r" (did you mean \1?)", text)
        return f"{where}: {text[0].lower()}{text[1:]}"
    text = re.sub(r"\((?:Possible options|Did you mean one of): (.*?)\??\)", r"(did you mean \1?)", text)
    text = text[0].lower() + text[1:] if text else "usage error"
    return f"{where}: {text}; see '{where} --help'"


def main() -> None:
    """Entry point: run the app; errors of the package and usage errors become one clear line and
    exit code 2, warnings one line each (``warning: ...``, without the source line Python shows)."""
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            code = app(prog_name="patchknn", standalone_mode=False)
        except PatchKNNError as e:
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)
        except TyperException as e:  # usage errors (typer's click)
            if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help
                typer.echo(usage_error_line(e), err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
