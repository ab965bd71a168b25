"""The Store contract (gateway/store/base.py), run against memory://, sqlite:/// and a real Redis.

TTLs run on a fake clock for memory:// and on short real ones (<= 0.3 s) for SQLite and Redis.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.store import Store, StoreError, Subscription

from .support import Backend


async def receive(subscription: Subscription, timeout_s: float = 5.0) -> bytes:
    return await asyncio.wait_for(anext(subscription), timeout_s)


async def nothing_arrives(subscription: Subscription, within_s: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(subscription), within_s)


# get / set / delete


async def test_get_set_overwrite(store: Store) -> None:
    assert await store.get("tenant:acme") is None
    await store.set("tenant:acme", b'{"v": 1}')
    assert await store.get("tenant:acme") == b'{"v": 1}'
    await store.set("tenant:acme", b'{"v": 2}')
    assert await store.get("tenant:acme") == b'{"v": 2}'
    await store.set("empty", b"")
    assert await store.get("empty") == b""
    await store.set("binary", bytes(range(256)))
    assert await store.get("binary") == bytes(range(256))


async def test_set_with_ttl_expires(backend: Backend, store: Store) -> None:
    await store.set("session", b"x", ttl_s=0.2)
    await store.set("forever", b"y")
    assert await store.get("session") == b"x"
    await backend.sleep(0.3)
    assert await store.get("session") is None
    assert await store.get("forever") == b"y"
    assert await store.scan("") == [("forever", b"y")]


async def test_set_without_ttl_clears_an_earlier_ttl(backend: Backend, store: Store) -> None:
    await store.set("k", b"1", ttl_s=0.2)
    await store.set("k", b"2")
    await backend.sleep(0.3)
    assert await store.get("k") == b"2"


@pytest.mark.parametrize("ttl_s", [0, -1, 0.0])
async def test_ttl_must_be_positive(store: Store, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        await store.set("k", b"v", ttl_s=ttl_s)
    with pytest.raises(ValueError, match="ttl_s"):
        await store.add("k", b"v", ttl_s=ttl_s)
    with pytest.raises(ValueError, match="ttl_s"):
        await store.incr("k", ttl_s=ttl_s)
    assert await store.get("k") is None


async def test_delete_says_whether_the_key_existed(backend: Backend, store: Store) -> None:
    assert await store.delete("nope") is False
    await store.set("k", b"v")
    assert await store.delete("k") is True
    assert await store.delete("k") is False
    assert await store.get("k") is None
    await store.set("short", b"v", ttl_s=0.1)
    await backend.sleep(0.2)
    assert await store.delete("short") is False  # an expired key is absent


# add


async def test_add_creates_only_if_absent(store: Store) -> None:
    assert await store.add("lock", b"first") is True
    assert await store.add("lock", b"second") is False
    assert await store.get("lock") == b"first"
    assert await store.delete("lock") is True
    assert await store.add("lock", b"third") is True
    assert await store.get("lock") == b"third"


async def test_add_treats_an_expired_key_as_absent(backend: Backend, store: Store) -> None:
    assert await store.add("lease", b"old", ttl_s=0.1) is True
    assert await store.add("lease", b"blocked") is False
    await backend.sleep(0.2)
    assert await store.add("lease", b"new") is True
    assert await store.get("lease") == b"new"
    await backend.sleep(0.2)
    assert await store.get("lease") == b"new"  # the old TTL went with the old value


async def test_add_with_ttl_expires(backend: Backend, store: Store) -> None:
    assert await store.add("lease", b"x", ttl_s=0.2) is True
    await backend.sleep(0.3)
    assert await store.get("lease") is None


async def test_add_is_atomic_under_concurrency(backend: Backend) -> None:
    replicas = [backend.open() for _ in range(2)]
    results = await asyncio.gather(
        *(replicas[i % 2].add("idempotency:abc", f"request-{i}".encode(), ttl_s=30) for i in range(50))
    )
    assert results.count(True) == 1
    winner = results.index(True)
    assert await replicas[0].get("idempotency:abc") == f"request-{winner}".encode()


# incr


async def test_incr_counts_from_zero(store: Store) -> None:
    assert await store.incr("hits") == 1
    assert await store.incr("hits") == 2
    assert await store.incr("hits", 40) == 42
    assert await store.incr("hits", -50) == -8
    assert await store.get("hits") == b"-8"
    assert await store.incr("tokens", 0) == 0


async def test_incr_continues_a_set_integer(store: Store) -> None:
    await store.set("n", b"10")
    assert await store.incr("n", 5) == 15


async def test_incr_refuses_a_non_integer(store: Store) -> None:
    await store.set("doc", b'{"a": 1}')
    with pytest.raises(StoreError, match="integer"):
        await store.incr("doc")
    assert await store.get("doc") == b'{"a": 1}'


async def test_incr_is_atomic_under_concurrency(backend: Backend) -> None:
    replicas = [backend.open() for _ in range(2)]
    results = await asyncio.gather(*(replicas[i % 2].incr("rpm:acme", 1, ttl_s=60) for i in range(100)))
    assert sorted(results) == list(range(1, 101))
    assert await replicas[1].get("rpm:acme") == b"100"
    amounts = await asyncio.gather(*(replicas[i % 2].incr("tpm:acme", i) for i in range(100)))
    assert max(amounts) == sum(range(100))


async def test_incr_ttl_is_set_on_create_and_never_extended(backend: Backend, store: Store) -> None:
    assert await store.incr("window", 1, ttl_s=0.3) == 1
    await backend.sleep(0.2)
    assert await store.incr("window", 1, ttl_s=0.3) == 2  # would move expiry to 0.5 s if extended
    await backend.sleep(0.15)
    assert await store.get("window") is None  # expired at 0.3 s, with its window
    assert await store.incr("window", 5, ttl_s=0.3) == 5  # an expired counter starts again
    await backend.sleep(0.2)
    assert await store.get("window") == b"5"


async def test_incr_ttl_does_not_touch_an_existing_counter_without_ttl(backend: Backend, store: Store) -> None:
    await store.incr("total")
    await store.incr("total", ttl_s=0.1)
    await backend.sleep(0.2)
    assert await store.get("total") == b"2"


# scan


async def test_scan_returns_live_keys_with_the_prefix_sorted(backend: Backend, store: Store) -> None:
    for key in ["a:2", "a:1", "ab:1", "a", "b:1", "a:10", "A:1"]:
        await store.set(key, key.encode())
    await store.set("a:expiring", b"x", ttl_s=0.1)
    await backend.sleep(0.2)
    assert await store.scan("a:") == [("a:1", b"a:1"), ("a:10", b"a:10"), ("a:2", b"a:2")]
    assert [key for key, _ in await store.scan("a")] == ["a", "a:1", "a:10", "a:2", "ab:1"]
    assert [key for key, _ in await store.scan("")] == ["A:1", "a", "a:1", "a:10", "a:2", "ab:1", "b:1"]
    assert await store.scan("c") == []


async def test_scan_takes_glob_characters_literally(store: Store) -> None:
    keys = ["x*1", "x?2", "x[3]", "x]4", "x\\5", "x^6", "xa7", "x-8", "x%9", "x_10"]
    for key in keys:
        await store.set(key, b"v")
    assert [key for key, _ in await store.scan("x*")] == ["x*1"]
    assert [key for key, _ in await store.scan("x?")] == ["x?2"]
    assert [key for key, _ in await store.scan("x[")] == ["x[3]"]
    assert [key for key, _ in await store.scan("x[3")] == ["x[3]"]
    assert [key for key, _ in await store.scan("x]")] == ["x]4"]
    assert [key for key, _ in await store.scan("x\\")] == ["x\\5"]
    assert [key for key, _ in await store.scan("x^")] == ["x^6"]
    assert [key for key, _ in await store.scan("x%")] == ["x%9"]
    assert [key for key, _ in await store.scan("x_")] == ["x_10"]
    assert [key for key, _ in await store.scan("x")] == sorted(keys)


async def test_scan_handles_non_ascii_keys(store: Store) -> None:
    keys = ["ü:1", "u:1", "日本:1", "z:1", "\U0001f600:1", "ü:2"]
    for key in keys:
        await store.set(key, key.encode())
    assert [key for key, _ in await store.scan("")] == sorted(keys)
    assert await store.scan("ü") == [("ü:1", "ü:1".encode()), ("ü:2", "ü:2".encode())]


# publish / subscribe


async def test_publish_reaches_subscribers_of_the_channel_in_order(store: Store) -> None:
    async with store.subscribe("keys") as first, store.subscribe("keys") as second, store.subscribe("other") as other:
        for message in (b"one", b"two", b"three"):
            await store.publish("keys", message)
        assert [await receive(first) for _ in range(3)] == [b"one", b"two", b"three"]
        assert [await receive(second) for _ in range(3)] == [b"one", b"two", b"three"]
        await nothing_arrives(other)


async def test_subscribe_sees_only_what_is_published_after_it(store: Store) -> None:
    await store.publish("keys", b"before")
    async with store.subscribe("keys") as subscription:
        await store.publish("keys", b"after")
        assert await receive(subscription) == b"after"
        await nothing_arrives(subscription)


async def test_publish_reaches_another_replica(backend: Backend) -> None:
    if backend.name == "memory":
        pytest.skip("memory:// is process-local by design")
    listener, speaker = backend.open(), backend.open()
    async with listener.subscribe("invalidate") as subscription:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await speaker.publish("invalidate", b"tenant:acme")
        assert await receive(subscription) == b"tenant:acme"
        assert loop.time() - started < 1.0
        await speaker.publish("invalidate", b"tenant:beta")
        assert await receive(subscription) == b"tenant:beta"


async def test_subscription_works_without_async_with(store: Store) -> None:
    subscription = store.subscribe("c")
    waiting = asyncio.create_task(receive(subscription))
    await asyncio.sleep(0.2)  # let it go live
    await store.publish("c", b"hi")
    assert await waiting == b"hi"
    await subscription.aclose()
    await subscription.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(subscription)


async def test_closing_a_subscription_ends_a_pending_read(store: Store) -> None:
    async with store.subscribe("c") as subscription:
        waiting = asyncio.create_task(anext(subscription))
        await asyncio.sleep(0.05)
        await subscription.aclose()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, 5)
    messages = [message async for message in subscription]
    assert messages == []


async def test_closing_the_store_ends_its_subscriptions(store: Store) -> None:
    subscription = store.subscribe("c")
    await subscription.__aenter__()

    async def consume() -> list[bytes]:
        return [message async for message in subscription]

    consumer = asyncio.create_task(consume())
    await store.publish("c", b"last")
    await asyncio.sleep(0.3)
    await store.aclose()
    assert await asyncio.wait_for(consumer, 5) == [b"last"]


# lifecycle


async def test_ping_and_aclose_is_idempotent_and_the_store_reopens(backend: Backend, store: Store) -> None:
    await store.ping()
    await store.set("k", b"v")
    await store.aclose()
    await store.aclose()
    assert await store.get("k") == b"v"  # later calls reconnect
    await store.ping()


async def test_url_is_safe_to_show(store: Store) -> None:
    assert "://" in store.url
    assert "@" not in store.url
