"""API keys: where they come from, how a presented key is checked, and the loopback rule.

* Keys come from ``--api-key-file FILE`` (one key a line; blank lines and lines starting with ``#``
  are ignored) and/or the environment variable ``PATCHKNN_API_KEYS`` (comma-separated); both may be
  used, the union is accepted.
* A key must be at least :data:`MIN_KEY_LENGTH` printable characters without spaces.
* Only SHA-256 digests of the keys are kept. A presented key is hashed and compared with
  :func:`hmac.compare_digest` against *every* configured digest (no early exit), so neither the
  position of a match nor the length of a key shows in the timing.
* Keys are never logged, echoed or put into an error message (messages give line numbers).
* A server that listens on anything but a loopback address must have keys (:func:`check_bind`).

Example:
    >>> checker = KeyChecker(["k" * 32])
    >>> checker.check("k" * 32), checker.check("wrong"), checker.check(None)
    (True, False, False)
    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, False)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from patchknn.errors import ConfigError

__all__ = [
    "ENV_VAR",
    "MIN_KEY_LENGTH",
    "KeyChecker",
    "bearer_token",
    "check_bind",
    "is_loopback",
    "load_api_keys",
]

log = logging.getLogger("patchknn.server")

ENV_VAR = "PATCHKNN_API_KEYS"
MIN_KEY_LENGTH = 16


def _check_key(key: str, where: str) -> str:
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"API key {where} is shorter than {MIN_KEY_LENGTH} characters; use a long random key")
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise ConfigError(f"API key {where} contains spaces or control characters")
    if not key.isascii():
        raise ConfigError(f"API key {where} contains non-ASCII characters (HTTP headers are ASCII)")
    return key


def load_api_keys(key_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """The configured API keys: from ``key_file`` and the ``PATCHKNN_API_KEYS`` variable of ``env``.

    Args:
        key_file: a file with one key a line (``#`` comments and blank lines ignored), or ``None``.
        env: the environment to read ``PATCHKNN_API_KEYS`` from (default :data:`os.environ`).

    Returns:
        The distinct keys, in the order found; empty when none is configured.

    Raises:
        ConfigError: the file cannot be read or holds no key, or a key is malformed / too short.
    """
    env = os.environ if env is None else env
    keys: list[str] = []
    if key_file is not None:
        path = Path(key_file)
        try:
            text = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise ConfigError(f"--api-key-file {path}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--api-key-file {path}: cannot read it ({exc})") from None
        found = 0
        for n, line in enumerate(text.splitlines(), start=1):
            item = line.strip()
            if not item or item.startswith("#"):
                continue
            keys.append(_check_key(item, f"on line {n} of {path}"))
            found += 1
        if found == 0:
            raise ConfigError(f"--api-key-file {path}: no key in the file (one key a line)")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "API key file %s can be read or written by other users (mode %o); run: chmod 600 %s",
                path,
                stat.S_IMODE(mode),
                path,
            )
    raw = env.get(ENV_VAR, "")
    if raw.strip():
        for n, item in enumerate(raw.split(","), start=1):
            item = item.strip()
            if item:
                keys.append(_check_key(item, f"number {n} in ${ENV_VAR}"))
    return list(dict.fromkeys(keys))


def _digest(key: str | bytes) -> bytes:
    data = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    return hashlib.sha256(data).digest()


class KeyChecker:
    """Checks presented keys against the configured ones in constant time; keeps digests only."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        """Whether keys are configured (and so required)."""
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:  # never show the keys, not even their digests
        return f"KeyChecker({len(self._digests)} keys)"

    def check(self, presented: str | bytes | None) -> bool:
        """``True`` when ``presented`` equals one of the keys; every key is compared, always."""
        if presented is None or not self._digests:
            return False
        probe = _digest(presented)
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(probe, digest)
        return ok


def bearer_token(authorization: str | bytes | None) -> str | bytes | None:
    """The credentials of an ``Authorization: Bearer <token>`` header, or ``None``."""
    if not authorization:
        return None
    if isinstance(authorization, bytes):
        scheme_b, _, token_b = authorization.strip().partition(b" ")
        if scheme_b.lower() != b"bearer":
            return None
        return token_b.strip() or None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, checker: KeyChecker) -> None:
    """Refuse to listen on a non-loopback address without API keys.

    Raises:
        ConfigError: ``host`` is not loopback and no key is configured.
    """
    if checker.enabled or is_loopback(host):
        return
    raise ConfigError(
        f"refusing to listen on {host!r} without API keys: anyone who can reach this address could use "
        f"the server. Configure keys with --api-key-file FILE or ${ENV_VAR} (comma-separated), or "
        "listen on 127.0.0.1 only"
    )
