"""`redis://HOST:PORT/DB` and `rediss://`: shared by many stateless replicas.

Every key and channel gets `prefix` ("gw:"), so the gateway can share a Redis with other programs.
`add` is SET NX PX, and `incr` one Lua script (SET NX PX to create the counter with its TTL, then
INCRBY), so both are atomic and the TTL comes only from the increment that creates the counter.
`scan` walks the whole keyspace with SCAN MATCH: it is meant for listings at admin scale, not for
the request path. Each subscription holds a Redis connection of its own and a task reading it.
Every Redis failure surfaces as StoreError naming the URL without its password.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from gateway.store.base import StoreError, check_ttl, redact_url

_INCR = """
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], '0', 'NX', 'PX', ARGV[2]) end
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""
_GLOB = re.compile(r"([\\*?\[\]])")
_MGET_BATCH = 500


def glob_escape(text: str) -> str:
    """`text` as a literal in a Redis MATCH pattern."""
    return _GLOB.sub(r"\\\1", text)


def _ms(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


class RedisStore:
    def __init__(self, url: str, prefix: str = "gw:") -> None:
        self.url = redact_url(url)
        self._password = urlsplit(url).password
        self._prefix = prefix
        with self._errors():
            self._client = aioredis.Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=5.0)
        self._incr = self._client.register_script(_INCR)
        self._subscriptions: set[RedisSubscription] = set()

    def error(self, exc: BaseException) -> StoreError:
        message = str(exc).replace(self._password, "***") if self._password else str(exc)
        return StoreError(f"Redis store {self.url}: {message}")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError, ValueError) as exc:
            raise self.error(exc) from None

    async def ping(self) -> None:
        with self._errors():
            await self._client.ping()

    async def get(self, key: str) -> bytes | None:
        with self._errors():
            value = await self._client.get(self._prefix + key)
        return cast(bytes | None, value)

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        check_ttl(ttl_s)
        with self._errors():
            await self._client.set(self._prefix + key, value, px=None if ttl_s is None else _ms(ttl_s))

    async def add(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        check_ttl(ttl_s)
        with self._errors():
            created = await self._client.set(
                self._prefix + key, value, nx=True, px=None if ttl_s is None else _ms(ttl_s)
            )
        return bool(created)

    async def delete(self, key: str) -> bool:
        with self._errors():
            removed: int = await self._client.delete(self._prefix + key)
        return removed > 0

    async def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        pattern = glob_escape(self._prefix + prefix) + "*"
        with self._errors():
            keys: list[bytes] = list({key async for key in self._client.scan_iter(match=pattern, count=1000)})
            values: list[bytes | None] = []
            for start in range(0, len(keys), _MGET_BATCH):
                values += cast(list[bytes | None], await self._client.mget(keys[start : start + _MGET_BATCH]))
        skip = len(self._prefix.encode())
        return sorted(
            (key[skip:].decode(), value) for key, value in zip(keys, values, strict=True) if value is not None
        )

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        check_ttl(ttl_s)
        with self._errors():
            if ttl_s is None:
                total: Any = await self._client.incrby(self._prefix + key, amount)
            else:
                total = await self._incr(keys=[self._prefix + key], args=[amount, _ms(ttl_s)])
        return int(total)

    async def publish(self, channel: str, message: bytes) -> None:
        with self._errors():
            await self._client.publish(self._prefix + channel, message)

    def subscribe(self, channel: str) -> RedisSubscription:
        return RedisSubscription(self, self._client, self._prefix + channel)

    async def aclose(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        with self._errors():
            await self._client.aclose()


class RedisSubscription:
    """Live once Redis has confirmed the SUBSCRIBE: on `async with` or at the first `__anext__`."""

    def __init__(self, store: RedisStore, client: aioredis.Redis, channel: str) -> None:
        self._store = store
        self._client = client
        self._channel = channel
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[bytes | StoreError | None] = asyncio.Queue()
        self._closed = False

    async def _start(self) -> None:
        if self._pubsub is not None or self._closed:
            return
        self._pubsub = pubsub = self._client.pubsub()
        self._store._subscriptions.add(self)
        try:
            await pubsub.subscribe(self._channel)
            async with asyncio.timeout(10.0):  # the confirmation: from here on, publications reach us
                while (confirmation := await pubsub.get_message(timeout=1.0)) is None or confirmation[
                    "type"
                ] != "subscribe":
                    pass
        except (RedisError, OSError, TimeoutError) as exc:
            await self.aclose()
            raise self._store.error(exc) from None
        self._reader = asyncio.create_task(self._read(pubsub), name=f"redis-subscription:{self._channel}")

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while True:  # a finite timeout behaves the same in every redis-py version
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message["type"] == "message":
                    self._queue.put_nowait(message["data"])
        except (RedisError, OSError) as exc:  # redis-py has already retried and reconnected
            self._queue.put_nowait(self._store.error(exc))
            self._queue.put_nowait(None)

    def __aiter__(self) -> RedisSubscription:
        return self

    async def __anext__(self) -> bytes:
        await self._start()
        item = None if self._closed else await self._queue.get()
        if isinstance(item, StoreError):
            raise item
        if item is None:
            raise StopAsyncIteration
        return item

    async def __aenter__(self) -> RedisSubscription:
        await self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._store._subscriptions.discard(self)
        self._queue.put_nowait(None)  # wakes a reader waiting in __anext__
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await cast(Any, self._pubsub).aclose()  # untyped in redis-py
