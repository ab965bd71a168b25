"""What only redis:// promises for `admit` and `settle`: registered scripts, hashes that expire, no Python RMW."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis_server import free_port

from gateway.store import StoreError
from gateway.store.limits import Admission, BudgetCheck, BudgetResult, RateCheck
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


# coalescing: the calls of one event-loop iteration go as one script call (a pipeline past 64)


async def test_a_call_that_fails_in_redis_fails_alone(store: RedisStore, raw: aioredis.Redis) -> None:
    await raw.set("lim:rl:not-a-hash", "x")  # WRONGTYPE for the bucket's HMGET
    now = time.time()
    outcomes = await asyncio.gather(
        store.admit([RateCheck("rl:fine", 10)], now=now),
        store.admit([RateCheck("rl:not-a-hash", 10)], now=now),
        store.admit([RateCheck("rl:fine", 10)], now=now),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], StoreError)
    assert "WRONGTYPE" in str(outcomes[1])
    assert [o.allowed for o in outcomes if isinstance(o, Admission)] == [True, True]
    assert (await store.admit([RateCheck("rl:fine", 10, cost=0)], now=now)).results[0].remaining == 8


async def test_an_unreachable_redis_fails_every_call_of_a_batch() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", prefix="lim:")
    window = BudgetCheck("budget:x", 1000, 1, time.time() + 60)
    outcomes = await asyncio.gather(*(store.admit([window]) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(o, StoreError) and "Redis store" in str(o) for o in outcomes), outcomes
    await store.aclose()


async def test_a_batch_past_64_calls_keeps_call_order_across_a_script_flush(
    store: RedisStore, raw: aioredis.Redis
) -> None:
    now = time.time()
    window = BudgetCheck("budget:big", 1000, 7, now + 60)
    await raw.script_flush()  # every chunk of the pipeline meets NOSCRIPT, then goes again
    outcomes = await asyncio.gather(*(store.admit([window], now=now) for _ in range(200)))
    assert [o.allowed for o in outcomes] == [True] * 142 + [False] * 58
    assert [o.results[0] for o in outcomes[141:143]] == [BudgetResult(True, 0, 994), BudgetResult(False, 0, 994)]


async def test_aclose_sends_what_is_queued(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="lim-close:")
    await store.ping()
    now = time.time()
    queued = [asyncio.create_task(store.admit([RateCheck("rl:q", 10)], now=now)) for _ in range(4)]
    await asyncio.sleep(0)  # the tasks queue their calls; the batch has not gone yet
    await store.aclose()
    assert all(task.done() and task.result().allowed for task in queued)
    assert (await store.admit([RateCheck("rl:q", 10, cost=0)], now=now)).results[0].remaining == 6  # reconnects
    await store.aclose()
