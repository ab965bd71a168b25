"""Counter hashes (`Store.add_counts`, `Store.read_counts`) on memory://, sqlite:/// and a real Redis."""

from __future__ import annotations

import asyncio

from gateway.store import Store
from gateway.store.base import WRITER_TTL_S
from gateway.store.memory import MemoryStore

from .support import Backend, FakeClock


async def test_add_and_read(store: Store) -> None:
    assert await store.add_counts("w", 1, {"h1": {"a": 1, "b": 2}, "h2": {"a": 5}})
    assert await store.read_counts(["h1", "h2", "absent"]) == {"h1": {"a": 1, "b": 2}, "h2": {"a": 5}}
    assert await store.add_counts("w", 2, {"h1": {"a": 10, "c": 3}})
    assert await store.read_counts(["h1"]) == {"h1": {"a": 11, "b": 2, "c": 3}}
    assert await store.read_counts([]) == {}


async def test_a_batch_number_applies_at_most_once(store: Store) -> None:
    assert await store.add_counts("w", 1, {"h": {"n": 1}})
    assert not await store.add_counts("w", 1, {"h": {"n": 1}})  # a retry after a lost reply
    assert not await store.add_counts("w", 0, {"h": {"n": 100}})  # an older batch
    assert await store.add_counts("w", 2, {"h": {"n": 1}})
    assert await store.add_counts("other", 1, {"h": {"n": 1}})  # writers are independent
    assert await store.read_counts(["h"]) == {"h": {"n": 3}}


async def test_plain_keys_do_not_see_counters(store: Store) -> None:
    await store.set("k", b"v")
    assert await store.add_counts("w", 1, {"ledger:x": {"n": 1}})
    assert await store.scan("") == [("k", b"v")]


async def test_counts_are_exact_64_bit_integers(store: Store) -> None:
    big = 2**62
    assert await store.add_counts("w", 1, {"h": {"big": big, "neg": -5}})
    assert await store.add_counts("w", 2, {"h": {"big": 12345}})
    assert await store.read_counts(["h"]) == {"h": {"big": big + 12345, "neg": -5}}


async def test_any_text_in_keys_and_fields(store: Store) -> None:
    key, field = "ledger:ténant 1:2030-01-01", 'k|ü s€r %7C "q" \\ \n\t\x00 😀|m:*?[]|requests'
    assert await store.add_counts("w", 1, {key: {field: 7}})
    assert await store.read_counts([key]) == {key: {field: 7}}


async def test_a_large_batch_in_one_call(store: Store) -> None:
    counts = {f"h{h}": {f"f{f}": h * f + 1 for f in range(10)} for h in range(400)}
    assert await store.add_counts("w", 1, counts)
    assert await store.read_counts(list(counts)) == counts


async def test_concurrent_writers_on_replicas_lose_nothing(backend: Backend) -> None:
    replicas = [backend.open() for _ in range(4)]

    async def writer(index: int) -> None:
        store = replicas[index % len(replicas)]
        for seq in range(1, 11):
            assert await store.add_counts(f"w{index}", seq, {"h": {"n": 1, f"w{index}": seq}})

    await asyncio.gather(*(writer(i) for i in range(20)))
    counts = (await replicas[0].read_counts(["h"]))["h"]
    assert counts["n"] == 200
    assert all(counts[f"w{i}"] == 55 for i in range(20))


async def test_a_batch_sent_twice_at_once_applies_once(backend: Backend) -> None:
    first, second = backend.open(), backend.open()
    results = await asyncio.gather(*(store.add_counts("w", 1, {"h": {"n": 1}}) for store in [first, second] * 5))
    assert sorted(results) == [False] * 9 + [True]
    assert await first.read_counts(["h"]) == {"h": {"n": 1}}


async def test_counts_survive_a_new_store_instance(backend: Backend) -> None:
    first = backend.open()
    assert await first.add_counts("w", 1, {"h": {"n": 3}})
    await first.aclose()
    second = backend.open()
    assert await second.read_counts(["h"]) == {"h": {"n": 3}}
    assert not await second.add_counts("w", 1, {"h": {"n": 3}})  # the writer's last batch is remembered too


async def test_a_writer_is_forgotten_after_its_ttl() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    assert await store.add_counts("w", 5, {"h": {"n": 1}})
    clock.now += WRITER_TTL_S + 1
    assert await store.add_counts("w", 1, {"h": {"n": 1}})
    assert await store.read_counts(["h"]) == {"h": {"n": 2}}
