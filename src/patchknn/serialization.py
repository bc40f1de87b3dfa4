"""Model files: safetensors for every tensor, one JSON document for everything else.

A saved model is a directory::

    model/
      patchknn.json                     format, versions, configuration, fitted values, file checksums
      tensors-<sha256[:16]>.safetensors memory bank, PCA, ... (named by their content hash)
      backbone-<sha256[:16]>.safetensors the truncated backbone's weights (the model is self-contained)
      .patchknn.lock                    empty; serialises concurrent saves into the same directory

Saving is atomic: the tensor files are written first under content-addressed names (temporary
name, fsync, rename), then ``patchknn.json`` is replaced in one ``os.replace``. A crash at any
point leaves either the previous model or the new one, never a mix; files no longer referenced
(and temporary files of an earlier, interrupted save) are removed last. Only files named like the
ones this module writes are ever removed, so saving into a folder never deletes other files.

Loading verifies the format, the versions, the size and the SHA-256 of every file before parsing
it, and only ever parses JSON and safetensors (no pickle, no code execution).
:func:`check_model_contents` then checks the types and shapes of what was read, so a damaged or
hand-edited model fails with :class:`~patchknn.errors.ModelFileError`, never another exception.
The checksums detect damage (truncation, bit rot, partial copies, edits that forget to update
them); they are not a signature: whoever can write ``patchknn.json`` can update them too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from patchknn._version import __version__
from patchknn.checksums import sha256_file as sha256_file  # model files' checksums; re-exported
from patchknn.errors import ModelFileError

FORMAT_NAME = "patchknn-model"
FORMAT_VERSION = 1
META_FILE = "patchknn.json"
LOCK_FILE = ".patchknn.lock"

_GROUP_NAME = re.compile(r"[A-Za-z0-9_]+")
_TENSOR_FILE = re.compile(r"[A-Za-z0-9_]+-[0-9a-f]{16}\.safetensors")
"""Names of the tensor files this module writes (the only ``.safetensors`` files it removes)."""
_TEMP_FILE = re.compile(r"\.(patchknn\.json|[A-Za-z0-9_]+-[0-9a-f]{16}\.safetensors)\.[^/]+\.tmp")
"""Names of its temporary files (left behind only when a save was killed)."""
_LOAD_ATTEMPTS = 3


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


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: a temporary file in the same folder,
    fsynced, renamed over ``path``, then the folder fsynced; a failure leaves ``path`` as it was
    and no temporary file behind. The one atomic writer of the package."""
    path = Path(path)
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


@contextmanager
def _dir_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on ``root/.patchknn.lock`` while saving (POSIX; a no-op where unavailable).

    Two processes saving into the same directory take turns instead of deleting each other's files.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # read-only or odd file system: save without the lock
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(path: Path) -> None:
    with suppress(OSError):
        path.unlink()


def save_model(path: str | Path, meta: dict[str, Any], groups: dict[str, dict[str, np.ndarray]]) -> Path:
    """Write ``groups`` (file stem -> {name: array}) and ``meta`` as a model directory.

    ``meta`` must hold JSON types (numpy scalars and arrays are converted); NaN or infinity inside it
    is stored as ``null``, except a non-finite ``threshold``, which is refused. All of this is
    checked before anything is written.

    Returns:
        The directory path.

    Raises:
        ModelFileError: ``path`` is a file, a group name is not a plain name, or ``meta`` cannot be
            stored as strict JSON.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ModelFileError(f"{root}: exists and is not a model directory")
    bad = [stem for stem in groups if not isinstance(stem, str) or not _GROUP_NAME.fullmatch(stem)]
    if bad:
        raise ModelFileError(f"{root}: tensor group names must be letters, digits or '_', got {bad}")
    reserved = {"format", "format_version", "patchknn_version", "files"} & set(meta)
    if reserved:
        raise ModelFileError(f"{root}: metadata keys {sorted(reserved)} are reserved for the file format")
    thr = meta.get("threshold")
    if isinstance(thr, float | np.floating) and not math.isfinite(float(thr)):
        raise ModelFileError(f"{root}: the threshold is {thr}; set a finite threshold (or None) before saving")
    try:
        meta = _json_safe(meta)
        json.dumps(meta, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as e:
        raise ModelFileError(f"{root}: the model's metadata cannot be stored as JSON ({e})") from e
    blobs: dict[str, bytes] = {
        stem: st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()}) for stem, tensors in groups.items()
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _dir_lock(root):
            _write_locked(root, meta, blobs)
    except OSError as e:  # disk full, permissions, a file where a folder should be, ...
        raise ModelFileError(
            f"{root}: the model could not be written ({e.strerror or e}); a model saved there before is unchanged"
        ) from e
    return root


def _write_locked(root: Path, meta: dict[str, Any], blobs: dict[str, bytes]) -> None:
    """The writing part of :func:`save_model`, under the directory lock. Until the final
    ``os.replace`` of ``patchknn.json`` nothing the previous model uses is touched."""
    for leftover in root.iterdir():
        if _TEMP_FILE.fullmatch(leftover.name):
            _remove(leftover)  # from a save that was killed; nobody else writes here now
    files: dict[str, dict[str, str]] = {}
    for stem, blob in blobs.items():
        digest = hashlib.sha256(blob).hexdigest()
        name = f"{stem}-{digest[:16]}.safetensors"
        target = root / name
        if not (target.is_file() and target.stat().st_size == len(blob) and sha256_file(target) == digest):
            atomic_write(target, blob)
        files[stem] = {"file": name, "sha256": digest, "bytes": str(len(blob))}
    document = {
        **meta,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "patchknn_version": __version__,
        "files": files,
    }
    atomic_write(root / META_FILE, json.dumps(document, indent=2, sort_keys=True, allow_nan=False).encode())
    # the new model is in place; what is left is housekeeping, whose failure must not fail the save
    keep = {f["file"] for f in files.values()}
    with suppress(OSError):
        for old in list(root.iterdir()):
            if _TENSOR_FILE.fullmatch(old.name) and old.name not in keep:
                _remove(old)


def _json_safe(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays -> Python, tuples -> lists, NaN/inf -> null."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _parse_meta(root: Path, raw: bytes) -> dict[str, Any]:
    meta_path = root / META_FILE
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModelFileError(f"{meta_path}: not valid JSON ({e}); the file is damaged") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{meta_path}: not a patchknn model file")
    version = doc.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
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
    files = doc.get("files")
    if not isinstance(files, dict):
        raise ModelFileError(f"{meta_path}: the list of tensor files is missing")
    for stem, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("file"), str)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise ModelFileError(f"{meta_path}: damaged file entry for {stem!r}")
        name = entry["file"]
        if not name or Path(name).name != name or name in (".", ".."):
            raise ModelFileError(f"{root}: file name {name!r} for {stem!r} is not a plain name")
        if "bytes" in entry and _parse_size(entry["bytes"]) is None:
            raise ModelFileError(f"{meta_path}: damaged size {entry['bytes']!r} for {stem!r}")
    return doc


def _parse_size(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and value.isdigit() and len(value) < 20:
        size = int(value)
    else:
        return None
    return size if size >= 0 else None


def _read_meta_bytes(root: Path) -> bytes:
    meta_path = root / META_FILE
    if not root.exists():
        raise ModelFileError(f"{root}: no such model")
    if not meta_path.is_file():
        raise ModelFileError(f"{root}: not a patchknn model directory (no {META_FILE})")
    try:
        return meta_path.read_bytes()
    except OSError as e:
        raise ModelFileError(f"{meta_path}: cannot be read ({e.strerror or e})") from e


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and check ``patchknn.json`` of a model directory (no tensors are read)."""
    root = Path(path)
    return _parse_meta(root, _read_meta_bytes(root))


class _Vanished(ModelFileError):
    """A referenced file is missing (maybe replaced by a concurrent save: worth one more try)."""


def _read_groups(
    root: Path, doc: dict[str, Any], skip: Mapping[str, Collection[str]] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    skip = skip or {}
    for stem, entry in doc["files"].items():
        name, digest = entry["file"], entry["sha256"]
        file = root / name
        try:
            size = file.stat().st_size if file.is_file() else None
        except OSError:
            size = None
        if size is None:
            raise _Vanished(f"{file}: missing; the model directory is incomplete")
        expected = _parse_size(entry.get("bytes"))
        if expected is not None and size != expected:
            raise ModelFileError(
                f"{file}: checksum mismatch ({size} bytes where {expected} were saved); "
                "the file was truncated or modified after saving"
            )
        if skip.get(str(stem)):
            groups[str(stem)] = _read_some(file, digest, set(skip[str(stem)]))
            continue
        try:
            blob = file.read_bytes()
        except FileNotFoundError:
            raise _Vanished(f"{file}: missing; the model directory is incomplete") from None
        except OSError as e:
            raise ModelFileError(f"{file}: cannot be read ({e.strerror or e})") from e
        if hashlib.sha256(blob).hexdigest() != digest:
            raise ModelFileError(f"{file}: checksum mismatch; the file was truncated or modified after saving")
        try:
            groups[str(stem)] = st_load(blob)
        except Exception as e:  # noqa: BLE001 - safetensors' error types on malformed data vary
            raise ModelFileError(f"{file}: not a valid safetensors file ({type(e).__name__}: {e})") from e
    return groups


def _read_some(file: Path, digest: str, skip: set[str]) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file except ``skip``; the whole file's checksum is verified
    by streaming it (the skipped tensors never enter memory)."""
    from safetensors import safe_open

    if sha256_file(file) != digest:
        raise ModelFileError(f"{file}: checksum mismatch; the file was truncated or modified after saving")
    try:
        with safe_open(str(file), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k not in skip}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - safetensors' error types on malformed data vary
        raise ModelFileError(f"{file}: not a valid safetensors file ({type(e).__name__}: {e})") from e


def load_model(
    path: str | Path, skip: Mapping[str, Collection[str]] | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Read a model directory written by :func:`save_model`, verifying every size and checksum.

    ``skip`` names tensors not to read, by group (e.g. ``{"tensors": ["bank"]}`` for a memory bank
    that is searched elsewhere); their files are still checksummed, by streaming.

    If a referenced file disappears because another process saved a new model into the same
    directory meanwhile, the new model is read instead (a few attempts).

    Raises:
        ModelFileError: missing, damaged, tampered with, or of an unsupported format.
    """
    root = Path(path)
    for attempt in range(_LOAD_ATTEMPTS):
        raw = _read_meta_bytes(root)
        doc = _parse_meta(root, raw)
        try:
            return doc, _read_groups(root, doc, skip)
        except _Vanished as e:
            replaced = (root / META_FILE).is_file() and _read_meta_bytes(root) != raw
            if not replaced or attempt == _LOAD_ATTEMPTS - 1:
                raise ModelFileError(str(e)) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits[:18]) if digits else 0)
    return tuple(out)


def group_file(path: str | Path, group: str, verify: bool = True) -> Path:
    """The safetensors file of ``group`` in a saved model directory (checksum verified, streaming)."""
    root = Path(path)
    doc = read_meta(root)
    entry = doc["files"].get(group)
    if not isinstance(entry, dict) or "file" not in entry:
        raise ModelFileError(f"{root}: the {group!r} tensors are missing from the model")
    name = str(entry["file"])
    if Path(name).name != name:
        raise ModelFileError(f"{root}: file name {name!r} for {group!r} is not a plain name")
    file = root / name
    if not file.is_file():
        raise ModelFileError(f"{file}: missing; the model directory is incomplete")
    if verify and sha256_file(file) != entry.get("sha256"):
        raise ModelFileError(f"{file}: checksum mismatch; the file was truncated or modified after saving")
    return file


def bank_shape(path: str | Path) -> tuple[int, int]:
    """``(rows, dim)`` of a saved model's memory bank, read from the file header only."""
    from safetensors import safe_open

    with safe_open(str(group_file(path, "tensors", verify=False)), framework="numpy") as f:
        if "bank" not in f.keys():  # noqa: SIM118 - safe_open objects are not containers
            raise ModelFileError(f"{path}: the memory bank is missing from the model")
        shape = f.get_slice("bank").get_shape()
    if len(shape) != 2:
        raise ModelFileError(f"{path}: the memory bank must be an (N, d) matrix, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def read_tensor_rows(path: str | Path, name: str, start: int, stop: int | None, verify: bool = True) -> np.ndarray:
    """Rows ``[start, stop)`` of tensor ``name`` of a saved model's ``tensors`` group, float32, without
    reading the other rows."""
    from safetensors import safe_open

    with safe_open(str(group_file(path, "tensors", verify)), framework="numpy") as f:
        if name not in f.keys():  # noqa: SIM118
            raise ModelFileError(f"{path}: tensor {name!r} is missing from the model")
        return np.ascontiguousarray(f.get_slice(name)[start:stop], dtype=np.float32)
