"""`memory://`: a process-local store for tests and single-process demos.

Nothing here awaits between reading and writing, so every operation is atomic on the event loop.
The clock is injectable so tests can expire keys without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from gateway.store.base import WRITER_TTL_S, CountBatch, StoreError, check_ttl
from gateway.store.coalesce import CoalescedLimits
from gateway.store.limits import Admission, AdmitCall, LimitCall, Settlement, admit_on, settle_on
from gateway.store.limits_memory import MemoryLimits

_PURGE_EVERY_S = 60.0


class MemoryStore(CoalescedLimits):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = "memory://"
        self._clock = clock
        self._data: dict[str, tuple[bytes, float | None]] = {}
        self._subscribers: dict[str, set[MemorySubscription]] = {}
        self._next_purge = clock() + _PURGE_EVERY_S
        self._counts: dict[str, dict[str, int]] = {}
        self._writers: dict[str, tuple[int, float]] = {}  # writer -> (last seq, when)
        self._limits = MemoryLimits()  # on the callers' `now` (epoch), not on `clock`

    async def ping(self) -> None:
        return None

    def _live(self, key: str, now: float) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and expires <= now:
            del self._data[key]
            return None
        return value

    def _expiry(self, ttl_s: float | None, now: float) -> float | None:
        check_ttl(ttl_s)
        if now >= self._next_purge:  # writes sweep expired keys now and then, so unread keys do not pile up
            self._next_purge = now + _PURGE_EVERY_S
            for key in [key for key, (_, expires) in self._data.items() if expires is not None and expires <= now]:
                del self._data[key]
        return None if ttl_s is None else now + ttl_s

    async def get(self, key: str) -> bytes | None:
        return self._live(key, self._clock())

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        now = self._clock()
        self._data[key] = (bytes(value), self._expiry(ttl_s, now))

    async def add(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        now = self._clock()
        expires = self._expiry(ttl_s, now)
        if self._live(key, now) is not None:
            return False
        self._data[key] = (bytes(value), expires)
        return True

    async def delete(self, key: str) -> bool:
        existed = self._live(key, self._clock()) is not None
        self._data.pop(key, None)
        return existed

    async def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        now = self._clock()
        keys = sorted(key for key in self._data if key.startswith(prefix))
        return [(key, value) for key in keys if (value := self._live(key, now)) is not None]

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        now = self._clock()
        expires = self._expiry(ttl_s, now)
        current = self._live(key, now)
        if current is None:
            total = amount
        else:
            try:
                total = int(current) + amount
            except ValueError:
                raise StoreError(f"memory store: the value at {key!r} is not an integer") from None
            expires = self._data[key][1]
        self._data[key] = (str(total).encode(), expires)
        return total

    async def add_counts(self, writer: str, seq: int, counts: CountBatch) -> bool:
        now = self._clock()
        last, when = self._writers.get(writer, (0, now))
        if seq <= last and now - when < WRITER_TTL_S:
            return False
        self._writers[writer] = (seq, now)
        for key, fields in counts.items():
            target = self._counts.setdefault(key, {})
            for name, amount in fields.items():
                target[name] = target.get(name, 0) + amount
        return True

    async def read_counts(self, keys: Sequence[str]) -> dict[str, dict[str, int]]:
        return {key: dict(self._counts[key]) for key in keys if self._counts.get(key)}

    async def _limit_call(self, call: LimitCall) -> Admission | Settlement:
        # No batch to wait for: no await between reading and writing makes each call atomic here.
        if isinstance(call, AdmitCall):
            self._limits.purge(call.now)
            return admit_on(self._limits, call.checks, call.now, call.hold_id, call.hold_ms)
        return settle_on(self._limits, call.hold, call.spend, call.corrections, call.now)

    async def publish(self, channel: str, message: bytes) -> None:
        for subscription in self._subscribers.get(channel, ()):
            subscription.deliver(bytes(message))

    def subscribe(self, channel: str) -> MemorySubscription:
        return MemorySubscription(self, channel)

    def _unsubscribe(self, subscription: MemorySubscription) -> None:
        subscribers = self._subscribers.get(subscription.channel)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.channel]

    async def aclose(self) -> None:
        for subscribers in list(self._subscribers.values()):
            for subscription in list(subscribers):
                await subscription.aclose()


class MemorySubscription:
    """Live from construction on: `publish` puts each message in this subscriber's own queue."""

    def __init__(self, store: MemoryStore, channel: str) -> None:
        self.channel = channel
        self._store = store
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._closed = False
        store._subscribers.setdefault(channel, set()).add(self)

    def deliver(self, message: bytes) -> None:
        self._queue.put_nowait(message)

    def __aiter__(self) -> MemorySubscription:
        return self

    async def __anext__(self) -> bytes:
        message = None if self._closed else await self._queue.get()
        if message is None:
            raise StopAsyncIteration
        return message

    async def __aenter__(self) -> MemorySubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._store._unsubscribe(self)
            self._queue.put_nowait(None)  # wakes a reader waiting in __anext__
