"""`sqlite:///PATH`: the embedded default. WAL mode, so several workers can share one file."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from gateway.store.base import StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL);
"""


class SQLiteStore:
    def __init__(self, path: str) -> None:
        self.url = f"sqlite:///{path}"
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            try:
                connection = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
                connection.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the SQLite store at {self.path}: {exc}") from None
            self._connection = connection
        return self._connection

    async def _run(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        def work() -> list[tuple[object, ...]]:
            try:
                return self._connect().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path}: {exc}") from None

        async with self._lock:  # one connection, one statement at a time
            return await asyncio.to_thread(work)

    async def ping(self) -> None:
        await self._run("SELECT 1")

    async def get(self, key: str) -> bytes | None:
        rows = await self._run(
            "SELECT value FROM kv WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)",
            (key, time.time()),
        )
        if not rows:
            return None
        value = rows[0][0]
        assert isinstance(value, bytes)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        expires = None if ttl_s is None else time.time() + ttl_s
        await self._run(
            "INSERT INTO kv (key, value, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            (key, value, expires),
        )

    async def delete(self, key: str) -> None:
        await self._run("DELETE FROM kv WHERE key = ?", (key,))

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
