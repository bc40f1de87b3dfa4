"""The ``fit-many`` and ``score-archive`` commands, added to the ``patchknn`` CLI by :func:`register`.

Ray is imported only when a command runs, so ``patchknn --help`` and every other command work
without the ``distributed`` extra. (No ``from __future__ import annotations`` here: typer reads the
option annotations, which refer to names local to :func:`register`.)
"""

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    """Add ``fit-many`` and ``score-archive`` to ``app`` (called at the bottom of :mod:`patchknn.cli`)."""
    from patchknn import options as opt

    AddressOpt = Annotated[
        str | None,
        typer.Option("--address", help="Join this Ray cluster (e.g. auto, ray://head:10001); "
                     "default: start a local Ray instance on 127.0.0.1 and stop it at the end."),
    ]
    NumCpusOpt = Annotated[
        int | None, typer.Option("--num-cpus", help="CPUs of the local Ray instance (default: all).")
    ]
    NumGpusOpt = Annotated[
        int | None, typer.Option("--num-gpus", help="GPUs of the local Ray instance (default: all).")
    ]

    @app.command("fit-many")
    @opt.with_options(
        method=opt.PRESET_METHOD_FLAGS, run=opt.run_flags("weights", "device", "batch_size", "on_error", "quiet")
    )
    def fit_many_command(
        inputs: Annotated[
            list[Path],
            typer.Argument(metavar="ROOT_OR_FOLDERS",
                           help="An MVTec-style root (one model per category), or one folder per variant."),
        ],
        output: Annotated[Path, typer.Option("--output", "-o", help="Folder receiving one model per variant.")],
        category: Annotated[
            list[str] | None, typer.Option("--category", "-c", help="Only this category of the root (repeatable).")
        ] = None,
        method: opt.MethodChoice = opt.MethodChoice(),
        run: opt.RunOptions = opt.RunOptions(),
        force: Annotated[bool, typer.Option("--force", help="Fit even the variants that are up to date.")] = False,
        concurrency: Annotated[
            int | None, typer.Option("--concurrency", help="At most this many variants at once (default: all "
                                     "that the Ray resources allow).")
        ] = None,
        cpus_per_task: Annotated[float, typer.Option("--cpus-per-task", help="Ray CPUs per fit.")] = 1,
        gpus_per_task: Annotated[
            float, typer.Option("--gpus-per-task", help="Ray GPUs per fit (default 1 with --device cuda).")
        ] = 0,
        address: AddressOpt = None,
        num_cpus: NumCpusOpt = None,
        num_gpus: NumGpusOpt = None,
    ) -> None:
        """Fit one model per variant as parallel Ray tasks; skip those already up to date.

        Writes OUTPUT/<variant>/ (a model, as `patchknn fit` does) and OUTPUT/fit-many-report.json.
        A failing variant is reported and does not stop the others; the exit code is then 1.
        """
        from patchknn.distributed.variants import REPORT_FILE, discover_variants, fit_many

        config = method.config()
        variants = discover_variants(inputs, category)
        total = len(variants)
        finished = [0]

        def show(r: dict[str, Any]) -> None:
            finished[0] += 1
            if run.quiet:
                return
            n = r.get("n_images")
            images = f"{n} image" if n == 1 else f"{n} images"
            what = {"fitted": f"fitted in {r.get('seconds', 0):.1f} s ({images})",
                    "up-to-date": "up to date, skipped"}.get(r["status"], f"FAILED: {r.get('error')}")
            typer.echo(f"[{finished[0]}/{total}] {r['name']}: {what}", err=True)

        report = fit_many(
            variants, output, config, weights=run.weights, device=run.device, batch_size=run.batch_size,
            on_error=run.on_error, force=force, concurrency=concurrency, cpus_per_task=cpus_per_task,
            gpus_per_task=gpus_per_task, address=address, num_cpus=num_cpus, num_gpus=num_gpus, on_result=show,
            quiet=run.quiet,
        )
        if not run.quiet:
            _print_fit_table(report)
            c = report.counts()
            typer.echo(f"{c['fitted']} fitted, {c['up-to-date']} up to date, {c['failed']} failed "
                       f"in {report.seconds:.1f} s -> {output / REPORT_FILE}")
        if not report.ok:
            raise typer.Exit(1)

    @app.command("score-archive")
    @opt.with_options(run=opt.run_flags("batch_size", "device", "quiet"))
    def score_archive_command(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model saved by `patchknn fit`.")],
        sources: Annotated[
            list[Path],
            typer.Argument(metavar="SOURCE", help="Folders (searched recursively), image files, or .txt lists "
                           "of image paths."),
        ],
        output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the Parquet parts (and maps).")],
        concurrency: Annotated[int, typer.Option("--concurrency", help="Scoring actors (each loads the model).")] = 1,
        run: opt.RunOptions = opt.RunOptions(),
        cpus_per_worker: Annotated[float, typer.Option("--cpus-per-worker", help="Ray CPUs per actor.")] = 1,
        gpus_per_worker: Annotated[
            float, typer.Option("--gpus-per-worker", help="Ray GPUs per actor (default 1 with --device cuda; "
                                "fractions share a GPU).")
        ] = 0,
        threads: Annotated[
            int | None, typer.Option("--threads", help="Torch threads per actor (default: --cpus-per-worker).")
        ] = None,
        threshold: opt.ThresholdOverrideOpt = None,
        resolution: opt.ResolutionOpt = "input",
        maps: Annotated[bool, typer.Option("--maps/--no-maps", help="Also write each map as .npy.")] = False,
        part_rows: Annotated[int, typer.Option("--part-rows", help="Rows per Parquet part (unit of resuming).")] = 1000,
        shards: Annotated[
            int, typer.Option("--shards", help="Split the memory bank over this many Ray actors (0 = no).")
        ] = 0,
        shard_cpus: Annotated[float, typer.Option("--shard-cpus", help="Ray CPUs reserved per shard actor.")] = 0,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Delete earlier results in OUTPUT instead of resuming.")
        ] = False,
        address: AddressOpt = None,
        num_cpus: NumCpusOpt = None,
        num_gpus: NumGpusOpt = None,
    ) -> None:
        """Score an image archive with Ray Data into Parquet parts; re-run to resume after an interruption."""
        from patchknn.distributed.archive import PARTS_DIR, score_archive

        if resolution not in ("input", "original"):
            raise typer.BadParameter("--resolution must be input or original")
        try:
            summary = score_archive(
                model_path, sources, output, concurrency=concurrency, batch_size=run.batch_size, device=run.device,
                cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, threads=threads,
                threshold=threshold, output_size=resolution, maps=maps, part_rows=part_rows, shards=shards,
                shard_cpus=shard_cpus, overwrite=overwrite, address=address, num_cpus=num_cpus,
                num_gpus=num_gpus, progress=not run.quiet, quiet=run.quiet,
            )
        except KeyboardInterrupt:
            typer.echo("interrupted: completed parts are kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None
        if not run.quiet:
            typer.echo(json.dumps(summary.to_dict(), indent=2))
            typer.echo(f"results -> {Path(output) / PARTS_DIR}")


def _print_fit_table(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fit-many")
    for col in ("variant", "status", "images", "bank", "seconds", "error"):
        table.add_column(col)
    for r in report.results:
        error = (r.get("error") or "").splitlines()[0] if r.get("error") else ""
        table.add_row(
            r["name"], r["status"], str(r.get("n_images", r.get("n_files", ""))), str(r.get("bank_size", "")),
            f"{r['seconds']:.1f}" if "seconds" in r else "", error[:100],
        )
    Console().print(table)
