"""The report folder's layout: file names, the per-category data format, and reading it back.

Shared by the collector (which writes the folder) and the HTML page (which reads it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from patchknn.errors import PatchKNNError

ASSETS = "assets"
DATA_FORMAT = "patchknn-report-category"
DATA_VERSION = 1
GALLERY_KINDS = ("false_positives", "misses", "detections")
GALLERY_TITLES = {
    "false_positives": "Worst false positives (good images with the highest scores)",
    "misses": "Worst misses (defective images with the lowest scores)",
    "detections": "Best detections (defective images whose predicted region best overlaps the truth)",
}


class ReportError(PatchKNNError, ValueError):
    """A results file or report data file cannot be used to write a report."""



def safe_name(name: str) -> str:
    """``name`` as a file name and HTML id: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def load_category_data(path: str | Path) -> dict[str, Any]:
    """Read ``assets/<category>.json``; raises :class:`~patchknn.errors.PatchKNNError` when unusable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot read report data ({e})") from e
    if not isinstance(data, dict) or data.get("format") != DATA_FORMAT:
        raise ReportError(f"{path}: not a patchknn report data file")
    if int(data.get("version", 0)) > DATA_VERSION:
        raise ReportError(f"{path}: report data version {data.get('version')} is newer than this patchknn")
    return data


__all__ = [
    "ASSETS",
    "DATA_FORMAT",
    "DATA_VERSION",
    "GALLERY_KINDS",
    "GALLERY_TITLES",
    "ReportError",
    "load_category_data",
    "safe_name",
]
