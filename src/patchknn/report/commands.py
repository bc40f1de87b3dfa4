"""The ``patchknn report`` command (registered on the main app by :func:`register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``report`` to the ``patchknn`` command line."""

    @app.command("report")
    def report(
        results: Annotated[
            Path, typer.Argument(metavar="RESULTS.json", help="Results written by `patchknn evaluate`.")
        ],
        output: Annotated[
            Path | None, typer.Option("--output", "-o", help="HTML file to write (default: index.html beside it).")
        ] = None,
        assets: Annotated[
            Path | None,
            typer.Option("--assets", help="Report data folder of `evaluate --report` (default: assets/ beside it)."),
        ] = None,
        title: Annotated[str | None, typer.Option("--title", help="Page title.")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages.")] = False,
    ) -> None:
        """(Re)write the HTML report of an evaluation run from its results file.

        Curves, score histograms and the gallery need the data `patchknn evaluate --report DIR`
        stores in DIR/assets; without it the page has the metrics table and the configuration.
        """
        from patchknn.report.html import write_report

        page = write_report(results, output, assets=assets, title=title, progress=not quiet)
        if not quiet:
            typer.echo(f"report -> {page}")
