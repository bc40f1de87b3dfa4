"""Server options, model specs (``NAME=PATH``), and the models as loaded once at start-up.

Pure Python (no FastAPI), so the command line can check everything before importing the web stack.

Example:
    >>> parse_model_spec("bottle=models/bottle-v3")
    ('bottle', PosixPath('models/bottle-v3'))
    >>> parse_model_spec("models/screw")
    ('screw', PosixPath('models/screw'))
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchknn.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "ServedModel",
    "ServerSettings",
    "load_models",
    "model_version",
    "parse_model_spec",
    "parse_watch_folder",
]

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Largest accepted request body (20 MiB): a 12-megapixel PNG with headroom."""

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest accepted ``height * width`` (40 megapixels), checked from the header before decoding."""

DEFAULT_MEMORY_BUDGET_BYTES = 1024 * 1024 * 1024
"""Decoding memory for all requests together (1 GiB): any image within the default ``max_pixels`` fits."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ServerSettings:
    """Everything that shapes the server's behaviour (the ``patchknn serve`` options).

    Attributes:
        host, port: where to listen (the command line refuses a non-loopback host without keys).
        api_keys: accepted API keys; empty = no authentication (loopback only).
        admin_keys: the keys that also have the ``admin`` role (corrections); accepted even when not
            repeated in ``api_keys``. Without any key every client is an admin (loopback only).
        watch_folders: camera folders the page may list and score, ``(name, directory)`` pairs set by
            whoever starts the server (``--watch-folder NAME=DIR``); a browser names a folder, never a path.
        max_upload_bytes: largest request body; checked from ``Content-Length`` and while streaming.
        max_pixels: largest image ``height * width`` (decompression-bomb guard), answered with 413.
        request_timeout_s: deadline for one request from arrival to answer (504; 408 when the body
            itself did not arrive in time).
        max_concurrency: requests being processed at once (reading, decoding, waiting for or in a
            batch). Should be at least ``max_batch`` so batches can fill.
        max_queue: requests waiting for a processing slot; one more is refused with 503 + Retry-After.
        max_batch: images per backbone call. 8, not ``predict``'s 16: with 16 clients, batches of 8
            alternate, so one batch's images are read and decoded while the other runs (measured in
            docs/speed.md: 16 gave 1-2 batches of 11-14 on small JPEGs and 10 % fewer images/s).
        max_delay_ms: how long the batcher waits for more requests after the first one arrives.
        decode_threads: threads decoding/resizing uploads and encoding maps.
        public_docs: serve ``/docs``, ``/redoc`` and ``/openapi.json`` without a key.
        retry_after_s: the ``Retry-After`` value sent with 503.
        memory_budget_bytes: decoding memory of all requests together, counted from each image's
            header before decoding (:func:`patchknn.server.memory.decode_cost`); a request that does
            not fit waits, one that could never fit gets 413.
        header_timeout_s: a connection must deliver its request line and headers within this many
            seconds (408 and closed otherwise).
        max_pending_connections: connections waiting for their request headers at once; one more
            gets 503 and is closed.
        max_header_bytes: largest request line + headers (431).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    watch_folders: tuple[tuple[str, Path], ...] = ()
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    request_timeout_s: float = 10.0
    max_concurrency: int = 32
    max_queue: int = 64
    max_batch: int = 8
    max_delay_ms: float = 5.0
    decode_threads: int = 2
    public_docs: bool = False
    retry_after_s: int = 1
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    header_timeout_s: float = 10.0
    max_pending_connections: int = 100
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "admin_keys", tuple(self.admin_keys))
        object.__setattr__(self, "api_keys", tuple(dict.fromkeys((*self.api_keys, *self.admin_keys))))
        object.__setattr__(self, "watch_folders", tuple((str(n), Path(d)) for n, d in self.watch_folders))
        for name, _ in self.watch_folders:
            if not _NAME.match(name):
                raise ConfigError(f"watch folder name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - (starting with a "
                                  "letter or digit)")
        _int("port", self.port, 0, 65535)
        _int("max_upload_bytes", self.max_upload_bytes, 1, 1 << 40)
        _int("max_pixels", self.max_pixels, 1, 1 << 40)
        _int("max_concurrency", self.max_concurrency, 1, 100_000)
        _int("max_queue", self.max_queue, 0, 1_000_000)
        _int("max_batch", self.max_batch, 1, 4096)
        _int("decode_threads", self.decode_threads, 1, 1024)
        _int("retry_after_s", self.retry_after_s, 0, 3600)
        _int("memory_budget_bytes", self.memory_budget_bytes, 16 << 20, 1 << 44)
        _int("max_pending_connections", self.max_pending_connections, 1, 1_000_000)
        _int("max_header_bytes", self.max_header_bytes, 1024, 1 << 24)
        for name in ("request_timeout_s", "max_delay_ms", "header_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        if self.header_timeout_s <= 0:
            raise ConfigError(f"header_timeout_s must be > 0, got {self.header_timeout_s!r}")
        if self.max_delay_ms < 0:
            raise ConfigError(f"max_delay_ms must be >= 0, got {self.max_delay_ms!r}")

    def public(self) -> dict[str, Any]:
        """The limits a client may see (no keys)."""
        return {
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "request_timeout_s": self.request_timeout_s,
            "max_batch": self.max_batch,
            "max_delay_ms": self.max_delay_ms,
            "memory_budget_bytes": self.memory_budget_bytes,
            "header_timeout_s": self.header_timeout_s,
            "max_header_bytes": self.max_header_bytes,
            "auth": "bearer" if self.api_keys else "none",
            "watch_folders": [name for name, _ in self.watch_folders],
        }


def _int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """``"NAME=PATH"`` or ``"PATH"`` (name = the directory's name) -> ``(name, path)``.

    A spec that is itself an existing path is a path, even if it contains ``=``.

    Raises:
        ConfigError: empty spec, or a name that is not 1-64 of ``A-Z a-z 0-9 . _ -`` (starting
            with a letter or digit).
    """
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("empty model spec; give PATH or NAME=PATH")
    name, sep, rest = spec.partition("=")
    if sep and not Path(spec).exists():
        path = Path(rest)
        if not rest:
            raise ConfigError(f"model spec {spec!r}: no path after '='")
    else:
        path = Path(spec)
        name = path.name or path.resolve().name
    if not _NAME.match(name):
        raise ConfigError(
            f"model name {name!r} is not usable in a URL: use 1-64 of A-Z a-z 0-9 . _ - (starting with a "
            "letter or digit), e.g. NAME=PATH"
        )
    return name, path


def parse_watch_folder(spec: str) -> tuple[str, Path]:
    """``"NAME=DIR"`` -> ``(name, directory)`` for ``--watch-folder``; the directory must exist.

    Raises:
        ConfigError: no ``=``, a bad name, or ``DIR`` is not a directory.
    """
    name, sep, rest = str(spec).strip().partition("=")
    if not sep or not rest:
        raise ConfigError(f"--watch-folder {spec!r}: give NAME=DIR")
    if not _NAME.match(name):
        raise ConfigError(f"--watch-folder {spec!r}: the name must be 1-64 of A-Z a-z 0-9 . _ - (a letter or digit "
                          "first)")
    path = Path(rest).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"--watch-folder {spec!r}: {path} is not a directory")
    return name, path


def model_version(path: str | Path) -> str:
    """A content fingerprint of a saved model: the first 12 hex digits of SHA-256 of ``patchknn.json``.

    ``patchknn.json`` holds the configuration, the threshold and the SHA-256 of every tensor file, so
    any change to the model changes the version.
    """
    from patchknn.serialization import META_FILE

    return hashlib.sha256((Path(path) / META_FILE).read_bytes()).hexdigest()[:12]


@dataclass
class ServedModel:
    """A model loaded for serving.

    Attributes:
        name: the name in URLs.
        model: the fitted :class:`~patchknn.model.PatchKNN` (or an object with the same
            ``config`` / ``threshold_`` / ``predict_batch``, e.g. an exported model).
        version: content fingerprint (see :func:`model_version`), or any string.
        saved_by: the patchknn version that saved it.
        number: the version number in its model folder (:mod:`patchknn.versions`; a plain folder is
            version 1), ``None`` when unknown (an exported model, or a model saved over a versioned folder).
        root: the model folder it was loaded from (where corrections write a new version), ``None`` for
            an exported model (which cannot learn).
    """

    name: str
    model: Any
    version: str
    saved_by: str = "unknown"
    number: int | None = None
    root: Path | None = field(default=None, repr=False)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def threshold(self) -> float | None:
        thr = getattr(self.model, "threshold_", None)
        return None if thr is None else float(thr)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` shows (no file paths)."""
        info = dict(getattr(self.model, "fit_info_", {}) or {})
        return {
            "name": self.name,
            "version": self.version,
            "version_number": self.number,
            "correctable": self.root is not None,
            "saved_by": self.saved_by,
            "backbone": self.model.config.backbone,
            "image_size": self.image_size,
            "threshold": self.threshold,
            "config": self.model.config.to_dict(),
            "fit_info": _compact(info),
        }


def _compact(info: dict[str, Any]) -> dict[str, Any]:
    """``fit_info`` without provenance paths and long per-image lists."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if key == "weights_id":
            continue
        if isinstance(value, dict):
            value = _compact(value)
        elif isinstance(value, list | tuple) and len(value) > 8:
            continue
        out[key] = value
    return out


def load_models(specs: Sequence[str], *, device: str = "cpu", warmup: bool = True) -> dict[str, ServedModel]:
    """Load every model once (verifying checksums); names must be distinct.

    Args:
        specs: ``"PATH"`` or ``"NAME=PATH"`` strings.
        device: where the backbones run.
        warmup: run one blank image through each model, so the first request is not slow.

    Raises:
        ConfigError: no spec, a bad or duplicate name.
        ModelFileError: a model cannot be loaded (from :meth:`PatchKNN.load`).
    """
    from patchknn.model import PatchKNN
    from patchknn.runtime import is_exported
    from patchknn.runtime import load as load_exported
    from patchknn.serialization import read_meta

    if not specs:
        raise ConfigError("give at least one model: patchknn serve MODEL [MODEL ...]")
    parsed = [parse_model_spec(s) for s in specs]
    names = [n for n, _ in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"model name(s) used twice: {', '.join(dupes)}; give distinct names with NAME=PATH")
    served: dict[str, ServedModel] = {}
    for name, path in parsed:
        # a `patchknn export` folder runs on onnxruntime/OpenVINO (patchknn.runtime)
        exported = is_exported(path)
        model = load_exported(path) if exported else PatchKNN.load(path, device=device, progress=False)
        doc = read_meta(path)
        number = None if exported else _version_number(path)
        served[name] = ServedModel(
            name,
            model,
            model_version(path),
            str(doc.get("patchknn_version", "unknown")),
            number=number,
            root=None if exported else Path(path),
        )
        if warmup:
            warm_up(model)
    return served


def _version_number(path: Path) -> int | None:
    """The current version number of a model folder (a plain folder is version 1; ``None`` for a
    model saved over a versioned folder, which becomes a version on the next save)."""
    from patchknn.versions import VersionError, current_version

    try:
        return int(current_version(path).number)
    except VersionError:
        return None


def warm_up(model: Any) -> None:
    """One blank image through the model (allocations, lazy initialisation)."""
    import torch

    size = int(model.config.image_size)
    model.predict_batch(torch.zeros((1, 3, size, size), dtype=torch.uint8))
