"""The limits of gateway/store/limits.py in SQLite: three tables, and a cache over them for one transaction.

`rate` holds a bucket per key; `spend` a budget window's settled spend and `held`, the running total
of its rows in `holds` (one per request in flight, keyed (key, expires_at, id): one b-tree). Lapsed
holds are deleted and subtracted from `held` when a check meets them, so a check costs O(log n)
whatever the number of requests in flight. A window's row outlives its holds (its expiry is at least
theirs), so maintenance may delete expired windows, and then the holds left without a window. Times
are integer ms since the epoch, as the algorithm uses them.

`run_calls` applies a batch of calls (gateway/store/coalesce.py) inside the caller's BEGIN IMMEDIATE
transaction through `SQLiteLimits`, a cache that reads each bucket and window row at most once and
writes each changed one once, at `flush`, before COMMIT. The transaction holds the write lock, so no
other process changes a row between the read and the write. Holds stay one row per request (inserted
at flush, unless the same batch settled it already; deleted by the settle). When a window is first
read, so are its holds that could lapse by the batch's latest `now` (none, normally: a probe), into
a heap like memory://'s, so that calls with different `now`s see exactly what they would see one
after another.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.store.coalesce import Outcome
from gateway.store.limits import LimitCall, apply_on

SCHEMA = """
CREATE TABLE IF NOT EXISTS rate (key TEXT PRIMARY KEY, level INTEGER NOT NULL, at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS rate_expires ON rate (expires_at);
CREATE TABLE IF NOT EXISTS spend (key TEXT PRIMARY KEY, spent INTEGER NOT NULL, held INTEGER NOT NULL,
    alerted INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS holds (key TEXT NOT NULL, expires_at INTEGER NOT NULL, id TEXT NOT NULL,
    amount INTEGER NOT NULL, PRIMARY KEY (key, expires_at, id)) WITHOUT ROWID;
"""
_BUCKET = "SELECT level, at, expires_at FROM rate WHERE key = ?"
_PUT_BUCKET = (
    "INSERT INTO rate (key, level, at, expires_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET level = excluded.level, at = excluded.at, expires_at = excluded.expires_at"
)
_WINDOW = "SELECT spent, held, alerted, expires_at FROM spend WHERE key = ?"
_LAPSING = "SELECT expires_at, id, amount FROM holds WHERE key = ? AND expires_at <= ?"
_PUT_WINDOW = (
    "INSERT INTO spend (key, spent, held, alerted, expires_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET spent = excluded.spent, held = excluded.held, alerted = excluded.alerted, "
    "expires_at = excluded.expires_at"
)
_DROP_WINDOW = "DELETE FROM spend WHERE key = ?"
_ADD_HOLD = "INSERT OR REPLACE INTO holds (key, expires_at, id, amount) VALUES (?, ?, ?, ?)"
_DROP_HOLD = "DELETE FROM holds WHERE key = ? AND expires_at = ? AND id = ? RETURNING amount"
_FORGET_HOLD = "DELETE FROM holds WHERE key = ? AND expires_at = ? AND id = ?"
PURGE = (
    "DELETE FROM rate WHERE expires_at <= ?",
    "DELETE FROM spend WHERE expires_at <= ?",
    "DELETE FROM holds WHERE expires_at <= ? AND NOT EXISTS (SELECT 1 FROM spend WHERE spend.key = holds.key)",
)

Row = tuple[int, int, bool, int]  # a window: spent, held, alerted, expires


@dataclass(slots=True)
class _Window:
    row: Row | None  # as it stands in this transaction; None: absent
    stored: bool  # the table had a row at the start (an absent `row` then means a DELETE)
    dirty: bool = False
    holds: dict[str, tuple[int, int, bool]] = field(default_factory=dict)  # id -> (amount, expires, in the table)
    lapses: list[tuple[int, str]] = field(default_factory=list)  # heap of (expires, id) that may lapse in the batch
    gone: set[tuple[int, str]] = field(default_factory=set)  # (expires, id) of table rows to delete at flush


class SQLiteLimits:
    """LimitState over a connection inside a transaction; `flush` writes what changed."""

    def __init__(self, conn: sqlite3.Connection, horizon: int) -> None:
        self._conn = conn
        self._horizon = horizon  # the latest `now` of the batch: no hold expiring later can lapse in it
        self._buckets: dict[str, tuple[int, int, int] | None] = {}  # key -> (level, at, expires)
        self._changed_buckets: dict[str, tuple[int, int, int]] = {}
        self._windows: dict[str, _Window] = {}

    def bucket(self, key: str, now: int) -> tuple[int, int] | None:
        try:
            row = self._buckets[key]
        except KeyError:
            found = self._conn.execute(_BUCKET, (key,)).fetchone()
            row = self._buckets[key] = None if found is None else (int(found[0]), int(found[1]), int(found[2]))
        return (row[0], row[1]) if row is not None and row[2] > now else None

    def put_bucket(self, key: str, level: int, at: int, expires: int) -> None:
        self._buckets[key] = self._changed_buckets[key] = (level, at, expires)

    def _load(self, key: str) -> _Window:
        window = self._windows.get(key)
        if window is None:
            found = self._conn.execute(_WINDOW, (key,)).fetchone()
            row = None if found is None else (int(found[0]), int(found[1]), bool(found[2]), int(found[3]))
            window = self._windows[key] = _Window(row, found is not None)
            for expires, hold_id, amount in self._conn.execute(_LAPSING, (key, self._horizon)):
                window.holds[hold_id] = (int(amount), int(expires), True)
                window.lapses.append((int(expires), hold_id))
            heapq.heapify(window.lapses)
        return window

    def window(self, key: str, now: int) -> tuple[int, int, bool]:
        window = self._load(key)
        lapsed = 0
        while window.lapses and window.lapses[0][0] <= now:
            expires, hold_id = heapq.heappop(window.lapses)
            entry = window.holds.pop(hold_id, None)  # None: settled meanwhile
            if entry is not None:
                lapsed += entry[0]
                if entry[2]:
                    window.gone.add((expires, hold_id))
        if window.row is None:
            return 0, 0, False
        spent, held, alerted, expires = window.row
        if expires <= now:  # it outlives its holds, so none is live
            window.row, window.dirty = None, True
            return 0, 0, False
        if lapsed:
            held = max(0, held - lapsed)
            window.row, window.dirty = (spent, held, alerted, expires), True
        return spent, held, alerted

    def put_window(self, key: str, spent: int, held: int, alerted: bool, expires: int) -> None:
        window = self._load(key)
        if window.row is not None:
            expires = max(window.row[3], expires)
        window.row, window.dirty = (spent, held, alerted, expires), True

    def add_hold(self, key: str, hold_id: str, amount: int, expires: int, window_expires: int) -> None:
        window = self._load(key)
        window.holds[hold_id] = (amount, expires, False)
        if expires <= self._horizon:
            heapq.heappush(window.lapses, (expires, hold_id))
        row = window.row
        if row is None:
            window.row = (0, amount, False, window_expires)
        else:
            window.row = (row[0], row[1] + amount, row[2], max(row[3], window_expires))
        window.dirty = True

    def drop_hold(self, key: str, hold_id: str, expires: int) -> int:
        window = self._load(key)
        entry = window.holds.pop(hold_id, None)
        if entry is not None:  # added by this batch, or read with the window because it may lapse in it
            if entry[2]:
                window.gone.add((expires, hold_id))
            return entry[0]
        if expires <= self._horizon or (expires, hold_id) in window.gone:
            return 0  # gone already: such a row would have been read with the window, or was dropped in this batch
        row = self._conn.execute(_DROP_HOLD, (key, expires, hold_id)).fetchone()
        return 0 if row is None else int(row[0])

    def flush(self) -> None:
        """Write every changed row once: the transaction then holds exactly what the calls did."""
        conn = self._conn
        if self._changed_buckets:
            conn.executemany(_PUT_BUCKET, [(key, *row) for key, row in self._changed_buckets.items()])
        puts: list[tuple[str, int, int, int, int]] = []
        drops: list[tuple[str]] = []
        added: list[tuple[str, int, str, int]] = []
        gone: list[tuple[str, int, str]] = []
        for key, window in self._windows.items():
            if window.dirty and window.row is not None:
                spent, held, alerted, expires = window.row
                puts.append((key, spent, held, int(alerted), expires))
            elif window.dirty and window.stored:
                drops.append((key,))
            added += [(key, exp, hold_id, amount) for hold_id, (amount, exp, kept) in window.holds.items() if not kept]
            gone += [(key, exp, hold_id) for exp, hold_id in window.gone]
        for sql, rows in ((_PUT_WINDOW, puts), (_DROP_WINDOW, drops), (_ADD_HOLD, added), (_FORGET_HOLD, gone)):
            if rows:
                conn.executemany(sql, rows)


def run_calls(conn: sqlite3.Connection, calls: Sequence[LimitCall]) -> list[Outcome]:
    """Apply `calls` in order on a connection inside a transaction; what each would get run alone in turn."""
    state = SQLiteLimits(conn, max(call.now for call in calls))
    outcomes = [apply_on(state, call) for call in calls]
    state.flush()
    return outcomes
