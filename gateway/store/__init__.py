"""Shared state behind one interface: `memory://`, `sqlite:///PATH` (embedded default), `redis://`."""

from __future__ import annotations

from gateway.store.base import Store, StoreError


def open_store(url: str) -> Store:
    """Build the store for `url`; nothing connects until first use."""
    if url.startswith("memory://"):
        from gateway.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from gateway.store.sqlite import SQLiteStore

        # sqlite:///relative/path.db and sqlite:////absolute/path.db, as SQLAlchemy spells them.
        return SQLiteStore(url.removeprefix("sqlite:///") or ":memory:")
    if url.startswith(("redis://", "rediss://")):
        from gateway.store.redis import RedisStore

        return RedisStore(url)
    raise StoreError(f"unknown store URL scheme in {url.split('://')[0]!r}; use memory://, sqlite:/// or redis://")


__all__ = ["Store", "StoreError", "open_store"]
