"""`redis://HOST:PORT/DB` and `rediss://`: shared by many stateless replicas.

Every key and channel gets `prefix` ("gw:"), so the gateway can share a Redis with other programs.
`add` is SET NX PX, and `incr` one Lua script (SET NX PX to create the counter with its TTL, then
INCRBY), so both are atomic and the TTL comes only from the increment that creates the counter.
`add_counts` is one Lua script too (the writer's last seq, then HINCRBY for every field), so a batch
is applied whole and at most once; `read_counts` pipelines one HGETALL per hash in one round trip.
`admit` and `settle` are coalesced (gateway/store/coalesce.py): the calls issued in one event-loop
iteration go to Redis as one EVALSHA of one script that runs them in order (gateway/store/limits_redis.py;
a NOSCRIPT reply loads the script and sends it again). A call that fails in the script gets its own
StoreError; a lost connection fails the whole batch. `aclose` sends what is queued and waits for the
batches in flight before it closes the connections.
`scan` walks the whole keyspace with SCAN MATCH: it is meant for listings at admin scale, not for
the request path. Each subscription holds a Redis connection of its own and a task reading it.
Every Redis failure surfaces as StoreError naming the URL without its password.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import NoScriptError, RedisError

from gateway.store.base import WRITER_TTL_S, CountBatch, StoreError, check_ttl, redact_url
from gateway.store.coalesce import Batch, CoalescedLimits, Coalescer, fail
from gateway.store.limits import Admission, LimitCall, Settlement
from gateway.store.limits_redis import BATCH_SCRIPT, ScriptFailed, batch_call, outcome

_INCR = """
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], '0', 'NX', 'PX', ARGV[2]) end
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""
# KEYS: the writer's hash (a hash, so `scan` skips it), then the counter hashes. ARGV: seq, writer TTL
# in ms, then per hash one JSON object {field: "amount"}: one argument per hash keeps the client's
# encoding cheap (~10x fewer arguments), and amounts as strings give HINCRBY exact 64-bit integers.
_ADD_COUNTS = """
local last = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if tonumber(ARGV[1]) <= last then return 0 end
for k = 2, #KEYS do
  for field, amount in pairs(cjson.decode(ARGV[k + 1])) do
    redis.call('HINCRBY', KEYS[k], field, amount)
  end
end
redis.call('HSET', KEYS[1], 'seq', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_MAX_BATCH = 64  # calls per script: Redis serves no one else while one runs (~55 us a call, as one call a script)
_GLOB = re.compile(r"([\\*?\[\]])")
_MGET_BATCH = 500


def glob_escape(text: str) -> str:
    """`text` as a literal in a Redis MATCH pattern."""
    return _GLOB.sub(r"\\\1", text)


def _ms(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


class RedisStore(CoalescedLimits):
    def __init__(self, url: str, prefix: str = "gw:") -> None:
        self.url = redact_url(url)
        self._password = urlsplit(url).password
        self._prefix = prefix
        with self._errors():
            self._client = aioredis.Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=5.0)
        self._incr = self._client.register_script(_INCR)
        self._add_counts = self._client.register_script(_ADD_COUNTS)
        self._limits_script = self._client.register_script(BATCH_SCRIPT)
        self._subscriptions: set[RedisSubscription] = set()
        self._limits = Coalescer(self._send_limits)
        self._batches: set[asyncio.Task[None]] = set()  # in flight; kept here, or the loop may collect them

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

    async def add_counts(self, writer: str, seq: int, counts: CountBatch) -> bool:
        keys = [f"{self._prefix}counts-writer:{writer}"]
        args: list[bytes | int] = [seq, _ms(WRITER_TTL_S)]
        for key, fields in counts.items():
            keys.append(self._prefix + key)
            args.append(orjson.dumps({name: str(amount) for name, amount in fields.items()}))
        with self._errors():
            applied: Any = await self._add_counts(keys=keys, args=args)
        return bool(applied)

    async def read_counts(self, keys: Sequence[str]) -> dict[str, dict[str, int]]:
        with self._errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(self._prefix + key)
                hashes: list[dict[bytes, bytes]] = await pipe.execute()
        return {
            key: {name.decode(): int(value) for name, value in fields.items()}
            for key, fields in zip(keys, hashes, strict=True)
            if fields
        }

    async def _limit_call(self, call: LimitCall) -> Admission | Settlement:
        return await self._limits.submit(call)

    def _send_limits(self, batch: Batch) -> None:
        task = asyncio.get_running_loop().create_task(self._run_limits(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_limits(self, batch: Batch) -> None:
        """The batch's script calls; every caller gets its outcome or an error, whatever happens."""
        chunks = [batch[start : start + _MAX_BATCH] for start in range(0, len(batch), _MAX_BATCH)]
        try:
            encoded = [batch_call(self._prefix, [call for call, _ in chunk]) for chunk in chunks]
            for chunk, replies in zip(chunks, await self._evalsha(encoded), strict=True):
                if isinstance(replies, Exception):
                    fail(chunk, self.error(replies))
                    continue
                for (call, future), reply in zip(chunk, replies, strict=True):
                    if future.done():
                        continue
                    try:
                        future.set_result(outcome(reply, call))
                    except (ScriptFailed, ValueError) as exc:  # this call failed in Redis: the others stand
                        future.set_exception(self.error(exc))
        except (RedisError, OSError, ValueError) as exc:
            fail(batch, self.error(exc))  # those still waiting
        except BaseException as exc:  # cancelled, or a bug: no caller may wait forever
            fail(batch, exc if isinstance(exc, Exception) else StoreError(f"Redis store {self.url}: cancelled"))
            raise

    async def _evalsha(self, chunks: list[tuple[list[str], list[bytes]]]) -> list[list[bytes] | Exception]:
        """BATCH_SCRIPT over each chunk (its KEYS and ARGV), in order: one call, or a pipeline on one connection."""
        script = self._limits_script
        if len(chunks) == 1:
            keys, args = chunks[0]
            return [await script(keys=keys, args=args)]  # EVALSHA; on NOSCRIPT, SCRIPT LOAD and again
        async with self._client.pipeline(transaction=False) as pipe:
            for keys, args in chunks:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):  # the script cache was flushed: this chunk did nothing
                keys, args = chunks[i]
                replies[i] = await script(keys=keys, args=args)
        return replies

    async def publish(self, channel: str, message: bytes) -> None:
        with self._errors():
            await self._client.publish(self._prefix + channel, message)

    def subscribe(self, channel: str) -> RedisSubscription:
        return RedisSubscription(self, self._client, self._prefix + channel)

    async def aclose(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        self._limits.flush()  # what is queued goes out now, and every batch in flight gets its reply
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
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
