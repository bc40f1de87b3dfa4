"""Model files: safetensors for every tensor, one JSON document for everything else.

A saved model is a directory::

    model/
      patchknn.json                     format, versions, configuration, fitted values, file checksums
      tensors-<sha256[:16]>.safetensors memory bank, PCA, ... (named by their content hash)
      backbone-<sha256[:16]>.safetensors the truncated backbone's weights (the model is self-contained)

Saving is atomic: the tensor files are written first under content-addressed names (temporary
name, fsync, rename), then ``patchknn.json`` is replaced in one ``os.replace``. A crash at any
point leaves either the previous model or the new one, never a mix; files no longer referenced
are removed last. Loading verifies the format, the versions and the SHA-256 of every file before
reading it, and only ever parses JSON and safetensors (no pickle, no code execution).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from patchknn._version import __version__
from patchknn.errors import ModelFileError

FORMAT_NAME = "patchknn-model"
FORMAT_VERSION = 1
META_FILE = "patchknn.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_model(
    path: str | Path, meta: dict[str, Any], groups: dict[str, dict[str, np.ndarray]]
) -> Path:
    """Write ``groups`` (file stem -> {name: array}) and ``meta`` as a model directory.

    Returns the directory path.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ModelFileError(f"{root}: exists and is not a model directory")
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}
    for stem, tensors in groups.items():
        blob = st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
        digest = hashlib.sha256(blob).hexdigest()
        name = f"{stem}-{digest[:16]}.safetensors"
        target = root / name
        if not (target.exists() and _sha256_file(target) == digest):
            _atomic_write(target, blob)
        files[stem] = {"file": name, "sha256": digest, "bytes": str(len(blob))}
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "patchknn_version": __version__,
        "files": files,
        **meta,
    }
    _atomic_write(root / META_FILE, json.dumps(document, indent=2, sort_keys=True).encode())
    keep = {f["file"] for f in files.values()} | {META_FILE}
    for old in root.glob("*.safetensors"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return root


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and check ``patchknn.json`` of a model directory (no tensors are read)."""
    root = Path(path)
    meta_path = root / META_FILE
    if not root.exists():
        raise ModelFileError(f"{root}: no such model")
    if not meta_path.is_file():
        raise ModelFileError(f"{root}: not a patchknn model directory (no {META_FILE})")
    try:
        doc = json.loads(meta_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{meta_path}: not valid JSON ({e}); the file is damaged") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{meta_path}: not a patchknn model file")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{root}: model format version {version!r} is not supported by patchknn {__version__} "
            f"(supports {FORMAT_VERSION}); re-fit the model or use the patchknn version that saved it "
            f"({doc.get('patchknn_version', 'unknown')})"
        )
    saved_by = str(doc.get("patchknn_version", "0"))
    if _version_tuple(saved_by) > _version_tuple(__version__):
        raise ModelFileError(
            f"{root}: saved by patchknn {saved_by}, newer than this patchknn {__version__}; upgrade patchknn"
        )
    if not isinstance(doc.get("files"), dict):
        raise ModelFileError(f"{meta_path}: the list of tensor files is missing")
    return doc


def load_model(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Read a model directory written by :func:`save_model`, verifying every checksum."""
    root = Path(path)
    doc = read_meta(root)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for stem, entry in doc["files"].items():
        try:
            name, digest = str(entry["file"]), str(entry["sha256"])
        except (KeyError, TypeError) as e:
            raise ModelFileError(f"{root}: damaged file entry for {stem!r}") from e
        if Path(name).name != name:
            raise ModelFileError(f"{root}: file name {name!r} for {stem!r} is not a plain name")
        file = root / name
        if not file.is_file():
            raise ModelFileError(f"{file}: missing; the model directory is incomplete")
        blob = file.read_bytes()
        if hashlib.sha256(blob).hexdigest() != digest:
            raise ModelFileError(
                f"{file}: checksum mismatch; the file was truncated or modified after saving"
            )
        try:
            groups[stem] = st_load(blob)
        except (SafetensorError, ValueError, OSError) as e:
            raise ModelFileError(f"{file}: not a valid safetensors file ({e})") from e
    return doc, groups


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)
