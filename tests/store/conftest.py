"""Store fixtures: `backend` runs a test once per backend (memory, sqlite, redis) on fresh, shared state.

Redis is a real redis-server that this session starts on a free port (tests/redis_server.py) and stops.
Without a redis-server binary, every Redis test fails with advice on how to install one.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis_server import INSTALL_HINT, RedisServer, redis_server_binary, start_redis_server

from gateway.store import Store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SQLiteStore

from .support import Backend, FakeClock

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = redis_server_binary()
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)  # fail, never skip: a green run must have tested Redis
    server = start_redis_server(tmp_path_factory.mktemp("redis"), binary=binary)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()
        memory = MemoryStore(clock)  # process-local: every "instance" is the same store
        chosen = Backend("memory", lambda: memory, clock)
    elif request.param == "sqlite":
        path = str(tmp_path / "store" / "gateway.db")
        chosen = Backend("sqlite", lambda: SQLiteStore(path))
    else:
        url, prefix = request.getfixturevalue("redis_url"), f"gwtest{next(_prefixes)}:"
        chosen = Backend("redis", lambda: RedisStore(url, prefix=prefix))
    try:
        yield chosen
    finally:
        for store in chosen.opened:
            await store.aclose()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()
