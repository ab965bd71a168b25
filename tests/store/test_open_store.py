"""open_store(url): which backend each URL names, and where an SQLite file goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.store import StoreError, open_store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SQLiteStore


def test_memory() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)


async def test_sqlite_relative_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///data/gateway.db")
    assert isinstance(store, SQLiteStore)
    assert store.url == "sqlite:///data/gateway.db"
    await store.set("k", b"v")
    await store.aclose()
    assert (tmp_path / "data" / "gateway.db").is_file()


async def test_sqlite_absolute_path(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/abs.db"  # sqlite:////tmp/...: four slashes
    assert url.startswith("sqlite:////")
    store = open_store(url)
    assert store.url == url
    await store.set("k", b"v")
    await store.aclose()
    assert (tmp_path / "abs.db").is_file()


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite:///:memory:"])
def test_sqlite_needs_a_file(url: str) -> None:
    with pytest.raises(StoreError, match="memory://"):
        open_store(url)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6399/2", "redis://127.0.0.1:6399/2"),
        ("redis://:pw-123@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("rediss://user:pw-123@redis.example:6380/1", "rediss://user:***@redis.example:6380/1"),
    ],
)
async def test_redis_urls_connect_lazily_and_hide_the_password(url: str, shown: str) -> None:
    store = open_store(url)  # nothing listens there: building the store must not connect
    assert isinstance(store, RedisStore)
    assert store.url == shown
    await store.aclose()


def test_unknown_scheme() -> None:
    with pytest.raises(StoreError, match="unknown store URL scheme"):
        open_store("postgres://localhost/db")
