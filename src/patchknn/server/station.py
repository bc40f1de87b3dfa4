"""The inspection-station web page and the small JSON routes it reads besides the prediction API.

* ``GET /station`` (``/`` redirects there): the page, a Jinja2 template (autoescape) with its
  script and style sheet under ``/static/`` (bundled in the package: no CDN, works on an offline line
  network). The page and its assets hold no data and need no key; the key is typed once into the
  page, kept in the browser's ``sessionStorage`` (gone when the tab closes) and sent as
  ``Authorization: Bearer`` with every API call, so the page has exactly the API's rights.
* ``GET /v1/session``: the roles of the presented key (``predict``, ``admin``).
* ``GET /v1/results?model=&verdict=OK|NG&since=&after=&limit=``: the server's most recent
  predictions (any client's), newest first: the page's live list. Held in memory only
  (:data:`patchknn.server.state.RESULT_LOG_SIZE` results, no images).
* ``GET /v1/watch``: the camera folders configured at start-up (``--watch-folder NAME=DIR``);
  ``GET /v1/watch/{folder}?limit=``: its newest images (name, size, time);
  ``GET /v1/watch/{folder}/{file}``: one of those images. A client only ever names a configured
  folder and a plain file name that is an image directly inside it (no path separators, no
  hidden files, no symbolic links), so no other file of the machine can be read.
"""

from __future__ import annotations

import asyncio
import functools
import os
import stat
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from patchknn.data import is_image_name
from patchknn.server.errors import ERROR_DOCS, ApiError, json_response
from patchknn.server.middleware import ROLES_SCOPE_KEY
from patchknn.server.settings import ServerSettings
from patchknn.server.state import StateDep
from patchknn.server.uploads import sniff_format

__all__ = [
    "PUBLIC_PATHS",
    "PUBLIC_PREFIXES",
    "STATIC_DIR",
    "TEMPLATE_DIR",
    "list_watch_folder",
    "mount_static",
    "page_templates",
    "read_watch_file",
    "router",
    "templates",
]

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATE_DIR = HERE / "templates"
PUBLIC_PATHS = frozenset({"/", "/station"})
PUBLIC_PREFIXES = ("/static/",)
"""Paths (and path prefixes) served without a key: the page and its bundled assets, which hold no data."""

router = APIRouter()


def templates() -> Any:
    """The Jinja2 environment of the page (autoescape on)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    return Environment(loader=FileSystemLoader(TEMPLATE_DIR), autoescape=select_autoescape(default=True))


@functools.cache
def page_templates() -> Any:
    """:func:`templates`, made once per process (the page's route renders from it)."""
    return templates()


def _watch_dir(settings: ServerSettings, folder: str) -> Path:
    for name, path in settings.watch_folders:
        if name == folder:
            return path
    raise ApiError(404, "folder_not_found", f"no watch folder named {folder[:64]!r}; configured: "
                   f"{', '.join(n for n, _ in settings.watch_folders) or 'none (serve --watch-folder NAME=DIR)'}")


def list_watch_folder(directory: Path, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` images directly in ``directory`` (regular files, no links), newest first."""
    found = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if not is_image_name(entry.name) or entry.is_symlink():
                    continue
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode):
                    found.append({"name": entry.name, "bytes": info.st_size, "mtime": info.st_mtime})
    except OSError as exc:
        raise ApiError(404, "folder_not_found", f"the watch folder cannot be read ({exc.strerror})") from None
    found.sort(key=lambda f: (f["mtime"], f["name"]), reverse=True)
    return found[:limit]


def read_watch_file(directory: Path, name: str, limit: int) -> bytes:
    """The bytes of image ``name`` directly in ``directory`` (404 for anything else; 413 over ``limit``)."""
    missing = ApiError(404, "folder_not_found", "no such image in the watch folder")
    if not is_image_name(name) or name in (".", ".."):
        raise missing
    path = directory / name
    try:
        # O_NONBLOCK: a named pipe called x.png must not block a worker thread in open()
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise missing from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise missing
        if info.st_size > limit:
            raise ApiError(413, "payload_too_large", f"the image ({info.st_size:,} bytes) is over {limit:,} bytes")
        return f.read(limit + 1)


def mount_static(app: FastAPI) -> None:
    """Serve the page's bundled script and style sheet under ``/static/``."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


@router.get("/", include_in_schema=False)
async def root() -> Response:
    return RedirectResponse("/station", status_code=307)


@router.get("/station", include_in_schema=False)
async def station() -> Response:
    from patchknn._version import __version__

    html = page_templates().get_template("station.html").render(version=__version__)
    headers = {
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
        "frame-ancestors 'none'; base-uri 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return HTMLResponse(html, headers=headers)


@router.get("/v1/session", summary="The roles of the presented key", responses=ERROR_DOCS)
async def session(request: Request) -> dict[str, Any]:
    return {"roles": sorted(request.scope.get(ROLES_SCOPE_KEY, ()))}


@router.get("/v1/results", summary="Recent predictions, newest first", responses=ERROR_DOCS)
async def recent_results(
    state: StateDep,
    model: str | None = Query(None, max_length=64),
    verdict: Literal["OK", "NG"] | None = Query(None),
    since: float | None = Query(None, description="Only results at or after this time (epoch seconds)."),
    after: int = Query(0, ge=0, description="Only results with a larger id (for polling)."),
    limit: int = Query(100, ge=1, le=1000),
) -> Response:
    items = state.results.query(model, verdict, since, after, limit)
    return json_response(200, {"results": items, "now": time.time()})


@router.get("/v1/watch", summary="The configured camera folders", responses=ERROR_DOCS)
async def watch_folders(state: StateDep) -> dict[str, Any]:
    return {"folders": [name for name, _ in state.settings.watch_folders]}


@router.get("/v1/watch/{folder}", summary="The newest images of a camera folder", responses=ERROR_DOCS)
async def watch_list(folder: str, state: StateDep, limit: int = Query(20, ge=1, le=500)) -> Response:
    directory = _watch_dir(state.settings, folder)
    files = await asyncio.to_thread(list_watch_folder, directory, limit)
    return json_response(200, {"folder": folder, "images": files})


@router.get("/v1/watch/{folder}/{file}", summary="One image of a camera folder", responses=ERROR_DOCS)
async def watch_file(folder: str, file: str, state: StateDep) -> Response:
    directory = _watch_dir(state.settings, folder)
    data = await asyncio.to_thread(read_watch_file, directory, file, state.settings.max_upload_bytes)
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(415, "unsupported_media_type", "the file is not an accepted image type")
    media = {"JPEG": "image/jpeg", "PNG": "image/png"}.get(fmt, "application/octet-stream")
    return Response(data, media_type=media, headers={"Cache-Control": "no-store"})
