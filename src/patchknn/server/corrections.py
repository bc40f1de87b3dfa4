"""Corrections that teach a served model, and its version history.

* ``POST /v1/models/{name}/corrections`` (key role ``admin``; a ``predict`` key gets 403): a
  multipart body with one or more images in fields named ``file`` (the false alarm and, optionally,
  more normal images), and optional text fields ``note`` and ``author``. The images are decoded as
  ``predict`` decodes them and added to the model's memory bank by :meth:`PatchKNN.partial_fit`;
  the result is written as a new version of the model's folder (:func:`patchknn.versions.save_version`,
  atomic; a plain model folder is version 1 and becomes versioned on its first correction) and then
  served: the swap happens after the new
  version is built, loaded and warmed up, off the request path of predictions, which go on meanwhile
  on the old version; requests admitted before the swap finish on the old version
  (:mod:`patchknn.server.registry`). Answers 201 with the new version's number and fingerprint.
  Corrections of one model run one at a time, each on the version served when it starts.
* ``POST /v1/models/{name}/rollback?version=N`` (``admin``): serve version ``N`` again; it is
  loaded and warmed up first, then made the folder's current version (recorded in its history) and
  swapped in the same way.
* ``GET /v1/models/{name}/versions``: the versions of the model's folder, newest first, and which
  one is served.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from patchknn.errors import ImageError
from patchknn.server.auth import ADMIN
from patchknn.server.errors import ERROR_DOCS, ApiError, image_error, json_response
from patchknn.server.middleware import ROLES_SCOPE_KEY
from patchknn.server.responses import request_body
from patchknn.server.settings import ServedModel, ServerSettings, model_version, warm_up
from patchknn.server.state import AppState, StateDep
from patchknn.server.uploads import parse_parts, read_body

__all__ = [
    "MAX_CORRECTION_IMAGES",
    "build_version",
    "check_correctable",
    "load_served_version",
    "require_admin",
    "router",
    "version_record",
]

MAX_CORRECTION_IMAGES = 16
"""Most images in one correction."""

router = APIRouter()


def version_record(info: Any) -> dict[str, Any]:
    """A :class:`patchknn.versions.VersionInfo` as JSON, without file paths."""
    record = info.as_dict()
    record.pop("path", None)
    return record


def build_version(
    base: ServedModel, images: list[np.ndarray], names: list[str], author: str | None, note: str
) -> tuple[ServedModel, Any]:
    """Load the current version of ``base``'s folder (which includes a version made meanwhile by
    ``patchknn partial-fit`` or ``rollback`` on the command line, and is the new version's recorded
    parent), add ``images`` as normal, save and warm up the new version.

    Returns the new :class:`ServedModel` and its :class:`~patchknn.versions.VersionInfo`. Runs in a
    worker thread (seconds to minutes); the served ``base`` is not touched.
    """
    from patchknn._version import __version__
    from patchknn.versions import load_version, save_version

    assert base.root is not None
    device = str(getattr(base.model, "device", "cpu"))
    model = load_version(base.root, None, device=device, progress=False)  # the folder's current version
    model.partial_fit(images)
    info = save_version(model, base.root, author=author, note=note, added=tuple(names))
    warm_up(model)
    served = ServedModel(base.name, model, model_version(info.path), __version__, int(info.number), base.root)
    return served, info


def load_served_version(base: ServedModel, number: int, author: str | None = None) -> tuple[ServedModel, Any]:
    """Load version ``number`` of ``base``'s folder, warm it up, then make it the folder's current
    version (:func:`patchknn.versions.rollback`, recorded in its history). Worker thread."""
    from patchknn._version import __version__
    from patchknn.versions import VersionError, load_version, rollback

    assert base.root is not None
    device = str(getattr(base.model, "device", "cpu"))
    try:
        model = load_version(base.root, number, device=device, progress=False)
    except VersionError as exc:
        raise ApiError(404, "not_found", str(exc).replace(str(base.root), base.name)) from None
    warm_up(model)
    info = rollback(base.root, number, author=author)
    served = ServedModel(base.name, model, model_version(info.path), __version__, int(info.number), base.root)
    return served, info


def _text(parts: list[Any], name: str, limit: int) -> str:
    values = [p.data for p in parts if p.name == name]
    if len(values) > 1:
        raise ApiError(400, "invalid_multipart", f"the field {name!r} is given {len(values)} times")
    if not values:
        return ""
    try:
        text = values[0].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_multipart", f"the field {name!r} is not UTF-8 text") from None
    if len(text) > limit or any(not ch.isprintable() for ch in text):
        raise ApiError(400, "invalid_multipart", f"the field {name!r} must be one line of at most {limit} characters")
    return text


def _file_name(filename: str, i: int) -> str:
    base = os.path.basename(filename.replace("\\", "/")).strip()
    clean = "".join(ch for ch in base if ch.isprintable())[:200]
    return clean or f"upload-{i + 1}"


def require_admin(request: Request, what: str) -> None:
    """403 ``forbidden`` unless the request's key has the ``admin`` role."""
    if ADMIN not in request.scope.get(ROLES_SCOPE_KEY, frozenset()):
        raise ApiError(
            403, "forbidden",
            f"{what} need an API key with the 'admin' role (a key file line 'KEY admin', or "
            "PATCHKNN_ADMIN_KEYS); this key, or a server without keys, may only predict",
        )


def check_correctable(served: ServedModel) -> None:
    """409 ``not_versioned`` unless ``served`` came from a model folder and can learn new images."""
    if served.root is None:
        raise ApiError(
            409,
            "not_versioned",
            f"model {served.name!r} is an exported model (patchknn export), which cannot learn new images; "
            "serve the model folder it was exported from to correct it",
        )
    if not hasattr(served.model, "partial_fit"):
        raise ApiError(409, "not_versioned", f"model {served.name!r} cannot learn new images (no partial_fit)")


async def swap_in(
    state: AppState, name: str, base: ServedModel, served: ServedModel, info: Any, status: int
) -> Response:
    """Serve ``served`` in place of ``base`` (the hot swap) and answer with both versions."""
    await state.registry.swap(name, served)
    state.metrics.add_model_info(name, served.version, str(served.model.config.backbone))
    body = {
        "model": name,
        "version_number": served.number,
        "model_version": served.version,
        "previous": {"version_number": base.number, "model_version": base.version},
        "threshold": served.threshold,
        "version": version_record(info),
    }
    return json_response(status, body)


async def read_correction(request: Request, settings: ServerSettings) -> tuple[list[np.ndarray], list[str], str, str]:
    """The images (decoded as ``predict`` decodes them), their file names, the note and the author
    of a correction's multipart body."""
    from patchknn.data import load_image

    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, "invalid_multipart", "send the images as multipart/form-data fields named 'file'")
    try:
        async with asyncio.timeout(settings.request_timeout_s):
            body = await read_body(request, settings.max_upload_bytes)
    except TimeoutError:
        raise ApiError(408, "request_timeout", "the request body did not arrive in time") from None
    parts = parse_parts(body, content_type, max_parts=MAX_CORRECTION_IMAGES + 2)
    del body
    files = [p for p in parts if p.name == "file"]
    if not files:
        raise ApiError(422, "missing_file", "no image: send the normal images as multipart fields named 'file'")
    note, author = _text(parts, "note", 500), _text(parts, "author", 100)
    names = [_file_name(p.filename, i) for i, p in enumerate(files)]
    images = []
    for part, file_name in zip(files, names, strict=True):
        try:
            images.append(await asyncio.to_thread(load_image, part.data, max_pixels=settings.max_pixels))
        except ImageError as exc:
            err = image_error(exc, settings.max_pixels)
            raise ApiError(err.status, err.code, f"{file_name}: {err.message}") from None
    return images, names, note, author


@router.post(
    "/v1/models/{name}/corrections",
    status_code=201,
    responses=ERROR_DOCS,
    summary="Teach the model that images are normal (admin): writes and serves a new version",
    openapi_extra=request_body(
        {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "note": {"type": "string"},
            "author": {"type": "string"},
        }
    ),
)
async def correct(name: str, request: Request, state: StateDep) -> Response:
    require_admin(request, "corrections")
    check_correctable(state.registry.current(name).served)
    images, names, note, author = await read_correction(request, state.settings)
    async with state.correction_locks.setdefault(name, asyncio.Lock()):
        base = state.registry.current(name).served  # the version served now (an earlier correction may have swapped)
        check_correctable(base)
        served, info = await asyncio.to_thread(build_version, base, images, names, author or None, note)
        return await swap_in(state, name, base, served, info, 201)


@router.post(
    "/v1/models/{name}/rollback",
    responses=ERROR_DOCS,
    summary="Serve an earlier (or any) version of the model again (admin); it becomes the folder's current one",
)
async def serve_version(name: str, request: Request, state: StateDep, version: int = Query(..., ge=1)) -> Response:
    require_admin(request, "rollbacks")
    check_correctable(state.registry.current(name).served)
    async with state.correction_locks.setdefault(name, asyncio.Lock()):
        base = state.registry.current(name).served
        served, info = await asyncio.to_thread(load_served_version, base, version)
        return await swap_in(state, name, base, served, info, 200)


@router.get("/v1/models/{name}/versions", summary="The model's versions, newest first", responses=ERROR_DOCS)
async def versions(name: str, state: StateDep) -> Response:
    served = state.registry.current(name).served
    records: list[dict[str, Any]] = []
    if served.root is not None:
        from patchknn.versions import list_versions

        infos = await asyncio.to_thread(list_versions, served.root)
        records = sorted((version_record(i) for i in infos), key=lambda r: r["number"], reverse=True)
    body = {"model": name, "serving": served.number, "versions": records}
    return json_response(200, body)
