"""The ``patchknn export`` command (registered on the main app by :func:`register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``export`` to the ``patchknn`` command line."""

    @app.command("export")
    def export(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model saved by `patchknn fit`.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the exported model to.")],
        format: Annotated[
            str, typer.Option("--format", "-f", help="onnx (onnxruntime) or openvino (OpenVINO IR, float32).")
        ] = "onnx",
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No messages.")] = False,
    ) -> None:
        """Export a fitted model to run without PyTorch: one graph per member (uint8 images in,
        the rows to search out), the memory bank, configuration and threshold beside it.

        Score it with `patchknn predict OUTPUT IMAGES -o DIR`, `patchknn serve OUTPUT`, or in
        Python with `patchknn.runtime.load(OUTPUT).predict(images)` (onnxruntime or openvino,
        numpy, Pillow, scipy and faiss-cpu; no torch).
        """
        from patchknn.export import export_model

        out = export_model(model_path, output, format=format)
        if not quiet:
            files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
            typer.echo(f"exported ({format}) -> {out}: {', '.join(files)}")
