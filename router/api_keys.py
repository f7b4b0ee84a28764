"""API keys: who may call the router, and each caller's limits.

Keys are never stored, only their SHA-256: a keys file (TOML, one table per
key) or ``BATON_API_KEYS`` ("name:sha256,...") holds digests that
``baton api-key NAME`` prints beside a new key, so a leaked config leaks no
key. A request presents its key as ``Authorization: Bearer KEY`` (what the
openai SDK sends) or on gRPC as the same metadata.

    [keys.alice]
    sha256 = "9f86d08..."
    requests_per_minute = 60     # optional, else the router's defaults
    tokens_per_minute = 100000
    concurrent_streams = 4
"""

from __future__ import annotations

import hashlib
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "bk-"
_LIMITS = ("requests_per_minute", "tokens_per_minute", "concurrent_streams")


@dataclass(frozen=True)
class KeyLimits:
    """0 means no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    concurrent_streams: int = 0


@dataclass(frozen=True)
class ApiKey:
    name: str  # what metrics and logs call the key: never the key itself
    sha256: str
    limits: KeyLimits


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its digest."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, digest(key)


def _check_digest(where: str, value: object) -> str:
    text = str(value).strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"{where}: sha256 must be 64 hex digits (the digest `baton api-key` prints), "
                         "not a key")
    return text


class KeyRing:
    def __init__(self, keys: list[ApiKey]):
        self._by_digest: dict[str, ApiKey] = {}
        for key in keys:
            if key.sha256 in self._by_digest:
                raise ValueError(f"api key {key.name!r}: the same key as {self._by_digest[key.sha256].name!r}")
            self._by_digest[key.sha256] = key

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, presented: str) -> ApiKey | None:
        # A dict lookup on the digest: equal timing whatever the key's bytes.
        return self._by_digest.get(digest(presented)) if presented else None

    @classmethod
    def load(cls, path: str, listed: str, defaults: KeyLimits) -> KeyRing:
        """From ``path`` (a TOML keys file, may be empty) and ``listed``
        ("name:sha256,..."); errors name the file, key and field."""
        keys: list[ApiKey] = []
        if path:
            try:
                data = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ValueError(f"api_keys_file {path}: {exc}") from exc
            unknown = set(data) - {"keys"}
            if unknown:
                raise ValueError(f"api_keys_file {path}: unknown tables {sorted(unknown)}; keys go under [keys.NAME]")
            for name, entry in data.get("keys", {}).items():
                where = f"api_keys_file {path}: keys.{name}"
                if not isinstance(entry, dict) or "sha256" not in entry:
                    raise ValueError(f"{where}: needs sha256 = \"<digest>\"")
                extra = set(entry) - {"sha256", *_LIMITS}
                if extra:
                    raise ValueError(f"{where}: unknown fields {sorted(extra)}; known: sha256, {', '.join(_LIMITS)}")
                limits = {}
                for field in _LIMITS:
                    value = entry.get(field, getattr(defaults, field))
                    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                        raise ValueError(f"{where}.{field}: must be a whole number >= 0, not {value!r}")
                    limits[field] = value
                keys.append(ApiKey(name, _check_digest(where, entry["sha256"]), KeyLimits(**limits)))
        for item in filter(None, (part.strip() for part in listed.split(","))):
            name, sep, value = item.partition(":")
            if not sep or not name:
                raise ValueError(f"api_keys: {item!r} is not NAME:SHA256")
            keys.append(ApiKey(name.strip(), _check_digest(f"api_keys: {name}", value), defaults))
        if not keys:
            # An empty file (an empty Secret, a typo) must not leave the API open.
            raise ValueError(f"api_keys_file {path!r} / api_keys: configured but no key in them; "
                             "add one with `baton api-key NAME --append-to FILE`, or unset both to serve without keys")
        try:
            return cls(keys)
        except ValueError as exc:
            raise ValueError(f"api_keys_file {path} / api_keys: {exc}") from None


def bearer(authorization: str) -> str:
    """The key in an ``Authorization`` header value ("" if none)."""
    scheme, _, credentials = authorization.strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""
