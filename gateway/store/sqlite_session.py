"""One generation of an SQLiteStore's connections: opened on first use, closed by `aclose`.

A session owns two connections, each confined to one thread (check_same_thread is on, so a slip
raises instead of corrupting memory): the loop connection, opened, used and closed on the event-loop
thread, and the worker connection, opened, used and closed on the session's one worker thread. A
session never outlives its `close`, and a store opens a new one for calls made after `aclose`, so no
connection is ever shared with another thread or another generation's thread.

`close` (from `SQLiteStore.aclose`): queued limit calls run first (they were accepted); the loop
connection closes; then a last job on the worker closes the worker connection, after every job queued
before it (deferred batches, fallbacks, maintenance), so they finish. A call that would need this
session's connections after that fails with StoreError ("closed").

Maintenance (checkpoint, purges) and the deferral of writes behind it: see gateway/store/sqlite.py.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.store.base import WRITER_TTL_S, StoreError
from gateway.store.coalesce import Batch, Coalescer, fail, resolve
from gateway.store.limits import now_ms
from gateway.store.limits_sqlite import PURGE as _PURGE_LIMITS
from gateway.store.limits_sqlite import SCHEMA as _LIMITS_SCHEMA
from gateway.store.limits_sqlite import run_calls

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
_CHECKPOINT_WRITES = 500  # ~2000 WAL pages (~4 a write): SQLite's own autocheckpoint is at 1000


class Closed(Exception):
    """The session was closed before the call reached its connection."""


class _Deferred(Exception):
    """A write that must go to the worker thread."""


def _add(value: bytes | str, amount: int) -> bytes:
    """`gw_add(value, amount)` in SQL: raises (failing the statement) if `value` is not an integer."""
    return str(int(value) + amount).encode()


def _busy(exc: sqlite3.OperationalError) -> bool:
    return exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


def atomically(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    return result


class Worker:
    """One thread, and the connection only it opens, uses and closes."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-sqlite")
        self._connect = connect
        self._conn: sqlite3.Connection | None = None  # the worker thread only
        self._closed = False  # set on the worker thread, by the last job
        self._started = False

    def submit(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """`work(conn)` on the worker thread, after every job submitted before; Closed once closing."""
        try:
            future = self._executor.submit(self._call, work)
        except RuntimeError:  # shut down by `close`
            raise Closed from None
        self._started = True
        return asyncio.wrap_future(future)

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise Closed
        if self._conn is None:
            self._conn = self._connect()
        return work(self._conn)

    def _close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def close(self) -> asyncio.Future[None]:
        """Close the connection after every job already submitted; later submits raise Closed. Await the result
        to know it is closed."""
        if not self._started:
            self._executor.shutdown(wait=False)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        last = self._executor.submit(self._close)  # FIFO: runs after every job already queued
        self._executor.shutdown(wait=False)  # later submits raise; the thread ends after `last`
        return asyncio.wrap_future(last)


class Session:
    def __init__(
        self, url: str, path: str, *, busy_timeout_s: float, event_retention_s: float, maintenance_interval_s: float
    ) -> None:
        self.url = url
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._event_retention_s = event_retention_s
        self._maintenance_interval_s = maintenance_interval_s
        self.conn: sqlite3.Connection | None = None  # the loop connection: event-loop thread only
        self.worker = Worker(self._worker_connection)
        self.limits = Coalescer(self._run_limits)
        self._on_worker = False  # a batch of limit calls is on the worker
        self._held: Batch = []  # calls waiting for it
        self.closed = False
        self.writes = 0  # since the last maintenance
        self.maintenance_pending = False
        self._next_maintenance = 0.0
        self._opening = asyncio.Lock()

    def error(self, exc: BaseException) -> StoreError:
        if isinstance(exc, Closed):
            return StoreError(f"SQLite store {self.url}: closed (aclose) before the operation ran")
        return StoreError(f"SQLite store {self.url}: {exc}")

    # --- connections ---------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: survives a crash of the process; fsync at checkpoints
            conn.create_function("gw_add", 2, _add, deterministic=True)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _worker_connection(self) -> sqlite3.Connection:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            self._set_up(conn)
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
                if not _busy(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        conn.execute("PRAGMA journal_size_limit=67108864")
        conn.executescript(_SCHEMA)
        conn.executescript(_LIMITS_SCHEMA)

    async def open(self) -> sqlite3.Connection:
        """The loop connection, opened on this thread once the worker has set the file up."""
        async with self._opening:
            if self.conn is None and not self.closed:
                # The worker first: it creates the file, WAL mode and the schema, waiting for other processes
                # like the worker does (a new WAL file may be locked while another opens it).
                await self.in_worker(lambda conn: None)
                if not self.closed:
                    try:
                        conn = self._connect()
                        conn.execute("PRAGMA wal_autocheckpoint=0")
                        conn.execute("PRAGMA busy_timeout=0")
                    except sqlite3.Error as exc:
                        raise self.error(exc) from None
                    self.conn = conn
        if self.conn is None:
            raise self.error(Closed())
        return self.conn

    async def in_worker(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await self.worker.submit(work)
        except (sqlite3.Error, OSError, Closed) as exc:
            raise self.error(exc) from None

    def close(self) -> asyncio.Future[None]:
        """Start closing, all at once (no call can slip in between); await the result for the worker's end."""
        self.closed = True
        self.limits.flush()  # accepted calls run on the connections they were queued for...
        held, self._held = self._held, []
        if held:
            self._limits_in_worker(held)  # ...those waiting for a batch on the worker, right behind it
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        return self.worker.close()

    # --- statements ----------------------------------------------------------------------------------

    async def execute(self, sql: str, params: Params, *, write: bool = False) -> list[Any]:
        conn = self.conn or await self.open()
        try:
            if write and self.maintenance_pending:
                raise _Deferred  # queued behind the checkpoint, so that it completes and the WAL starts over
            rows = conn.execute(sql, params).fetchall()
        except (sqlite3.OperationalError, _Deferred) as exc:
            if isinstance(exc, sqlite3.OperationalError) and not _busy(exc):
                raise self.error(exc) from None
            rows = await self.in_worker(lambda conn: conn.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise self.error(exc) from None
        if write:
            self.wrote()
        return rows

    def _run_limits(self, batch: Batch) -> None:
        """The batch in one BEGIN IMMEDIATE transaction: on this thread, or on the worker if the file is
        locked by another process (busy_timeout 0 here: the attempt rolls back and reruns there whole)
        or maintenance is pending. While a batch is on the worker, later calls wait and follow it as one
        batch: tried here meanwhile, each would find the worker's transaction holding the lock and go
        there too, one slow thread hop per batch."""
        if self._on_worker:
            self._held += batch
            return
        conn = self.conn
        if conn is not None and not self.maintenance_pending:
            calls = [call for call, _ in batch]
            try:
                outcomes = atomically(conn, lambda conn: run_calls(conn, calls))
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    fail(batch, self.error(exc))
                    return
            except sqlite3.Error as exc:
                fail(batch, self.error(exc))
                return
            except Exception as exc:  # a bug: every caller must hear of it rather than wait forever
                fail(batch, exc)
                return
            else:
                self.wrote()
                resolve(batch, outcomes)
                return
        self._limits_in_worker(batch)

    def _limits_in_worker(self, batch: Batch) -> None:
        calls = [call for call, _ in batch]
        try:
            future = self.worker.submit(lambda conn: atomically(conn, lambda conn: run_calls(conn, calls)))
        except Closed as exc:
            fail(batch, self.error(exc))
            return
        self._on_worker = True
        future.add_done_callback(lambda done: self._limits_done(batch, done))

    def _limits_done(self, batch: Batch, done: asyncio.Future[list[Any]]) -> None:
        self._on_worker = False
        exc = done.exception() if not done.cancelled() else Closed()
        if exc is None:
            self.wrote()
            resolve(batch, done.result())
        elif isinstance(exc, sqlite3.Error | OSError | Closed):
            fail(batch, self.error(exc))
        else:
            fail(batch, exc)
        held, self._held = self._held, []
        if held:
            self._run_limits(held)

    # --- maintenance ---------------------------------------------------------------------------------

    def wrote(self) -> None:
        self.writes += 1
        if self.writes >= _CHECKPOINT_WRITES or time.monotonic() >= self._next_maintenance:
            self._schedule_maintenance()

    def _schedule_maintenance(self) -> None:
        if self.maintenance_pending or self.closed:
            return
        try:
            future = self.worker.submit(self._maintain)
        except Closed:
            return
        self.writes, self.maintenance_pending = 0, True
        self._next_maintenance = time.monotonic() + self._maintenance_interval_s
        future.add_done_callback(self._maintained)

    def _maintained(self, future: asyncio.Future[None]) -> None:
        self.maintenance_pending = False
        if not future.cancelled() and (exc := future.exception()) is not None and not isinstance(exc, Closed):
            logger.warning("SQLite store %s: maintenance failed: %s", self.url, exc)

    def _maintain(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        conn.execute("DELETE FROM kv WHERE expires_at <= ?", (now,))
        conn.execute("DELETE FROM events WHERE created_at < ?", (now - self._event_retention_s,))
        conn.execute("DELETE FROM count_writers WHERE updated_at < ?", (now - WRITER_TTL_S,))
        for purge in _PURGE_LIMITS:
            conn.execute(purge, (now_ms(now) - 5000,))  # 5 s late: callers' `now` may lag this clock
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
