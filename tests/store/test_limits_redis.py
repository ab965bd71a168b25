"""What only redis:// promises for `admit` and `settle`: registered scripts, hashes that expire, no Python RMW."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.store.limits import BudgetCheck, RateCheck
from gateway.store.redis import RedisStore


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url, prefix="lim:")
    yield store
    await store.aclose()


async def test_limit_state_is_hashes_that_expire(store: RedisStore, raw: aioredis.Redis) -> None:
    now = time.time()
    window = BudgetCheck("budget:t:day", 1000, 100, now + 3600)
    admitted = await store.admit([RateCheck("rl:t:req", 60), window], hold_s=30, now=now)
    assert await raw.type("lim:rl:t:req") == b"hash"
    assert 1000 < await raw.pttl("lim:rl:t:req") <= 1000 + 5000  # full again in 1 s, plus the skew margin
    assert await raw.type("lim:budget:t:day") == b"hash"
    assert 3_590_000 < await raw.pttl("lim:budget:t:day") <= 3_600_000
    assert await raw.zcard("lim:budget:t:day:holds") == 1
    assert await raw.pttl("lim:budget:t:day:holds") <= 35_000
    assert await store.scan("") == []  # `get`, `scan` and MGET never see limit state
    await store.settle(admitted.hold, 42, now=now)
    assert await raw.hget("lim:budget:t:day", "s") == b"42"
    assert await raw.exists("lim:budget:t:day:holds") == 0  # the last hold left: the ZSET went with it


async def test_the_scripts_survive_a_script_flush(store: RedisStore, raw: aioredis.Redis) -> None:
    window = BudgetCheck("budget:f", 1000, 100, time.time() + 60)
    first = await store.admit([window])
    await raw.script_flush()
    second = await store.admit([window])
    await raw.script_flush()
    await store.settle(first.hold, 10)
    assert second.results[0].held == 200


async def test_a_missing_holds_zset_means_nothing_is_held(store: RedisStore, raw: aioredis.Redis) -> None:
    window = BudgetCheck("budget:evicted", 1000, 600, time.time() + 60)
    await store.admit([window])
    await raw.delete("lim:budget:evicted:holds")  # evicted, or expired with its holds
    assert (await store.admit([window])).allowed  # the stale running total does not count
