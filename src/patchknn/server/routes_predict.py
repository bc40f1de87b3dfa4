"""``POST /v1/models/{name}/predict``: score one image (the server's main route).

The image is read within the upload limit, recognised by its content, decoded in the decode pool
within the memory budget (:mod:`patchknn.server.uploads`), scored by the model version's
micro-batcher together with concurrent requests, and answered with the score, the verdict
(:class:`~patchknn.scoring.Prediction`'s rule) and optionally the anomaly map.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from patchknn.data import DECODE_FORMATS
from patchknn.scoring import Prediction
from patchknn.server.batching import ScoredImage
from patchknn.server.errors import ERROR_DOCS, ApiError, json_response
from patchknn.server.registry import LiveModel
from patchknn.server.responses import PredictResponse, encode_map, request_body
from patchknn.server.state import AppState, StateDep
from patchknn.server.uploads import decode_in_pool, format_mib, header_cost, parse_multipart, read_body, sniff_format
from patchknn.visualize import model_scale

__all__ = ["MapKind", "router"]

MapKind = Literal["none", "png", "heatmap", "overlay"]
BINARY = {"type": "string", "format": "binary"}

router = APIRouter()


def check_declared_length(request: Request, limit: int) -> None:
    """413 before reading when the declared ``Content-Length`` is over ``limit`` (400 if it is not a number)."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise ApiError(400, "bad_request", "Content-Length is not a number")
    if int(declared) > limit:
        raise ApiError(
            413,
            "payload_too_large",
            f"the request body ({int(declared):,} bytes) is larger than the limit of {limit:,} bytes",
        )


async def read_image_bytes(request: Request, limit: int) -> bytes:
    """The uploaded file: the multipart field ``file`` or the raw body (400 ``empty_body`` if none)."""
    body = await read_body(request, limit)
    content_type = request.headers.get("content-type", "")
    data = parse_multipart(body, content_type) if content_type.lower().startswith("multipart/form-data") else body
    if not data:
        raise ApiError(
            400,
            "empty_body",
            "no image: send it as multipart field 'file' (-F file=@img.png) or as the raw body",
        )
    return data


def timeout_error(state: AppState, phase: str) -> ApiError:
    """The answer to a request that ran out of time in ``phase``."""
    settings = state.settings
    if phase == "memory":
        return ApiError(
            503,
            "server_busy",
            f"the decode memory budget ({format_mib(state.budget.limit)}) stayed taken by other images "
            f"until the request timeout of {settings.request_timeout_s:g} s; "
            f"retry in {settings.retry_after_s} s",
            {"Retry-After": str(settings.retry_after_s)},
        )
    if phase == "read":
        return ApiError(
            408,
            "request_timeout",
            f"the request body did not arrive within {settings.request_timeout_s:g} s",
        )
    return ApiError(
        504,
        "timeout",
        f"no answer within the request timeout of {settings.request_timeout_s:g} s (while in the {phase} stage)",
    )


@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    responses=ERROR_DOCS,
    summary="Score one image",
    openapi_extra=request_body(
        {"file": BINARY},
        **{t: {"schema": BINARY} for t in ("application/octet-stream", "image/png", "image/jpeg")},
    ),
)
async def predict(
    name: str,
    request: Request,
    state: StateDep,
    map: MapKind = Query(
        "none",
        description="Also return the anomaly map: png (16-bit scores), heatmap (colour) or overlay (the "
        "heat map over the image, with the outline of map >= threshold).",
    ),
    source: str = Query("", max_length=200, description="A name for the image in the recent-results list."),
) -> Response:
    """Score one image: a multipart upload in the field ``file``, or the raw body (any type).

    The image type is recognised from its content (PNG, JPEG, BMP, TIFF, WEBP, GIF, PPM), not from
    its name or Content-Type header.
    """
    t0 = time.perf_counter()
    state.registry.current(name)  # 404 before anything else
    if not state.ready:
        raise ApiError(503, "not_ready", "the server is not ready", {"Retry-After": "1"})
    check_declared_length(request, state.settings.max_upload_bytes)
    live = state.registry.acquire(name)  # this request finishes on this version, whatever is swapped meanwhile
    live.expected += 1
    progress = Progress()
    try:
        async with asyncio.timeout(state.settings.request_timeout_s), state.admission.slot():
            content = await _score(state, name, live, request, map, progress)
    except TimeoutError:
        raise timeout_error(state, progress.phase) from None
    finally:
        if not progress.submitted:
            live.expected -= 1
        await state.registry.release(live)
    state.metrics.count_prediction(name, content["verdict"])
    content["timing_ms"]["total"] = round((time.perf_counter() - t0) * 1000.0, 3)
    state.results.add(content, source)
    return json_response(200, content)


@dataclass
class Progress:
    """How far a request got: its stage (for the timeout's answer) and whether the batcher has it."""

    phase: str = "queue"
    submitted: bool = False


async def _score(
    state: AppState, name: str, live: LiveModel, request: Request, map: str, progress: Progress
) -> dict[str, Any]:
    """Read, decode and score one request's image on ``live``; the answer's content (without the
    total time)."""
    settings, served = state.settings, live.served
    timings: dict[str, float] = {}
    progress.phase = "read"
    t_read = time.perf_counter()
    data = await read_image_bytes(request, settings.max_upload_bytes)
    progress.phase = "decode"
    t_decode = time.perf_counter()
    timings["read"] = t_decode - t_read
    if sniff_format(data) is None:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the content is not an accepted image type (recognised by its first bytes; accepted: "
            f"{', '.join(DECODE_FORMATS)})",
        )
    cost = await header_cost(data, settings.max_pixels, state.budget)
    progress.phase = "memory"
    await state.budget.acquire(cost.bytes)
    progress.phase = "decode"
    assert state.decode_pool is not None
    tensor, (h, w) = await decode_in_pool(
        state.decode_pool, state.budget, data, served.image_size, settings.max_pixels, cost
    )
    del data
    timings["decode"] = time.perf_counter() - t_decode
    progress.phase = "score"
    live.expected -= 1
    progress.submitted = True
    assert live.batcher is not None
    result: ScoredImage = await live.batcher.submit(tensor)
    if not (math.isfinite(result.score) and np.isfinite(result.anomaly_map).all()):
        raise ApiError(
            422,
            "unscorable_image",
            "the anomaly map contains NaN or infinite values (numerical overflow in the backbone, "
            "or a damaged model); no score is given",
        )
    threshold = served.threshold
    anomaly_map = None
    if map != "none":
        image = tensor.permute(1, 2, 0).numpy() if map == "overlay" else None
        anomaly_map = await asyncio.get_running_loop().run_in_executor(
            state.decode_pool, encode_map, result.anomaly_map, map, model_scale(served.model), image, threshold
        )
    timings["queue"] = result.queue_s
    timings["inference"] = result.inference_s
    content = {
        "model": name,
        "model_version": served.version,
        "version_number": served.number,
        "score": result.score,
        "threshold": threshold,
        "verdict": Prediction(name, result.anomaly_map, result.score, threshold).verdict,  # predict's rule
        "image": {"width": w, "height": h},
        "batch_size": result.batch_size,
        "timing_ms": {k: round(v * 1000.0, 3) for k, v in timings.items()},
    }
    if anomaly_map is not None:
        content["anomaly_map"] = anomaly_map
    return content
