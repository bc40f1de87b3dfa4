"""Model versions: a model folder that keeps every version of its model, with who, when and what.

A versioned model folder is a normal model folder (``PatchKNN.load(root)``, ``patchknn predict
root``, ``serve``, ``evaluate`` ... read it as before: it always holds the *current* version) with
every version kept beside it::

    root/
      patchknn.json, *.safetensors   the current version (a plain model folder, kind as saved)
      versions/0001/ ... 0007/       every version, complete (what PatchKNN.save writes)
      versions/history.json          the events: saves, rollbacks, adoptions (who, when)
      .versions.lock                 serialises writers (fcntl)

Each version's ``patchknn.json`` records its own ``fit_info["version"]``: number, created (ISO
UTC), author, note, the images added and their count, parent (the version current when it was
saved). :func:`list_versions` reads those; ``versions/<n>`` is never changed once written.

Writes are atomic: :func:`save_version` writes the new version completely into a temporary
folder, renames it to ``versions/<n>`` (one ``rename``), and only then makes it current by
replacing ``root/patchknn.json`` in one ``os.replace`` (the version's files are hard links, so
that costs no copy; a version's files that equal its parent's, such as the backbone weights, are
links to them too); files of the old current version are removed from ``root`` last (they stay
in their ``versions/<n>``). A crash at any point leaves the previous version current; a reader
sees the old current version or the new one (the model loader retries when a file it was about
to read was just replaced). Writers take ``root/.versions.lock``, so two concurrent writers get
different version numbers. :func:`rollback` makes an older version current the same way and keeps
everything.

A plain model folder (written by ``PatchKNN.save``) becomes version 1 on its first
:func:`save_version`; a model saved over a versioned folder with ``PatchKNN.save`` is adopted as
a new version before the next save or rollback, so nothing is ever lost.

Example:
    >>> from patchknn.versions import save_version, list_versions, rollback   # doctest: +SKIP
    >>> model = PatchKNN.load("bottle.model").partial_fit(["false_alarm.png"])  # doctest: +SKIP
    >>> save_version(model, "bottle.model", author="ana", note="glare is normal")  # doctest: +SKIP
    >>> [v.number for v in list_versions("bottle.model")]; rollback("bottle.model", 1)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchknn.errors import ModelFileError, NotFittedError, PatchKNNError
from patchknn.serialization import META_FILE, atomic_write, read_meta

if TYPE_CHECKING:
    from patchknn.model import PatchKNN

# the public names are listed once, in the package (patchknn/versions/__init__.py)

VERSIONS_DIR = "versions"
HISTORY_FILE = "history.json"
LOCK_FILE = ".versions.lock"
_TMP_PREFIX = ".incoming-"
_THREAD_LOCK = threading.Lock()  # fcntl locks are per open file; this one orders threads of a process too


class VersionError(PatchKNNError, ValueError):
    """A version that does not exist, or a folder that is not a (versioned) model folder."""


@dataclass(frozen=True)
class VersionInfo:
    """One version of a versioned model folder.

    Attributes:
        number: 1, 2, ...
        created: when it was saved, ISO 8601 UTC (``2026-11-30T02:14:07+00:00``).
        author: who saved it (``None`` = not given).
        note: why (free text).
        added: names of the images added to the memory bank by this version (``partial_fit``).
        n_added: how many images were added.
        threshold: the version's decision threshold (``None`` = no calibrated threshold).
        bank_rows: rows of its memory bank (searched rows; an ensemble: all members').
        parent: the version that was current when it was saved (``None`` for the first).
        path: its folder (``root/versions/0003``), loadable with ``PatchKNN.load``.
        current: whether it is the folder's current version.
    """

    number: int
    created: str
    author: str | None
    note: str
    added: list[str]
    n_added: int
    threshold: float | None
    bank_rows: int
    parent: int | None
    path: Path
    current: bool = field(default=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (``path`` as a string)."""
        return {**asdict(self), "path": str(self.path)}


# ------------------------------------------------------------------------------------ public API
def save_version(
    model: PatchKNN,
    root: str | Path,
    *,
    author: str | None = None,
    note: str = "",
    added: Sequence[str] = (),
) -> VersionInfo:
    """Save ``model`` as the next version of the model folder ``root`` and make it current.

    Args:
        model: a fitted model (any kind: single, ensemble).
        root: the model folder: new, empty, a plain model folder (its model becomes version 1),
            or a versioned one.
        author: who saves it. note: why.
        added: names of the images this version adds; default: what the model's last
            ``partial_fit`` recorded (``fit_info_["added"]``).

    Returns:
        The new version (``current=True``). The model's ``fit_info_["version"]`` is set to it.
    """
    if not model.is_fitted:
        raise NotFittedError("save_version needs a fitted model (fit, partial_fit or load one)")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise VersionError(f"{root}: exists and is not a model folder")
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        versions = _scan(root)
        parent = _adopt_if_needed(root, versions)
        number = _next_number(root, versions)
        # what the last partial_fit added moves into this version's record (a later version of
        # the same model does not repeat it)
        record = model.fit_info_.pop("added", None) or {}
        names = [str(a) for a in added] if added else [str(a) for a in record.get("names", [])]
        model.fit_info_["version"] = {
            "number": number,
            "created": _now(),
            "author": author,
            "note": str(note),
            "added": names,
            "n_added": len(names) if added else int(record.get("count", len(names))),
            "parent": parent,
        }
        target = _versions_dir(root) / f"{number:04d}"
        tmp = _versions_dir(root) / f"{_TMP_PREFIX}{number:04d}-{secrets.token_hex(4)}"
        try:
            model.save(tmp)
            if parent is not None:
                _share_files(tmp, versions[parent])
            os.rename(tmp, target)  # the version is complete before it has its name
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if record:
                model.fit_info_["added"] = record
            raise
        _fsync_dir(target.parent)
        _promote(root, target)
        _log(root, {"event": "save", "version": number, "parent": parent, "author": author, "at": _now()})
        return _info(target, current=True)


def list_versions(root: str | Path) -> list[VersionInfo]:
    """Every version of the model folder ``root``, oldest first (``current`` marks the current one).

    A plain model folder (never versioned) lists as its single version 1.
    """
    root = Path(root)
    versions = _scan(root)
    if not versions:
        return [_plain_info(root)]
    current = _current_number(root, versions)
    return [_info(path, current=(n == current)) for n, path in sorted(versions.items())]


def current_version(root: str | Path) -> VersionInfo:
    """The version ``root`` holds now.

    Raises:
        VersionError: ``root`` holds a model saved over it that is not one of its versions yet
            (it becomes one on the next :func:`save_version` or :func:`rollback`).
    """
    root = Path(root)
    versions = _scan(root)
    if not versions:
        return _plain_info(root)
    number = _current_number(root, versions)
    if number is None:
        raise VersionError(
            f"{root}: holds a model saved over the versioned folder, not one of its versions "
            "(the next save_version or rollback records it as a version)"
        )
    return _info(versions[number], current=True)


def rollback(root: str | Path, version: int, *, author: str | None = None) -> VersionInfo:
    """Make ``version`` of the model folder ``root`` current again; every version is kept and the
    rollback is recorded in the history (``history(root)``). Returns the version, now current."""
    root = Path(root)
    with _locked(root):
        versions = _scan(root)
        previous = _adopt_if_needed(root, versions)
        if version not in versions:
            have = ", ".join(str(n) for n in sorted(versions)) or "none"
            raise VersionError(f"{root}: no version {version} (versions: {have})")
        _promote(root, versions[version])
        _log(root, {"event": "rollback", "version": int(version), "from": previous, "author": author, "at": _now()})
        return _info(versions[version], current=True)


def load_version(root: str | Path, version: int | None = None, **runtime: Any) -> PatchKNN:
    """Load a version of the model folder ``root`` (``None`` = the current one), whatever its kind
    (single model, ensemble: :meth:`PatchKNN.load` picks the class); ``runtime`` as in
    :meth:`PatchKNN.load` (device, ...)."""
    from patchknn.model import PatchKNN

    root = Path(root)
    if version is None:
        versions = _scan(root)
        number = _current_number(root, versions) if versions else None
        return PatchKNN.load(root if number is None else versions[number], **runtime)
    return PatchKNN.load(version_path(root, version), **runtime)


def version_path(root: str | Path, version: int) -> Path:
    """The folder of ``version`` (``root/versions/0003``); a plain folder's version 1 is ``root``."""
    root = Path(root)
    versions = _scan(root)
    if not versions and version == 1 and (root / META_FILE).is_file():
        return root
    if version not in versions:
        have = ", ".join(str(n) for n in sorted(versions)) or "none"
        raise VersionError(f"{root}: no version {version} (versions: {have})")
    return versions[version]


def history(root: str | Path) -> list[dict[str, Any]]:
    """The events of ``root`` in order: ``{"event": "save"|"rollback"|"adopt", "version", "at",
    "author", ...}`` (a save's ``parent``, a rollback's ``from``)."""
    path = _versions_dir(Path(root)) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        events = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot be read ({e})") from e
    if not isinstance(events, list):
        raise ModelFileError(f"{path}: not a list of events")
    return events


# --------------------------------------------------------------------------------------- helpers
def _versions_dir(root: Path) -> Path:
    return root / VERSIONS_DIR


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _scan(root: Path) -> dict[int, Path]:
    """The complete versions: ``versions/<digits>`` folders holding a ``patchknn.json``."""
    folder = _versions_dir(root)
    if not folder.is_dir():
        return {}
    return {
        int(p.name): p for p in folder.iterdir() if p.name.isdigit() and p.is_dir() and (p / META_FILE).is_file()
    }


def _next_number(root: Path, versions: dict[int, Path]) -> int:
    logged = [int(e.get("version", 0)) for e in history(root) if isinstance(e, dict)]
    return max([0, *versions, *logged]) + 1


def _current_number(root: Path, versions: dict[int, Path]) -> int | None:
    """The version whose ``patchknn.json`` is the root's, byte for byte (``None``: none is)."""
    try:
        raw = (root / META_FILE).read_bytes()
        number = int(json.loads(raw)["fit_info"]["version"]["number"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = versions.get(number)
    with suppress(OSError):
        if path is not None and (path / META_FILE).read_bytes() == raw:
            return number
    return None


def _adopt_if_needed(root: Path, versions: dict[int, Path]) -> int | None:
    """The current version's number; a model in ``root`` that is not a version (a plain folder,
    or one saved over it) is first copied in as the next version (its history event: ``adopt``).
    ``versions`` is updated. ``None`` when ``root`` holds no model."""
    current = _current_number(root, versions)
    if current is not None or not (root / META_FILE).is_file():
        return current
    doc = read_meta(root)
    number = _next_number(root, versions)
    stamp = datetime.fromtimestamp((root / META_FILE).stat().st_mtime, UTC).isoformat(timespec="seconds")
    info = dict(doc.get("fit_info") or {})
    previous = info.get("version", {}).get("number") if isinstance(info.get("version"), dict) else None
    info["version"] = {
        "number": number,
        "created": stamp,
        "author": None,
        "note": "the model saved in this folder before it was versioned" if not versions
        else "a model saved over the versioned folder (PatchKNN.save)",
        "added": [],
        "n_added": 0,
        "parent": previous if previous in versions else None,
    }
    doc["fit_info"] = info
    target = _versions_dir(root) / f"{number:04d}"
    tmp = _versions_dir(root) / f"{_TMP_PREFIX}{number:04d}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        for name in _entries(doc):
            _link(root / name, tmp / name)
        atomic_write(tmp / META_FILE, _dump(doc))
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    versions[number] = target
    _promote(root, target)  # the root's patchknn.json now names its version
    _log(root, {"event": "adopt", "version": number, "author": None, "at": _now()})
    return number


def _entries(doc: dict[str, Any]) -> set[str]:
    """The files and folders of a model folder its ``patchknn.json`` refers to (tensor files; an
    ensemble's member folders)."""
    names = {str(e["file"]) for e in doc.get("files", {}).values() if isinstance(e, dict) and "file" in e}
    names |= {str(m) for m in doc.get("members", []) if isinstance(m, str)}
    bad = [n for n in names if Path(n).name != n or n in (".", "..", META_FILE, VERSIONS_DIR)]
    if bad:
        raise ModelFileError(f"model entries must be plain names, got {bad}")
    return names


def _promote(root: Path, version: Path) -> None:
    """Make ``root`` hold the model of the folder ``version``: link its entries in, replace
    ``root/patchknn.json`` (the switch), then remove the entries only the previous model used."""
    raw = (version / META_FILE).read_bytes()
    new = _entries(json.loads(raw))
    old: set[str] = set()
    with suppress(OSError, ValueError, ModelFileError, KeyError, TypeError, AttributeError):
        old = _entries(json.loads((root / META_FILE).read_bytes()))
    for name in sorted(new):
        if not (root / name).exists():  # tensor files are named by content, member folders uniquely
            _link(version / name, root / name)
    atomic_write(root / META_FILE, raw)
    for name in old - new:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with suppress(OSError):
                target.unlink()


def _link(src: Path, dst: Path) -> None:
    """``dst`` = ``src`` (a file or a folder tree), by hard links where the file system allows,
    appearing at once (built under a temporary name, then renamed)."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
    try:
        if src.is_dir():
            shutil.copytree(src, tmp, copy_function=_link_file)
        else:
            _link_file(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with suppress(OSError):
                tmp.unlink()
        raise


def _share_files(new: Path, old: Path) -> None:
    """Tensor files of the folder ``new`` that the folder ``old`` has too (same content-addressed
    name and size: the backbone's weights, a bank that did not change) become hard links to
    ``old``'s, so a version costs only what changed. Files are never changed in place (every
    writer replaces them), so sharing them is safe."""
    have: dict[str, Path] = {f.name: f for f in old.rglob("*.safetensors")}
    for f in new.rglob("*.safetensors"):
        twin = have.get(f.name)
        if twin is None or twin.stat().st_size != f.stat().st_size or twin.stat().st_ino == f.stat().st_ino:
            continue
        tmp = f.with_name(f".{f.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.link(twin, tmp)
        except OSError:
            continue  # no hard links here: keep the copy
        os.replace(tmp, f)


def _link_file(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (another device, some network file systems): copy
        shutil.copy2(src, dst)


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False).encode()


def _log(root: Path, event: dict[str, Any]) -> None:
    events = history(root)
    events.append(event)
    atomic_write(_versions_dir(root) / HISTORY_FILE, json.dumps(events, indent=1).encode())


def _info(path: Path, *, current: bool = False) -> VersionInfo:
    doc = read_meta(path)
    info = doc.get("fit_info") or {}
    v = info.get("version") or {}
    thr = doc.get("threshold")
    return VersionInfo(
        number=int(v.get("number", int(path.name) if path.name.isdigit() else 1)),
        created=str(v.get("created", "")),
        author=None if v.get("author") is None else str(v["author"]),
        note=str(v.get("note", "")),
        added=[str(a) for a in v.get("added", [])],
        n_added=int(v.get("n_added", 0)),
        threshold=None if thr is None else float(thr),
        bank_rows=int(info.get("bank_size", 0)),
        parent=None if v.get("parent") is None else int(v["parent"]),
        path=path,
        current=current,
    )


def _plain_info(root: Path) -> VersionInfo:
    """A never-versioned model folder as version 1."""
    if not (root / META_FILE).is_file():
        raise VersionError(f"{root}: not a model folder (no {META_FILE} and no {VERSIONS_DIR}/)")
    info = _info(root, current=True)
    stamp = datetime.fromtimestamp((root / META_FILE).stat().st_mtime, UTC).isoformat(timespec="seconds")
    return VersionInfo(**{**asdict(info), "number": 1, "created": info.created or stamp, "current": True})


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive lock on ``root/.versions.lock`` (POSIX ``flock``; threads of this process also
    take turns); cleans up temporary folders of writers that were killed."""
    with _THREAD_LOCK:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: the thread lock only
            fcntl = None  # type: ignore[assignment]
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            _versions_dir(root).mkdir(exist_ok=True)
            for leftover in _versions_dir(root).glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)
            yield
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
