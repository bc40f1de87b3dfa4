"""``patchknn serve``: registered on the CLI by :func:`register` (no FastAPI import until it runs).

Example:
    $ patchknn serve bottle=models/bottle screw=models/screw --port 8000 --api-key-file keys.txt
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchknn.options import DeviceOpt

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the ``patchknn`` typer app."""

    @app.command(no_args_is_help=True)
    def serve(
        models: Annotated[
            list[str],
            typer.Argument(
                metavar="MODEL...",
                help="Saved model directories, each PATH (name = the directory's name) or NAME=PATH.",
            ),
        ],
        host: Annotated[
            str, typer.Option("--host", help="Address to listen on. Anything but loopback requires API keys.")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
        api_key_file: Annotated[
            Path | None,
            typer.Option(
                "--api-key-file",
                help="File with one API key a line, 'KEY' or 'KEY admin' (also: env PATCHKNN_API_KEYS and "
                "PATCHKNN_ADMIN_KEYS, comma-separated). With keys, every endpoint but /healthz and the web page "
                "needs 'Authorization: Bearer KEY'; corrections need an admin key.",
            ),
        ] = None,
        watch_folder: Annotated[
            list[str] | None,
            typer.Option(
                "--watch-folder",
                help="A camera folder the web page may list and score, NAME=DIR (repeatable). The page names "
                "the folder, never a path.",
            ),
        ] = None,
        max_upload_mb: Annotated[
            float, typer.Option("--max-upload-mb", help="Largest request body (MiB); 413.")
        ] = 20.0,
        max_pixels: Annotated[
            int, typer.Option("--max-pixels", help="Largest image height*width (decompression-bomb guard); 413.")
        ] = 40_000_000,
        timeout: Annotated[
            float, typer.Option("--timeout", help="Request timeout in seconds; 504 (408: slow body).")
        ] = 10.0,
        max_concurrency: Annotated[
            int, typer.Option("--max-concurrency", help="Requests processed at once (>= --max-batch).")
        ] = 32,
        max_queue: Annotated[
            int, typer.Option("--max-queue", help="Requests waiting for a slot; beyond: 503 + Retry-After.")
        ] = 64,
        max_batch: Annotated[int, typer.Option("--max-batch", help="Images per backbone call (micro-batching).")] = 8,
        max_delay_ms: Annotated[
            float, typer.Option("--max-delay-ms", help="Longest wait to fill a batch once a request is in.")
        ] = 5.0,
        decode_threads: Annotated[int, typer.Option("--decode-threads", help="Threads decoding uploads.")] = 2,
        memory_budget_mb: Annotated[
            float,
            typer.Option(
                "--memory-budget-mb",
                help="Decoding memory of all requests together (MiB), counted from each image's header before "
                "decoding; over it a request waits (503 after --timeout), an image that can never fit gets 413.",
            ),
        ] = 1024.0,
        header_timeout: Annotated[
            float,
            typer.Option("--header-timeout", help="Seconds a connection has to send its request headers (408)."),
        ] = 10.0,
        max_pending_connections: Annotated[
            int,
            typer.Option(
                "--max-pending-connections",
                help="Connections waiting to send their request headers at once; one more gets 503.",
            ),
        ] = 100,
        max_header_kb: Annotated[
            int, typer.Option("--max-header-kb", help="Largest request line + headers (KiB); 431.")
        ] = 16,
        threads: Annotated[
            int | None, typer.Option("--threads", help="torch CPU threads for the backbone (default: torch's).")
        ] = None,
        device: DeviceOpt = "cpu",
        public_docs: Annotated[
            bool, typer.Option("--public-docs/--no-public-docs", help="Serve /docs and /openapi.json without a key.")
        ] = False,
        log_level: Annotated[str, typer.Option("--log-level", help="critical, error, warning, info, debug.")] = "info",
        access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log each request line.")] = True,
    ) -> None:
        """Serve saved models over HTTP (FastAPI + uvicorn) for inspection stations."""
        from patchknn.server import INSTALL_HINT, missing_dependencies

        missing = missing_dependencies()
        if missing:
            typer.echo(
                f"error: `patchknn serve` needs the server extra ({', '.join(missing)} not installed): {INSTALL_HINT}",
                err=True,
            )
            raise typer.Exit(2)

        import logging.config

        from patchknn.server.app import log_config
        from patchknn.server.auth import KeyChecker, check_bind, load_keys
        from patchknn.server.settings import ServerSettings, load_models, parse_watch_folder

        if log_level.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
            levels = "critical, error, warning, info, debug or trace"
            typer.echo(f"error: --log-level {log_level!r}: use {levels}", err=True)
            raise typer.Exit(2)
        log_level = log_level.lower()
        logging.config.dictConfig(log_config(log_level))  # one format for patchknn's and uvicorn's lines
        key_set = load_keys(api_key_file)
        keys = key_set.keys
        settings = ServerSettings(
            host=host,
            port=port,
            api_keys=keys,
            admin_keys=key_set.admin,
            watch_folders=tuple(parse_watch_folder(spec) for spec in watch_folder or ()),
            max_upload_bytes=max(1, int(max_upload_mb * 1024 * 1024)),
            max_pixels=max_pixels,
            request_timeout_s=timeout,
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            decode_threads=decode_threads,
            public_docs=public_docs,
            memory_budget_bytes=int(memory_budget_mb * 1024 * 1024),
            header_timeout_s=header_timeout,
            max_pending_connections=max_pending_connections,
            max_header_bytes=max_header_kb * 1024,
        )
        check_bind(host, KeyChecker(keys))  # before the (slow) model loading
        if max_concurrency < max_batch:
            typer.echo(
                f"warning: --max-concurrency {max_concurrency} < --max-batch {max_batch}: batches cannot fill",
                err=True,
            )
        if threads is not None:
            import torch

            torch.set_num_threads(max(1, threads))
        served = load_models(models, device=device)

        from patchknn.server.app import create_app, run

        auth = f"{len(keys)} API key(s), {len(key_set.admin)} admin" if keys else "off (loopback only)"
        names = ", ".join(f"{m.name} ({m.version})" for m in served.values())
        typer.echo(
            f"patchknn serve: models {names}; auth {auth}; page http://{_url_host(host)}:{port}/station", err=True
        )
        run(create_app(served, settings), settings, log_level=log_level, access_log=access_log)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
