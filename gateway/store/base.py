"""The one interface every piece of shared state goes through."""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class StoreError(Exception):
    """The store cannot be reached or used; the message names the backend, never a password."""


class Store(Protocol):
    url: str  # safe to show: credentials removed

    async def ping(self) -> None:
        """Raise StoreError unless the store answers."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def aclose(self) -> None: ...
