"""`redis://HOST:PORT/DB` and `rediss://`: shared by many stateless replicas."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.store.base import StoreError


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore:
    def __init__(self, url: str, prefix: str = "gw:") -> None:
        self.url = _without_password(url)
        self._prefix = prefix
        self._client = aioredis.Redis.from_url(url)

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise StoreError(f"Redis store {self.url}: {exc}") from None

    async def get(self, key: str) -> bytes | None:
        value = await self._client.get(self._prefix + key)
        return None if value is None else value.encode() if isinstance(value, str) else value

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        await self._client.set(self._prefix + key, value, px=None if ttl_s is None else int(ttl_s * 1000))

    async def delete(self, key: str) -> None:
        await self._client.delete(self._prefix + key)

    async def aclose(self) -> None:
        await self._client.aclose()
