"""Shared state behind one interface: `memory://`, `sqlite:///PATH` (embedded default), `redis://`."""

from __future__ import annotations

from gateway.store.base import Store, StoreError, Subscription


def open_store(url: str) -> Store:
    """Build the store for `url`; nothing connects until first use.

    `memory://` is process-local. `sqlite:///relative/path.db` (relative to the working directory)
    and `sqlite:////absolute/path.db` name a file that several processes may share.
    `redis://[:PASSWORD@]HOST:PORT/DB` and `rediss://` (TLS) serve many replicas.
    """
    if url.startswith("memory://"):
        from gateway.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from gateway.store.sqlite import SQLiteStore

        path = url.removeprefix("sqlite:///")
        if path in ("", ":memory:"):
            raise StoreError(f"{url!r} names no file: use e.g. sqlite:///./gateway.db, or memory:// (process-local)")
        return SQLiteStore(path)
    if url.startswith(("redis://", "rediss://")):
        from gateway.store.redis import RedisStore

        return RedisStore(url)
    raise StoreError(f"unknown store URL scheme in {url.split('://')[0]!r}; use memory://, sqlite:/// or redis://")


__all__ = ["Store", "StoreError", "Subscription", "open_store"]
