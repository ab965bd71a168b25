"""What only redis:// promises: prefixed keys and channels, server-side TTLs, errors without passwords."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from redis_server import free_port

from gateway.store import StoreError, open_store
from gateway.store.redis import RedisStore, glob_escape


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def open_redis(redis_url: str) -> AsyncIterator[Callable[..., RedisStore]]:
    """RedisStore(redis_url, ...) on the test server, closed after the test whatever happens."""
    opened: list[RedisStore] = []

    def open_(url: str = redis_url, prefix: str = "gw:") -> RedisStore:
        opened.append(RedisStore(url, prefix=prefix))
        return opened[-1]

    yield open_
    for store in opened:
        await store.aclose()


async def test_an_unreachable_redis_is_a_store_error_without_the_password() -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    store = open_store(url)
    assert store.url == url.replace("s3cret-pw", "***")
    attempts: list[Callable[[], Awaitable[object]]] = [
        store.ping,
        lambda: store.get("k"),
        lambda: store.incr("k", ttl_s=1),
        lambda: store.scan(""),
        lambda: store.publish("c", b"m"),
    ]
    for attempt in attempts:
        with pytest.raises(StoreError) as caught:
            await attempt()
        assert "s3cret-pw" not in str(caught.value)
        assert store.url in str(caught.value)
    with pytest.raises(StoreError) as caught:
        async with store.subscribe("c"):
            pass
    assert "s3cret-pw" not in str(caught.value)
    await store.aclose()
    await store.aclose()


async def test_a_refused_password_is_a_store_error_without_the_password(
    redis_url: str, open_redis: Callable[..., RedisStore]
) -> None:
    store = open_redis(redis_url.replace("redis://", "redis://someone:wr0ng-pw@"))
    with pytest.raises(StoreError) as caught:
        await store.ping()
    assert "wr0ng-pw" not in str(caught.value)
    assert "someone:***@" in str(caught.value)


async def test_keys_and_channels_carry_the_prefix(open_redis: Callable[..., RedisStore], raw: aioredis.Redis) -> None:
    store = open_redis()  # the default prefix
    await store.set("prefix-test", b"v")
    assert await raw.get("gw:prefix-test") == b"v"
    async with store.subscribe("prefix-channel"):
        assert await raw.pubsub_numsub("gw:prefix-channel") == [(b"gw:prefix-channel", 1)]
    assert await store.delete("prefix-test") is True


async def test_prefixes_with_glob_characters_keep_stores_apart(open_redis: Callable[..., RedisStore]) -> None:
    stores = {prefix: open_redis(prefix=prefix) for prefix in ["p*:", "p?:", "pa:", "p[a]:", "p\\:"]}
    for prefix, store in stores.items():
        await store.set("k", prefix.encode())
    for prefix, store in stores.items():
        assert await store.scan("") == [("k", prefix.encode())]


async def test_ttls_live_in_redis(open_redis: Callable[..., RedisStore], raw: aioredis.Redis) -> None:
    store = open_redis(prefix="ttl:")
    await store.incr("window", ttl_s=30)
    await store.incr("window", ttl_s=90)
    assert 29_000 < await raw.pttl("ttl:window") <= 30_000
    await store.incr("plain")
    assert await raw.pttl("ttl:plain") == -1
    await store.set("tiny", b"v", ttl_s=0.0001)  # rounds up to 1 ms, never to "no TTL"
    assert await raw.pttl("ttl:tiny") in (-2, 0, 1)


async def test_the_incr_script_survives_a_script_flush(
    open_redis: Callable[..., RedisStore], raw: aioredis.Redis
) -> None:
    store = open_redis(prefix="flush:")
    assert await store.incr("n", ttl_s=10) == 1
    await raw.script_flush()
    assert await store.incr("n", ttl_s=10) == 2


def test_glob_escape() -> None:
    assert glob_escape("a*b?c[d]e\\f^g-h") == "a\\*b\\?c\\[d\\]e\\\\f^g-h"
