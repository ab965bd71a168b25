"""`redis://HOST:PORT/DB` and `rediss://`: shared by many stateless replicas."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.store.base import StoreError, redact_url


class RedisStore:
    def __init__(self, url: str, prefix: str = "gw:") -> None:
        self.url = redact_url(url)
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
