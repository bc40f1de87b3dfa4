"""API keys: where they come from, how a presented key is checked, and the loopback rule.

* Keys come from ``--api-key-file FILE`` (one key a line; blank lines and lines starting with ``#``
  are ignored) and/or the environment variables ``PATCHKNN_API_KEYS`` and ``PATCHKNN_ADMIN_KEYS``
  (comma-separated); all may be used, the union is accepted.
* Each key has roles (:data:`ROLES`): ``predict`` (score images, read models, results, the page)
  and ``admin`` (also corrections that write a new model version; implies ``predict``). A line of
  the key file is ``KEY`` or ``KEY ROLE[,ROLE]`` (``KEY admin``); a key without roles (every key of
  a file written before roles existed, and those of ``PATCHKNN_API_KEYS``) has ``predict`` only,
  so no existing key gains the right to change a model. ``PATCHKNN_ADMIN_KEYS`` holds admin keys.
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
    >>> sorted(KeyChecker(["k" * 32], admin_keys=["a" * 32]).roles("a" * 32))
    ['admin', 'predict']
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
from dataclasses import dataclass, field
from pathlib import Path

from patchknn.errors import ConfigError

__all__ = [
    "ADMIN",
    "ADMIN_ENV_VAR",
    "ENV_VAR",
    "PREDICT",
    "ROLES",
    "KeySet",
    "load_keys",
    "MIN_KEY_LENGTH",
    "KeyChecker",
    "bearer_token",
    "check_bind",
    "is_loopback",
    "load_api_keys",
]

log = logging.getLogger("patchknn.server")

ENV_VAR = "PATCHKNN_API_KEYS"
ADMIN_ENV_VAR = "PATCHKNN_ADMIN_KEYS"
MIN_KEY_LENGTH = 16
PREDICT = "predict"
ADMIN = "admin"
ROLES = (PREDICT, ADMIN)
"""The roles a key can have: ``predict`` (use the models) and ``admin`` (also change them)."""


def _check_key(key: str, where: str) -> str:
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"API key {where} is shorter than {MIN_KEY_LENGTH} characters; use a long random key")
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise ConfigError(f"API key {where} contains spaces or control characters")
    if not key.isascii():
        raise ConfigError(f"API key {where} contains non-ASCII characters (HTTP headers are ASCII)")
    return key


@dataclass(frozen=True)
class KeySet:
    """The configured keys: every accepted key, and those with the ``admin`` role (a subset)."""

    keys: tuple[str, ...] = field(default=(), repr=False)
    admin: tuple[str, ...] = field(default=(), repr=False)


def _parse_roles(text: str, where: str) -> set[str]:
    roles = {r.strip().lower() for r in text.split(",") if r.strip()}
    unknown = sorted(roles - set(ROLES))
    if unknown or not roles:
        raise ConfigError(f"API key {where}: unknown role {', '.join(unknown) or text!r}; use {' or '.join(ROLES)}")
    return roles


def load_keys(key_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> KeySet:
    """The configured API keys and their roles: from ``key_file``, ``PATCHKNN_API_KEYS`` (role
    ``predict``) and ``PATCHKNN_ADMIN_KEYS`` (role ``admin``) of ``env``.

    Args:
        key_file: a file with one key a line, ``KEY`` or ``KEY ROLE[,ROLE]`` (``#`` comments, also
            after the key, and blank lines ignored), or ``None``.
        env: the environment to read the variables from (default :data:`os.environ`).

    Returns:
        The distinct keys in the order found, and the admin ones; empty when none is configured.

    Raises:
        ConfigError: the file cannot be read or holds no key, a key is malformed / too short, or a
            role is unknown.
    """
    env = os.environ if env is None else env
    keys: list[str] = []
    admin: list[str] = []
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
            where = f"on line {n} of {path}"
            item = item.split(" #", 1)[0].split("\t#", 1)[0].strip()  # a comment after the key
            key, _, roles = item.partition(" ")
            if roles.strip() and ADMIN in _parse_roles(roles, where):
                admin.append(_check_key(key, where))
            keys.append(_check_key(key, where))
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
    for var, target in ((ENV_VAR, None), (ADMIN_ENV_VAR, admin)):
        raw = env.get(var, "")
        for n, item in enumerate(raw.split(","), start=1):
            item = item.strip()
            if item:
                keys.append(_check_key(item, f"number {n} in ${var}"))
                if target is not None:
                    target.append(item)
    return KeySet(tuple(dict.fromkeys(keys)), tuple(dict.fromkeys(admin)))


def load_api_keys(key_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """Every configured API key, whatever its roles (see :func:`load_keys`), in the order found."""
    return list(load_keys(key_file, env).keys)


def _digest(key: str | bytes) -> bytes:
    data = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    return hashlib.sha256(data).digest()


class KeyChecker:
    """Checks presented keys against the configured ones in constant time; keeps digests only.

    ``admin_keys`` (also accepted when not in ``keys``) have the ``admin`` role besides ``predict``.
    """

    def __init__(self, keys: Iterable[str] = (), admin_keys: Iterable[str] = ()) -> None:
        admin = {_digest(k) for k in admin_keys}
        digests = list(dict.fromkeys([_digest(k) for k in keys] + list(admin)))
        self._digests = digests
        self._admin = [d in admin for d in digests]

    @property
    def enabled(self) -> bool:
        """Whether keys are configured (and so required)."""
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:  # never show the keys, not even their digests
        return f"KeyChecker({len(self._digests)} keys)"

    def roles(self, presented: str | bytes | None) -> frozenset[str]:
        """The roles of ``presented`` (empty: not a key); every key is compared, always."""
        if presented is None or not self._digests:
            return frozenset()
        probe = _digest(presented)
        ok = admin = False
        for digest, is_admin in zip(self._digests, self._admin, strict=True):
            match = hmac.compare_digest(probe, digest)
            ok |= match
            admin |= match & is_admin
        if not ok:
            return frozenset()
        return frozenset(ROLES) if admin else frozenset({PREDICT})

    def check(self, presented: str | bytes | None) -> bool:
        """``True`` when ``presented`` equals one of the keys; every key is compared, always."""
        return bool(self.roles(presented))


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
