"""Virtual API keys: their format, their hash, and the record the store keeps for each.

A key is `sk-gw-<id>-<secret>`: the 16-hex-digit id finds the record in one store read, and the
hash of the whole key, compared in constant time, decides. Only the hash is ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

KEY_PREFIX = "sk-gw-"
_KEY = re.compile(r"sk-gw-([0-9a-f]{16})-[A-Za-z0-9_-]{43,}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh (key id, plaintext key): 32 random bytes of secret."""
    key_id = secrets.token_hex(8)
    return key_id, f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The id inside a key of this gateway's format, or None for any other string."""
    match = _KEY.fullmatch(key)
    return match.group(1) if match else None


def now_utc() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 timestamp; one without a zone is refused rather than guessed."""
    if text is None:
        return None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("the timestamp has no time zone; add Z or an offset such as +00:00")
    return moment


@dataclass(slots=True)
class KeyRecord:
    id: str
    tenant: str
    name: str
    sha256: str
    created_at: str
    expires_at: str | None = None
    revoked_at: str | None = None
    models: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] | None = None
    rate_limit: dict[str, Any] | None = None

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(self.sha256, hash_key(key))

    def expired(self, at: datetime) -> bool:
        expires = parse_time(self.expires_at)
        return expires is not None and expires <= at

    def dumps(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: bytes) -> KeyRecord:
        return cls(**orjson.loads(raw))

    def public(self, last_used_at: str | None = None) -> dict[str, Any]:
        """What the admin API shows: never the key, never its hash."""
        shown = asdict(self)
        del shown["sha256"]
        return {"object": "api_key", **shown, "prefix": f"{KEY_PREFIX}{self.id}", "last_used_at": last_used_at}
