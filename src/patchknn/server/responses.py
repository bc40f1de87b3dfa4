"""The answer of ``predict``: its schema (for the OpenAPI documentation) and the anomaly map's encoding."""

from __future__ import annotations

import base64
import io
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

__all__ = ["AnomalyMap", "PredictResponse", "encode_map"]


class AnomalyMap(BaseModel):
    kind: Literal["png", "heatmap"] = Field(
        description="png: 16-bit grayscale, score = pixel / 65535 * vmax; heatmap: colour image for people"
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
    model_version: str = Field(description="Content fingerprint of the saved model.")
    score: float = Field(description="Image anomaly score (as PatchKNN.predict).")
    threshold: float | None = Field(description="The model's decision threshold, or null.")
    verdict: Literal["OK", "NG"] | None = Field(description="NG when score >= threshold; null without one.")
    image: dict[str, int] = Field(description="The uploaded image's width and height.")
    batch_size: int = Field(description="Images in the backbone call this one shared.")
    timing_ms: dict[str, float] = Field(description="total, read, decode, queue, inference (ms).")
    anomaly_map: AnomalyMap | None = None


def encode_map(amap: np.ndarray, kind: str, scale: tuple[float, float] | None) -> dict[str, Any]:
    """An anomaly map as the ``anomaly_map`` of the answer: a base64 PNG (16-bit scores or a heat map)."""
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
        from patchknn.visualize import colorize

        # the model's fixed colour scale (the same as `patchknn predict` overlays and the report)
        vmin, vmax = scale if scale is not None else (0.0, float(amap.max()) or 1.0)
        Image.fromarray(colorize(amap, vmin, vmax)).save(buf, format="PNG")
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
