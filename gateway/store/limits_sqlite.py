"""The limits of gateway/store/limits.py in SQLite: three tables, used inside one BEGIN IMMEDIATE transaction.

`rate` holds a bucket per key; `spend` a budget window's settled spend and `held`, the running total
of its rows in `holds` (one per request in flight, keyed (key, expires_at, id): one b-tree). A check
deletes the window's lapsed holds (`DELETE ... RETURNING` on that key's range: a probe when there are
none) and subtracts them, so it costs O(log n) whatever the number of requests in flight. A window's row
outlives its holds (its expiry is at least theirs), so maintenance may delete expired windows, and
then the holds left without a window. Times are integer ms since the epoch, as the algorithm uses them.
"""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS rate (key TEXT PRIMARY KEY, level INTEGER NOT NULL, at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS rate_expires ON rate (expires_at);
CREATE TABLE IF NOT EXISTS spend (key TEXT PRIMARY KEY, spent INTEGER NOT NULL, held INTEGER NOT NULL,
    alerted INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS holds (key TEXT NOT NULL, expires_at INTEGER NOT NULL, id TEXT NOT NULL,
    amount INTEGER NOT NULL, PRIMARY KEY (key, expires_at, id)) WITHOUT ROWID;
"""
_BUCKET = "SELECT level, at FROM rate WHERE key = ? AND expires_at > ?"
_PUT_BUCKET = (
    "INSERT INTO rate (key, level, at, expires_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET level = excluded.level, at = excluded.at, expires_at = excluded.expires_at"
)
_LAPSED = "DELETE FROM holds WHERE key = ? AND expires_at <= ? RETURNING amount"
_WINDOW = "SELECT spent, held, alerted, expires_at FROM spend WHERE key = ?"
_LAPSE_HELD = "UPDATE spend SET held = max(0, held - ?) WHERE key = ?"
_DROP_WINDOW = "DELETE FROM spend WHERE key = ?"
_PUT_WINDOW = (
    "INSERT INTO spend (key, spent, held, alerted, expires_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET spent = excluded.spent, held = excluded.held, alerted = excluded.alerted, "
    "expires_at = max(spend.expires_at, excluded.expires_at)"
)
_ADD_HOLD = "INSERT OR REPLACE INTO holds (key, expires_at, id, amount) VALUES (?, ?, ?, ?)"
_HOLD_WINDOW = (
    "INSERT INTO spend (key, spent, held, alerted, expires_at) VALUES (?, 0, ?, 0, ?) "
    "ON CONFLICT (key) DO UPDATE SET held = spend.held + excluded.held, "
    "expires_at = max(spend.expires_at, excluded.expires_at)"
)
_DROP_HOLD = "DELETE FROM holds WHERE key = ? AND expires_at = ? AND id = ? RETURNING amount"
PURGE = (
    "DELETE FROM rate WHERE expires_at <= ?",
    "DELETE FROM spend WHERE expires_at <= ?",
    "DELETE FROM holds WHERE expires_at <= ? AND NOT EXISTS (SELECT 1 FROM spend WHERE spend.key = holds.key)",
)


class SQLiteLimits:
    """LimitState over a connection that is inside a transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def bucket(self, key: str, now: int) -> tuple[int, int] | None:
        row = self._conn.execute(_BUCKET, (key, now)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def put_bucket(self, key: str, level: int, at: int, expires: int) -> None:
        self._conn.execute(_PUT_BUCKET, (key, level, at, expires))

    def window(self, key: str, now: int) -> tuple[int, int, bool]:
        lapsed = sum(amount for (amount,) in self._conn.execute(_LAPSED, (key, now)).fetchall())
        row = self._conn.execute(_WINDOW, (key,)).fetchone()
        if row is None:
            return 0, 0, False
        spent, held, alerted, expires = row
        if expires <= now:  # it outlives its holds, so none is live
            self._conn.execute(_DROP_WINDOW, (key,))
            return 0, 0, False
        if lapsed:
            self._conn.execute(_LAPSE_HELD, (lapsed, key))
        return int(spent), max(0, int(held) - lapsed), bool(alerted)

    def put_window(self, key: str, spent: int, held: int, alerted: bool, expires: int) -> None:
        self._conn.execute(_PUT_WINDOW, (key, spent, held, int(alerted), expires))

    def add_hold(self, key: str, hold_id: str, amount: int, expires: int, window_expires: int) -> None:
        self._conn.execute(_ADD_HOLD, (key, expires, hold_id, amount))
        self._conn.execute(_HOLD_WINDOW, (key, amount, window_expires))

    def drop_hold(self, key: str, hold_id: str, expires: int) -> int:
        row = self._conn.execute(_DROP_HOLD, (key, expires, hold_id)).fetchone()
        return 0 if row is None else int(row[0])
