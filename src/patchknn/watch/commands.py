"""The ``patchknn watch`` command (registered on the main app by :func:`register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from patchknn.options import (
    BatchOpt,
    DeviceOpt,
    MaxPixelsOpt,
    ResolutionOpt,
    ThresholdOverrideOpt,
    max_pixels_option,
)


def register(app: typer.Typer) -> None:
    """Add ``watch`` to the ``patchknn`` command line."""

    @app.command("watch")
    def watch_command(
        input_dir: Annotated[Path, typer.Argument(metavar="IN_DIR", help="The folder images are written into.")],
        model_path: Annotated[
            Path, typer.Option("--model", "-m", help="A model saved by `patchknn fit`, or a `patchknn export` folder.")
        ],
        output: Annotated[
            Path, typer.Option("--output", "-o", help="Results folder: results.jsonl, overlays/ (kept across runs).")
        ],
        recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also watch subfolders.")] = False,
        pattern: Annotated[
            list[str] | None,
            typer.Option("--pattern", help="Only file names matching this shell pattern, e.g. '*.png' (repeatable; "
                         "default: every image suffix patchknn reads)."),
        ] = None,
        once: Annotated[
            bool, typer.Option("--once", help="Score what is there (waiting for files being written), then exit.")
        ] = False,
        poll: Annotated[
            float | None,
            typer.Option("--poll", min=0.01, help="List the folder every SECONDS instead of using file-system events "
                         "(network shares, or where inotify is unavailable)."),
        ] = None,
        settle: Annotated[
            float, typer.Option("--settle", min=0.01, help="Seconds a file's size and time must stay unchanged.")
        ] = 1.0,
        timeout: Annotated[
            float,
            typer.Option("--timeout", min=0.01, help="Seconds a stable file may fail to decode before it gets an "
                         "error line."),
        ] = 60.0,
        csv_copy: Annotated[bool, typer.Option("--csv", help="Also write results.csv.")] = False,
        overlays: Annotated[bool, typer.Option("--overlays/--no-overlays", help="Write overlays/NAME.png.")] = True,
        maps: Annotated[
            bool, typer.Option("--maps/--no-maps", help="Write maps/NAME.npy and masks/NAME.png.")
        ] = False,
        threshold: ThresholdOverrideOpt = None,
        resolution: ResolutionOpt = "input",
        device: DeviceOpt = "cpu",
        batch_size: BatchOpt = 16,
        max_pixels: MaxPixelsOpt = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and the last line.")] = False,
    ) -> None:
        """Hot folder: score every image that appears in IN_DIR, once, when it is complete.

        One line per image in OUTPUT/results.jsonl (name, score, threshold, verdict, model version,
        timing, overlay), written to disk before the next image; a restart skips what is in it and
        scores what arrived meanwhile. A file is complete when its size and time have been stable for
        --settle seconds and it decodes; one that never decodes gets an error line after --timeout.
        Ctrl-C or SIGTERM: finish the current batch and stop. See docs/watch.md.
        """
        from patchknn.watch.folder import HotFolder
        from patchknn.watch.running import load_model, stop_on_signals

        model, version = load_model(
            model_path, device=device, batch_size=batch_size, threshold=threshold, **max_pixels_option(max_pixels)
        )
        hot = HotFolder(
            input_dir, output, model, model_version=version, recursive=recursive, patterns=pattern or (),
            settle=settle, timeout=timeout, poll=poll, batch_size=batch_size, resolution=resolution,
            overlays=overlays, maps=maps, csv_copy=csv_copy, on_event=lambda e: _print_event(e, quiet),
        )
        with stop_on_signals(hot):
            summary = hot.run(once=once)
        ng = f" ({summary.ng} NG)" if summary.ng else ""
        errors = f", {summary.errors} error line(s)" if summary.errors else ""
        typer.echo(f"scored {summary.scored} image(s){ng}{errors} -> {output / 'results.jsonl'}")


def _print_event(event: Any, quiet: bool) -> None:
    """One line per event: results on stdout, errors and fall-backs on stderr."""
    if event.kind == "scored" and not quiet:
        r = event.record
        verdict = r["verdict"] or "-"
        overlay = f"  {r['overlay']}" if r["overlay"] else ""
        typer.echo(f"{verdict:<2} {r['score']:.4f}  {event.name}{overlay}")
    elif event.kind == "error":
        typer.echo(f"error {event.name}: {event.detail}", err=True)
    elif event.kind == "fallback":
        typer.echo(f"warning: {event.detail}", err=True)
    elif not quiet and event.kind in ("started", "waiting", "duplicate"):
        where = f" {event.name}:" if event.name else ":"
        typer.echo(f"{event.kind}{where} {event.detail}", err=event.kind != "started")
