"""`sqlite:///PATH`: the embedded default. Several worker processes may share one file.

Atomicity: WAL mode, and every write is one statement (`INSERT ... ON CONFLICT DO UPDATE ...
RETURNING`) or one BEGIN IMMEDIATE transaction, which SQLite runs under its single-writer lock, so
`add`, `incr`, `admit` and `settle` are atomic across processes. Expired rows are invisible to every
operation and purged by the maintenance below.

Speed: each store has two connections, each confined to its thread (gateway/store/sqlite_session.py).
The loop connection runs on the event-loop thread with busy_timeout 0. Measured (timeit and a loop of
awaits, 10k rows, asyncio and uvloop): a point read there costs ~6-11 us against ~100-260 us through a
thread (`asyncio.to_thread` or a dedicated executor), and a write ~15-60 us against ~200-250 us. A
statement that finds the file locked by another process fails at once with SQLITE_BUSY, having done
nothing, and is retried on the worker connection in the store's one worker thread, which waits up to
`busy_timeout_s`. `scan`, which may read many rows, always runs there. The loop connection never
checkpoints, so it never fsyncs: the worker checkpoints the WAL and purges expired keys and old events
every 500 writes, and after any write once `maintenance_interval_s` has passed. Writes made meanwhile
queue behind it on the worker, so the checkpoint completes and the WAL stays small (~7 MB at most
under a sustained 12k writes/s, against ~170 MB when the loop kept writing).

Limits (`admit`, `settle`) are coalesced (gateway/store/coalesce.py): the calls issued in one
event-loop iteration are queued, and one callback scheduled with `loop.call_soon` runs them all, in
call order, in ONE BEGIN IMMEDIATE transaction on the loop connection, over a cache that reads each
bucket and window row once and writes each changed row once before COMMIT (limits_sqlite.py). Each
call gets exactly what it would have got alone, in that order. Under load a request's admit then
shares the transaction, and its cost, with the others of its iteration: measured with 16 concurrent
callers (benchmarks/limits_admit.py), an admit+settle pair of 4 checks costs ~40 us of CPU instead
of ~220 us with a transaction per call (8 checks: ~65 us instead of ~360 us). A batch that finds the
file locked, or maintenance pending, reruns whole on the worker, and the calls made meanwhile wait to
follow it as one batch. If the transaction fails, every call of the batch raises the StoreError; a
call's invalid arguments raise ValueError at once, for that call only.

Closing: `aclose` runs the calls already queued, lets what the worker has queued finish, then closes
both connections, each on its own thread. Calls made while it closes raise StoreError; calls made
after it returned open new connections (a new session), as the Store contract says.

Pub/sub: `publish` appends to the `events` table, and each subscription polls it by `id > last seen`
(an index range read, ~10 us) every `poll_interval_s`. Delivery to another process or store
instance takes up to one poll interval (0.1 s; ~50 ms on average); a subscriber of the publishing
store instance is woken at once. Events are kept `event_retention_s`: a subscriber that falls
further behind misses the oldest.

Counters (`add_counts`): the table `counts` keyed by (key, field), so one hash's fields, and a range
of hashes, are one index range. A batch is one `BEGIN IMMEDIATE` transaction on the worker: the
writer's last seq (table `count_writers`), then an UPSERT per field, then COMMIT. WAL with
synchronous=NORMAL makes a commit survive a crash of the process (not of the machine: that needs
synchronous=FULL).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from gateway.store.base import CountBatch, StoreError, check_ttl
from gateway.store.coalesce import CoalescedLimits
from gateway.store.limits import Admission, LimitCall, Settlement
from gateway.store.sqlite_session import Params, Session

T = TypeVar("T")
_GET = "SELECT value FROM kv WHERE key = :key AND (expires_at IS NULL OR expires_at > :now)"
_SET = (
    "INSERT INTO kv (key, value, expires_at) VALUES (:key, :value, :expires) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
)
_ADD = _SET + " WHERE kv.expires_at <= :now RETURNING 1"  # no row back: a live key was there
_DELETE = "DELETE FROM kv WHERE key = :key RETURNING expires_at"
_INCR = """
INSERT INTO kv (key, value, expires_at) VALUES (:key, :value, :expires)
ON CONFLICT (key) DO UPDATE SET
    value = CASE WHEN kv.expires_at <= :now THEN excluded.value ELSE gw_add(kv.value, :amount) END,
    expires_at = CASE WHEN kv.expires_at <= :now THEN excluded.expires_at ELSE kv.expires_at END
RETURNING value
"""
_SCAN = "SELECT key, value FROM kv WHERE key >= :start AND (expires_at IS NULL OR expires_at > :now) ORDER BY key"
_SCAN_RANGE = (
    "SELECT key, value FROM kv WHERE key >= :start AND key < :end AND (expires_at IS NULL OR expires_at > :now) "
    "ORDER BY key"
)
_LAST_EVENT = "SELECT coalesce(max(id), 0) FROM events"
_POLL = "SELECT id, message FROM events WHERE channel = :channel AND id > :after ORDER BY id LIMIT 500"
_PUBLISH = "INSERT INTO events (channel, message, created_at) VALUES (:channel, :message, :now)"
_WRITER_SEQ = "SELECT seq FROM count_writers WHERE writer = ?"
_SET_WRITER = (
    "INSERT INTO count_writers (writer, seq, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (writer) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at"
)
_ADD_COUNT = (
    "INSERT INTO counts (key, field, value) VALUES (?, ?, ?) "
    "ON CONFLICT (key, field) DO UPDATE SET value = counts.value + excluded.value"
)
_READ_COUNTS_BATCH = 500  # keys per `IN (...)`, well below SQLite's limit on parameters
_NOT_AN_INTEGER = "user-defined function raised exception"


def _prefix_end(prefix: str) -> str | None:
    """The smallest string above every string that starts with `prefix` (None: no such bound)."""
    stripped = prefix.rstrip(chr(0x10FFFF))
    if not stripped:
        return None
    following = ord(stripped[-1]) + 1
    return stripped[:-1] + chr(0xE000 if 0xD800 <= following <= 0xDFFF else following)


class SQLiteStore(CoalescedLimits):
    def __init__(
        self,
        path: str,
        *,
        busy_timeout_s: float = 5.0,
        poll_interval_s: float = 0.1,
        event_retention_s: float = 60.0,
        maintenance_interval_s: float = 1.0,
    ) -> None:
        self.url = f"sqlite:///{path}"
        self.path = path
        self.poll_interval_s = poll_interval_s
        self._options = {
            "busy_timeout_s": busy_timeout_s,
            "event_retention_s": event_retention_s,
            "maintenance_interval_s": maintenance_interval_s,
        }
        self._session: Session | None = None  # the connections; None until first used, and after aclose
        self._closing: asyncio.Future[None] | None = None
        self._subscriptions: set[SQLiteSubscription] = set()

    def _current(self) -> Session:
        session = self._session
        if session is None:
            if self._closing is not None and not self._closing.done():
                raise StoreError(f"SQLite store {self.url}: closed (aclose) before the operation ran")
            session = self._session = Session(self.url, self.path, **self._options)
        return session

    async def _execute(self, sql: str, params: Params, *, write: bool = False) -> list[Any]:
        return await self._current().execute(sql, params, write=write)

    async def _in_worker(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self._current().in_worker(work)

    async def ping(self) -> None:
        await self._execute("SELECT 1 FROM kv LIMIT 1", ())

    async def get(self, key: str) -> bytes | None:
        rows = await self._execute(_GET, {"key": key, "now": time.time()})
        return cast(bytes, rows[0][0]) if rows else None

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        check_ttl(ttl_s)
        expires = None if ttl_s is None else time.time() + ttl_s
        await self._execute(_SET, {"key": key, "value": value, "expires": expires}, write=True)

    async def add(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        check_ttl(ttl_s)
        now = time.time()
        params = {"key": key, "value": value, "expires": None if ttl_s is None else now + ttl_s, "now": now}
        return bool(await self._execute(_ADD, params, write=True))

    async def delete(self, key: str) -> bool:
        now = time.time()
        rows = await self._execute(_DELETE, {"key": key}, write=True)
        return bool(rows) and (rows[0][0] is None or rows[0][0] > now)

    async def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        end = _prefix_end(prefix)  # keys compare as UTF-8 bytes, i.e. in code point order, like Python's
        sql = _SCAN if end is None else _SCAN_RANGE
        params = {"start": prefix, "end": end, "now": time.time()}
        return await self._in_worker(lambda conn: [(key, value) for key, value in conn.execute(sql, params)])

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        check_ttl(ttl_s)
        now = time.time()
        expires = None if ttl_s is None else now + ttl_s
        params = {"key": key, "value": str(amount).encode(), "amount": amount, "now": now, "expires": expires}
        try:
            rows = await self._execute(_INCR, params, write=True)
        except StoreError as exc:
            if _NOT_AN_INTEGER in str(exc):
                raise StoreError(f"SQLite store {self.url}: the value at {key!r} is not an integer") from None
            raise
        return int(rows[0][0])

    async def add_counts(self, writer: str, seq: int, counts: CountBatch) -> bool:
        rows = [(key, name, amount) for key, fields in counts.items() for name, amount in fields.items()]
        session = self._current()
        applied = await session.in_worker(lambda conn: _apply_counts(conn, writer, seq, rows))
        session.writes += 1
        return applied

    async def read_counts(self, keys: Sequence[str]) -> dict[str, dict[str, int]]:
        def read(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            found: dict[str, dict[str, int]] = {}
            for start in range(0, len(keys), _READ_COUNTS_BATCH):
                chunk = keys[start : start + _READ_COUNTS_BATCH]
                sql = f"SELECT key, field, value FROM counts WHERE key IN ({','.join('?' * len(chunk))})"  # noqa: S608
                for key, name, value in conn.execute(sql, tuple(chunk)):
                    found.setdefault(key, {})[name] = int(value)
            return found

        return await self._in_worker(read)

    async def _limit_call(self, call: LimitCall) -> Admission | Settlement:
        session = self._current()
        if session.conn is None:
            await session.open()  # the batch runs on the loop connection: it must be open before we queue
        return await session.limits.submit(call)

    async def publish(self, channel: str, message: bytes) -> None:
        await self._execute(_PUBLISH, {"channel": channel, "message": message, "now": time.time()}, write=True)
        for subscription in self._subscriptions:
            if subscription.channel == channel:
                subscription.wake.set()

    def subscribe(self, channel: str) -> SQLiteSubscription:
        return SQLiteSubscription(self, channel)

    async def aclose(self) -> None:
        """Run the queued calls, let the worker's finish, close both connections; idempotent.

        Calls made until it returns raise StoreError; calls made after it reopen the store.
        """
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        closing = self._closing
        if closing is None or closing.done():
            session, self._session = self._session, None
            if session is None:
                return
            closing = self._closing = session.close()
        await asyncio.shield(closing)


def _apply_counts(conn: sqlite3.Connection, writer: str, seq: int, rows: list[tuple[str, str, int]]) -> bool:
    """One transaction: nothing if the writer's `seq` was applied already, else every row and the new seq."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        last = conn.execute(_WRITER_SEQ, (writer,)).fetchone()
        if last is not None and seq <= last[0]:
            return False
        conn.execute(_SET_WRITER, (writer, seq, time.time()))
        conn.executemany(_ADD_COUNT, rows)
        conn.execute("COMMIT")
        return True
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


class SQLiteSubscription:
    """Live once it has read the newest event id: on `async with` or at the first `__anext__`."""

    def __init__(self, store: SQLiteStore, channel: str) -> None:
        self.channel = channel
        self.wake = asyncio.Event()
        self._store = store
        self._after: int | None = None
        self._pending: deque[bytes] = deque()
        self._closed = False

    async def _start(self) -> int:
        if self._after is None:
            rows = await self._store._execute(_LAST_EVENT, ())
            self._after = int(rows[0][0])
            if not self._closed:
                self._store._subscriptions.add(self)
        return self._after

    def __aiter__(self) -> SQLiteSubscription:
        return self

    async def __anext__(self) -> bytes:
        while not self._closed:
            if self._pending:
                return self._pending.popleft()
            after = await self._start()
            self.wake.clear()
            rows = await self._store._execute(_POLL, {"channel": self.channel, "after": after})
            if rows:
                self._after = int(rows[-1][0])
                self._pending.extend(bytes(message) for _, message in rows)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._store.poll_interval_s):
                    await self.wake.wait()
        raise StopAsyncIteration

    async def __aenter__(self) -> SQLiteSubscription:
        if not self._closed:
            await self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        self._store._subscriptions.discard(self)
        self.wake.set()
