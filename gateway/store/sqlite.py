"""`sqlite:///PATH`: the embedded default. Several worker processes may share one file.

Atomicity: WAL mode, and every write is one statement (`INSERT ... ON CONFLICT DO UPDATE ...
RETURNING`), which SQLite runs under its single-writer lock, so `add` and `incr` are atomic across
processes. Expired rows are invisible to every operation and purged by the maintenance below.

Speed: each store has two connections. The loop connection runs on the event-loop thread with
busy_timeout 0. Measured (timeit and a loop of awaits, 10k rows, asyncio and uvloop): a point read
there costs ~6-11 us against ~100-260 us through a thread (`asyncio.to_thread` or a dedicated
executor), and a write ~15-60 us against ~200-250 us. A statement that finds the file locked by
another process fails at once with SQLITE_BUSY, having done nothing, and is retried on the worker
connection in the store's one worker thread, which waits up to `busy_timeout_s`. `scan`, which may
read many rows, always runs there. The loop connection never checkpoints, so it never fsyncs: the
worker checkpoints the WAL and purges expired keys and old events every 500 writes, and after any
write once `maintenance_interval_s` has passed. Writes made meanwhile queue behind it on the worker,
so the checkpoint completes and the WAL stays small (~7 MB at most under a sustained 12k writes/s,
against ~170 MB when the loop kept writing).

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
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

from gateway.store.base import WRITER_TTL_S, CountBatch, StoreError, check_ttl
from gateway.store.limits import (
    Admission,
    Hold,
    LimitCheck,
    RateCheck,
    Settlement,
    admit_on,
    check_admit,
    check_settle,
    hold_ms,
    new_hold_id,
    now_ms,
    settle_on,
)
from gateway.store.limits_sqlite import PURGE as _PURGE_LIMITS
from gateway.store.limits_sqlite import SCHEMA as _LIMITS_SCHEMA
from gateway.store.limits_sqlite import SQLiteLimits

T = TypeVar("T")
Params = tuple[object, ...] | Mapping[str, object]
logger = logging.getLogger("gateway.store")

# Not WITHOUT ROWID: SQLite 3.40 evaluates `expires_at IS NULL` wrongly in RETURNING on such tables.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL);
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, message BLOB NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_channel ON events (channel, id);
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);
CREATE TABLE IF NOT EXISTS counts (
    key TEXT NOT NULL, field TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (key, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS count_writers (writer TEXT PRIMARY KEY, seq INTEGER NOT NULL, updated_at REAL NOT NULL);
"""
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
_CHECKPOINT_WRITES = 500  # ~2000 WAL pages (~4 a write): SQLite's own autocheckpoint is at 1000


class _Deferred(Exception):
    """A write that must go to the worker thread."""


def _add(value: bytes | str, amount: int) -> bytes:
    """`gw_add(value, amount)` in SQL: raises (failing the statement) if `value` is not an integer."""
    return str(int(value) + amount).encode()


def _prefix_end(prefix: str) -> str | None:
    """The smallest string above every string that starts with `prefix` (None: no such bound)."""
    stripped = prefix.rstrip(chr(0x10FFFF))
    if not stripped:
        return None
    following = ord(stripped[-1]) + 1
    return stripped[:-1] + chr(0xE000 if 0xD800 <= following <= 0xDFFF else following)


class SQLiteStore:
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
        self._busy_timeout_s = busy_timeout_s
        self._event_retention_s = event_retention_s
        self._maintenance_interval_s = maintenance_interval_s
        self._next_maintenance = 0.0
        self._maintenance_pending = False
        self._writes = 0  # since the last maintenance
        self._conn: sqlite3.Connection | None = None  # the loop connection: event-loop thread only
        self._worker: ThreadPoolExecutor | None = None
        self._worker_conn: sqlite3.Connection | None = None  # the worker thread only
        self._open_lock = asyncio.Lock()
        self._subscriptions: set[SQLiteSubscription] = set()

    def _error(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"SQLite store {self.url}: {exc}")

    def _connect(self, busy_timeout_s: float) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across crashes of the process, fsync at checkpoints
        conn.create_function("gw_add", 2, _add, deterministic=True)
        return conn

    def _worker_connection(self) -> sqlite3.Connection:
        if self._worker_conn is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect(self._busy_timeout_s)
            try:
                self._set_up(conn)
            except sqlite3.Error:
                conn.close()
                raise
            self._worker_conn = conn
        return self._worker_conn

    def _loop_connection(self) -> sqlite3.Connection:
        conn = self._connect(self._busy_timeout_s)
        try:
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute("PRAGMA busy_timeout=0")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the schema, retried: switching a new file to WAL fails at once, without waiting
        for the busy timeout, while another process does the same (several workers starting together)."""
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        conn.execute("PRAGMA journal_size_limit=67108864")
        conn.executescript(_SCHEMA)
        conn.executescript(_LIMITS_SCHEMA)

    async def _in_worker(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="gateway-sqlite")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._worker, lambda: work(self._worker_connection())
            )
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"SQLite store {self.url}: {exc}") from None

    async def _connection(self) -> sqlite3.Connection:
        async with self._open_lock:
            if self._conn is None:
                # On the worker, which creates the file, WAL mode and the schema first. Its set-up waits for
                # other processes like the worker does (a new WAL file may be locked while another opens it),
                # and only then does it stop waiting.
                self._conn = await self._in_worker(lambda conn: self._loop_connection())
            return self._conn

    async def _execute(self, sql: str, params: Params, *, write: bool = False) -> list[Any]:
        conn = self._conn or await self._connection()
        try:
            if write and self._maintenance_pending:
                raise _Deferred  # queued behind the checkpoint, so that it completes and the WAL starts over
            rows = conn.execute(sql, params).fetchall()
        except (sqlite3.OperationalError, _Deferred) as exc:
            if isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                raise self._error(exc) from None
            rows = await self._in_worker(lambda conn: conn.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        if write:
            self._wrote()
        return rows

    async def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` in one BEGIN IMMEDIATE transaction: on the loop thread, or on the worker if the file is locked."""
        conn = self._conn or await self._connection()
        try:
            if self._maintenance_pending:
                raise _Deferred
            result = _atomically(conn, work)
        except (sqlite3.OperationalError, _Deferred) as exc:
            if isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                raise self._error(exc) from None
            result = await self._in_worker(lambda conn: _atomically(conn, work))  # rolled back: runs anew
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        self._wrote()
        return result

    def _wrote(self) -> None:
        self._writes += 1
        if self._writes >= _CHECKPOINT_WRITES or time.monotonic() >= self._next_maintenance:
            self._schedule_maintenance()

    def _schedule_maintenance(self) -> None:
        if self._worker is None or self._maintenance_pending:
            return
        self._writes, self._maintenance_pending = 0, True
        self._next_maintenance = time.monotonic() + self._maintenance_interval_s
        self._worker.submit(self._maintain).add_done_callback(self._maintained)

    def _maintained(self, future: Future[None]) -> None:
        self._maintenance_pending = False
        if not future.cancelled() and (exc := future.exception()) is not None:
            logger.warning("SQLite store %s: maintenance failed: %s", self.url, exc)

    def _maintain(self) -> None:
        conn, now = self._worker_connection(), time.time()
        conn.execute("DELETE FROM kv WHERE expires_at <= ?", (now,))
        conn.execute("DELETE FROM events WHERE created_at < ?", (now - self._event_retention_s,))
        conn.execute("DELETE FROM count_writers WHERE updated_at < ?", (now - WRITER_TTL_S,))
        for purge in _PURGE_LIMITS:
            conn.execute(purge, (now_ms(now) - 5000,))  # 5 s late: callers' `now` may lag this clock
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

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
        applied = await self._in_worker(lambda conn: _apply_counts(conn, writer, seq, rows))
        self._writes += 1
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

    async def admit(
        self, checks: Sequence[LimitCheck], *, hold_s: float = 660.0, now: float | None = None
    ) -> Admission:
        check_admit(checks, hold_s)
        at, hold_id = now_ms(now), new_hold_id()
        return await self._transaction(lambda conn: admit_on(SQLiteLimits(conn), checks, at, hold_id, hold_ms(hold_s)))

    async def settle(
        self, hold: Hold | None, spend: int, corrections: Sequence[RateCheck] = (), *, now: float | None = None
    ) -> Settlement:
        check_settle(hold, spend, corrections)
        if hold is None and not corrections:
            return Settlement((), ())
        at = now_ms(now)
        return await self._transaction(lambda conn: settle_on(SQLiteLimits(conn), hold, spend, corrections, at))

    async def publish(self, channel: str, message: bytes) -> None:
        await self._execute(_PUBLISH, {"channel": channel, "message": message, "now": time.time()}, write=True)
        for subscription in self._subscriptions:
            if subscription.channel == channel:
                subscription.wake.set()

    def subscribe(self, channel: str) -> SQLiteSubscription:
        return SQLiteSubscription(self, channel)

    async def aclose(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        worker, self._worker = self._worker, None
        if worker is not None:
            await asyncio.get_running_loop().run_in_executor(worker, self._close_worker_connection)
            worker.shutdown(wait=False)

    def _close_worker_connection(self) -> None:
        conn, self._worker_conn = self._worker_conn, None
        if conn is not None:
            conn.close()


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


def _atomically(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    return result


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
