"""``patchknn tune``: choose a configuration from normal images only; and the ``auto`` preset of
``patchknn fit --preset auto`` (tune, then fit the choice on all the images)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from patchknn.options import (
    BatchOpt,
    DeviceOpt,
    MaxPixelsOpt,
    QuietOpt,
    SetOpt,
    WeightsOpt,
    WorkersOpt,
    parse_settings,
    runtime_options,
)

#: the ``--preset`` value that is resolved by :func:`patchknn.tune.search.tune`, not a static preset
AUTO = "auto"
DEFAULT_BUDGET = 10.0

BudgetOpt = Annotated[
    float,
    typer.Option("--budget", min=0.01, help="Minutes the search may spend (no new group of candidates starts after)."),
]


def run_tune(
    train_dir: Sequence[Path | str],
    *,
    budget: float = DEFAULT_BUDGET,
    seed: int = 0,
    fixed: Mapping[str, Any] | None = None,
    max_fit_images: int | None = None,
    runtime: dict[str, Any],
    quiet: bool = False,
) -> Any:
    """Run :func:`~patchknn.tune.search.tune` on ``train_dir``, printing each group's rows as it
    finishes unless ``quiet``; returns the :class:`~patchknn.tune.result.TuneResult`."""
    from patchknn.tune.search import tune

    def report(rows: list[Any]) -> None:
        for r in rows:
            value = "-" if r.objective is None else f"{r.objective:.4f}"
            typer.echo(f"tune: {r.name}: objective {value} ({r.seconds:.0f} s){' ' + r.note if r.note else ''}",
                       err=True)

    return tune(
        [str(p) for p in train_dir], budget_minutes=budget, seed=seed, fixed=dict(fixed or {}),
        max_fit_images=max_fit_images, on_group=None if quiet else report, **{**runtime, "progress": False},
    )


def auto_config(
    preset_name: str,
    overrides: Mapping[str, Any],
    train_dir: Sequence[Path | str],
    budget: float,
    runtime: dict[str, Any],
    quiet: bool = False,
) -> tuple[Any, Any]:
    """``fit``'s configuration: the preset with ``overrides`` and no tune result, or with
    ``--preset auto`` the configuration ``tune`` chooses (``overrides`` fixed in every candidate)
    and its :class:`~patchknn.tune.result.TuneResult` (to store in the model's ``fit_info``)."""
    from patchknn.config import preset

    if preset_name != AUTO:
        return preset(preset_name, **overrides), None
    seed = int(overrides.get("seed", 0))
    result = run_tune(train_dir, budget=budget, seed=seed, fixed=overrides, runtime=runtime, quiet=quiet)
    if not quiet:
        typer.echo(f"tune chose {result.choice}: {result.reason}", err=True)
    return result.config, result


def register(app: typer.Typer) -> None:
    """Add ``tune`` to the command line."""

    @app.command("tune")
    def tune_command(
        train_dir: Annotated[list[Path], typer.Argument(help="Folder(s) or files of defect-free images.")],
        budget: BudgetOpt = DEFAULT_BUDGET,
        output: Annotated[
            Path | None, typer.Option("--output", "-o", help="Write the table and choice as JSON here.")
        ] = None,
        seed: Annotated[int, typer.Option("--seed", help="Seeds the held-out split and the synthetic defects.")] = 0,
        max_fit_images: Annotated[
            int | None,
            typer.Option("--max-fit-images", min=2, help="Fit candidates on at most this many images (faster)."),
        ] = None,
        settings: SetOpt = None,
        weights: WeightsOpt = None,
        device: DeviceOpt = "cpu",
        batch_size: BatchOpt = 16,
        workers: WorkersOpt = "auto",
        quiet: QuietOpt = False,
        max_pixels: MaxPixelsOpt = None,
    ) -> None:
        """Choose a configuration from normal images only: hold some out, give them synthetic
        defects (cut-paste, scratches, colour/texture changes, missing parts), score the presets
        and a bounded grid on them within --budget minutes, print the table and the choice.
        Options given with --set are fixed in every candidate."""
        runtime = runtime_options(weights, device, batch_size, workers, "stop", quiet, max_pixels)
        result = run_tune(
            train_dir, budget=budget, seed=seed, fixed=parse_settings(settings or []), max_fit_images=max_fit_images,
            runtime=runtime, quiet=quiet,
        )
        if output is not None:
            result.save(output)
        if not quiet:
            from rich.console import Console

            Console().print(result.rich_table())
            typer.echo(f"choice: {result.choice}: {result.reason}")
            typer.echo(f"chosen configuration: {result.config.describe()}")
            if output is not None:
                typer.echo(f"result -> {output}")
