"""The answer of ``predict``: its schema (for the OpenAPI documentation) and the anomaly map's encoding."""

from __future__ import annotations

import base64
import io
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

__all__ = ["AnomalyMap", "PredictResponse", "encode_map", "request_body"]


def request_body(properties: dict[str, Any], **other: Any) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route reading a multipart body with ``properties`` (``file``
    required), and ``other`` content types (type -> schema) besides."""
    multipart = {"schema": {"type": "object", "properties": properties, "required": ["file"]}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": multipart, **other}}}


class AnomalyMap(BaseModel):
    kind: Literal["png", "heatmap", "overlay"] = Field(
        description="png: 16-bit grayscale, score = pixel / 65535 * vmax; heatmap: colour image for people; "
        "overlay: the heat map blended over the image with the outline of map >= threshold"
    )
    media_type: str = "image/png"
    encoding: str = "base64"
    width: int
    height: int
    vmin: float
    vmax: float
    data: str = Field(description="The PNG file, base64-encoded.")


class PredictResponse(BaseModel):
    model: str = Field(description="The model's name.")
    model_version: str = Field(description="Content fingerprint of the saved model version that answered.")
    version_number: int | None = Field(
        None, description="That version's number in a versioned model folder (null for a plain model folder)."
    )
    score: float = Field(description="Image anomaly score (as PatchKNN.predict).")
    threshold: float | None = Field(description="The model's decision threshold, or null.")
    verdict: Literal["OK", "NG"] | None = Field(description="NG when score >= threshold; null without one.")
    image: dict[str, int] = Field(description="The uploaded image's width and height.")
    batch_size: int = Field(description="Images in the backbone call this one shared.")
    timing_ms: dict[str, float] = Field(description="total, read, decode, queue, inference (ms).")
    anomaly_map: AnomalyMap | None = None


def encode_map(
    amap: np.ndarray,
    kind: str,
    scale: tuple[float, float] | None,
    image: np.ndarray | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """An anomaly map as the ``anomaly_map`` of the answer: a base64 PNG (16-bit scores, a heat map, or
    for ``overlay`` the heat map over ``image`` (uint8 ``(S, S, 3)``, the model's input) with the
    outline of ``map >= threshold``, as ``patchknn predict`` draws it)."""
    from PIL import Image

    h, w = amap.shape
    buf = io.BytesIO()
    vmin = 0.0
    if kind == "png":
        vmax = float(amap.max())
        vmax = vmax if vmax > 0 and math.isfinite(vmax) else 1.0
        pixels = np.clip(np.rint(amap.astype(np.float64) / vmax * 65535.0), 0, 65535).astype(np.uint16)
        Image.fromarray(pixels).save(buf, format="PNG")
    else:
        from patchknn.visualize import colorize, overlay

        # the model's fixed colour scale (the same as `patchknn predict` overlays and the report)
        vmin, vmax = scale if scale is not None else (0.0, float(amap.max()) or 1.0)
        if kind == "overlay" and image is not None:
            pixels = overlay(image, amap, vmin=vmin, vmax=vmax, threshold=threshold)
        else:
            pixels = colorize(amap, vmin, vmax)
        Image.fromarray(pixels).save(buf, format="PNG")
    return {
        "kind": kind,
        "media_type": "image/png",
        "encoding": "base64",
        "width": int(w),
        "height": int(h),
        "vmin": float(vmin),
        "vmax": float(vmax),
        "data": base64.b64encode(buf.getvalue()).decode("ascii"),
    }
