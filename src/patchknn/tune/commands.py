"""``patchknn tune``: choose a configuration from normal images only; and the ``auto`` preset of
``patchknn fit --preset auto`` (tune, then fit the choice on all the images)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from patchknn.options import (
    AUTO,
    FIXED_METHOD_FLAGS,
    MaxFitImagesOpt,
    MethodChoice,
    RunOptions,
    run_flags,
    with_options,
)

__all__ = ["AUTO", "DEFAULT_BUDGET", "auto_config", "register", "run_tune"]

DEFAULT_BUDGET = 10.0

BudgetOpt = Annotated[
    float,
    typer.Option("--budget", min=0.01, help="Minutes the search may spend (no new group of candidates starts after)."),
]


def run_tune(
    train_dir: Sequence[Path | str],
    *,
    budget: float = DEFAULT_BUDGET,
    fixed: Mapping[str, Any] | None = None,
    max_fit_images: int | None = None,
    runtime: dict[str, Any],
    quiet: bool = False,
) -> Any:
    """Run :func:`~patchknn.tune.search.tune` on ``train_dir`` with the options ``fixed`` in every
    candidate (their ``seed``, default 0, also seeds the split and the defects), printing each
    group's rows as it finishes unless ``quiet``; returns the :class:`~patchknn.tune.result.TuneResult`."""
    from patchknn.tune.search import tune

    fixed = dict(fixed or {})

    def report(rows: list[Any]) -> None:
        for r in rows:
            value = "-" if r.objective is None else f"{r.objective:.4f}"
            typer.echo(f"tune: {r.name}: objective {value} ({r.seconds:.0f} s){' ' + r.note if r.note else ''}",
                       err=True)

    return tune(
        [str(p) for p in train_dir], budget_minutes=budget, seed=int(fixed.get("seed", 0)), fixed=fixed,
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
    from patchknn.presets import preset

    if preset_name != AUTO:
        return preset(preset_name, **overrides), None
    result = run_tune(train_dir, budget=budget, fixed=overrides, runtime=runtime, quiet=quiet)
    if not quiet:
        typer.echo(f"tune chose {result.choice}: {result.reason}", err=True)
    return result.config, result


def register(app: typer.Typer) -> None:
    """Add ``tune`` to the command line."""

    @app.command("tune")
    @with_options(
        method=FIXED_METHOD_FLAGS,
        run=run_flags("weights", "device", "batch_size", "workers", "quiet", "max_pixels"),
    )
    def tune_command(
        train_dir: Annotated[list[Path], typer.Argument(help="Folder(s) or files of defect-free images.")],
        method: MethodChoice,
        run: RunOptions,
        budget: BudgetOpt = DEFAULT_BUDGET,
        output: Annotated[
            Path | None, typer.Option("--output", "-o", help="Write the table and choice as JSON here.")
        ] = None,
        max_fit_images: MaxFitImagesOpt = None,
    ) -> None:
        """Choose a configuration from normal images only: hold some out, give them synthetic
        defects (cut-paste, scratches, colour/texture changes, missing parts, large blobs), score the presets
        and a bounded grid on them within --budget minutes, print the table and the choice.
        The method options given (flags or --set) are fixed in every candidate, as with
        `patchknn fit --preset auto`; --seed also seeds the held-out split and the defects."""
        result = run_tune(
            train_dir, budget=budget, fixed=method.overrides, max_fit_images=max_fit_images,
            runtime=run.model_kwargs(), quiet=run.quiet,
        )
        if output is not None:
            result.save(output)
        if not run.quiet:
            from rich.console import Console

            Console().print(result.rich_table())
            typer.echo(f"choice: {result.choice}: {result.reason}")
            typer.echo(f"chosen configuration: {result.config.describe()}")
            if output is not None:
                typer.echo(f"result -> {output}")
