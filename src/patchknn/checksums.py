"""File checksums: the one SHA-256 of a file (model files, exported graphs, backbone weights).

Layer 0: imports nothing of patchknn, so both the weights readers (``backbones``) and the
model-file format (``serialization``) use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["sha256_file"]
