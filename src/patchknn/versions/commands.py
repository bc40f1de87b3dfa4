"""The ``patchknn partial-fit``, ``history`` and ``rollback`` commands (registered on the main app
by :func:`register`): teach a saved model more normal images as a new version, list the versions,
make an older one current again. The work is :mod:`patchknn.versions`'; these parse and print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from patchknn.options import QuietOpt, RunOptions, run_flags, with_options

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add ``partial-fit``, ``history`` and ``rollback`` to the ``patchknn`` command line."""

    @app.command("partial-fit")
    @with_options(run=run_flags("device", "batch_size", "workers", "on_error", "quiet", "max_pixels"))
    def partial_fit(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model folder (`patchknn fit --out`).")],
        images: Annotated[
            list[Path], typer.Argument(metavar="IMAGES...", help="Normal images (files or folders) to add.")
        ],
        author: Annotated[str | None, typer.Option("--author", help="Who adds them (recorded).")] = None,
        note: Annotated[str, typer.Option("--note", help="Why (recorded), e.g. 'glare is normal'.")] = "",
        run: RunOptions = RunOptions(),
    ) -> None:
        """Add normal images to a saved model's memory bank (same PCA, threshold recalibrated by
        fit's rule) and save the result as a new version of MODEL; the previous versions are kept
        (`patchknn history MODEL`, `patchknn rollback MODEL VERSION`). With --on-error skip an
        unreadable image is reported and left out."""
        from patchknn.versions import load_version, save_version

        model = load_version(model_path, **run.load_kwargs())
        model.partial_fit([str(p) for p in images])
        for src, reason in model.skipped_:
            typer.echo(f"skipped {src}: {reason}", err=True)
        info = save_version(model, model_path, author=author, note=note)
        if not run.quiet:
            thr = "none" if info.threshold is None else f"{info.threshold:.4g}"
            typer.echo(
                f"version {info.number} of {model_path}: {info.n_added} image(s) added, "
                f"{info.bank_rows} bank rows, threshold {thr} (parent {info.parent})"
            )

    @app.command("history")
    def history(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model folder.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print the versions and events as JSON.")] = False,
    ) -> None:
        """List the versions of a model folder: number, when, who, note, images added, bank rows,
        threshold; `*` marks the current one. Rollbacks are listed below."""
        from patchknn.versions import history as events_of
        from patchknn.versions import list_versions

        versions = list_versions(model_path)
        events = events_of(model_path)
        if as_json:
            typer.echo(json.dumps({"versions": [v.as_dict() for v in versions], "events": events}, indent=2))
            return
        header = ("", "version", "created", "author", "images added", "bank rows", "threshold", "note")
        rows = [
            (
                "*" if v.current else "",
                str(v.number),
                v.created,
                v.author or "-",
                str(v.n_added),
                str(v.bank_rows),
                "none" if v.threshold is None else f"{v.threshold:.4g}",
                v.note,
            )
            for v in versions
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        for e in events:
            if e.get("event") == "rollback":
                who = f" by {e['author']}" if e.get("author") else ""
                typer.echo(f"rollback {e.get('at', '')}{who}: version {e.get('from')} -> {e.get('version')}")

    @app.command("rollback")
    def rollback(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A versioned model folder.")],
        version: Annotated[int, typer.Argument(metavar="VERSION", help="The version to make current.")],
        author: Annotated[str | None, typer.Option("--author", help="Who rolls back (recorded).")] = None,
        quiet: QuietOpt = False,
    ) -> None:
        """Make an older (or newer) version of MODEL current again; every version is kept and the
        rollback is recorded (`patchknn history MODEL`)."""
        from patchknn.versions import rollback as roll_back

        info = roll_back(model_path, version, author=author)
        if not quiet:
            typer.echo(f"{model_path}: version {info.number} is current ({info.created}, {info.note or 'no note'})")
