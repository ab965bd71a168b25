"""The spend ledger on memory://, sqlite:/// and a real Redis: batching, group commit, retries, restarts, kills."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from redis_server import INSTALL_HINT, RedisServer, redis_server_binary, start_redis_server

from gateway.cost.ledger import METRICS, Ledger, LedgerRow, Totals, UsageRecord, aggregate, nano_usd, usd_text
from gateway.store import Store, StoreError, open_store
from gateway.store.base import CountBatch
from gateway.store.memory import MemoryStore

DAY = date(2030, 1, 1)
NEXT_DAY = date(2030, 1, 2)
_prefixes = itertools.count()


def rec(**fields: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "tenant": "acme",
        "key_id": "k1",
        "user": None,
        "model": "gpt-4o-mini",
        "day": DAY,
        "prompt_tokens": 10,
        "cached_tokens": 2,
        "completion_tokens": 5,
        "reasoning_tokens": 1,
        "cost_nano": 1000,
        "estimated": False,
    }
    return UsageRecord(**{**base, **fields})


def expected_totals(records: list[UsageRecord]) -> Totals:
    totals = Totals()
    for record in records:
        totals.add_record(record)
    return totals


def summed(rows: list[LedgerRow]) -> Totals:
    totals = Totals()
    for row in rows:
        totals.add(row.totals)
    return totals


@dataclass
class Stores:
    """Opens store instances on one shared state (the same file, the same Redis prefix), like replicas."""

    name: str
    url: str
    factory: Callable[[], Store]
    opened: list[Store] = field(default_factory=list)

    def open(self) -> Store:
        store = self.factory()
        self.opened.append(store)
        return store


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = redis_server_binary()
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = start_redis_server(tmp_path_factory.mktemp("redis"), binary=binary)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    if request.param == "memory":
        memory = MemoryStore()
        chosen = Stores("memory", "memory://", lambda: memory)
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'gateway.db'}"
        chosen = Stores("sqlite", url, lambda: open_store(url))
    else:
        from gateway.store.redis import RedisStore

        url, prefix = request.getfixturevalue("redis_server").url, f"ledgertest{next(_prefixes)}:"
        chosen = Stores("redis", url, lambda: RedisStore(url, prefix=prefix))
    try:
        yield chosen
    finally:
        for store in chosen.opened:
            await store.aclose()


class Spy:
    """A store that counts `add_counts` calls and can fail them before or after applying the batch."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls = 0
        self.fail: str | None = None  # "before": nothing applied; "after": applied, but the reply is lost

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def add_counts(self, writer: str, seq: int, counts: CountBatch) -> bool:
        self.calls += 1
        if self.fail == "before":
            raise StoreError("store down")
        applied = await self.store.add_counts(writer, seq, counts)
        if self.fail == "after":
            raise StoreError("connection lost before the reply")
        return applied


def spy(store: Store) -> Any:
    return Spy(store)


async def eventually(check: Callable[[], Any], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# batching and reading


async def test_records_are_summed_per_group_and_written_in_one_call(stores: Stores) -> None:
    store = spy(stores.open())
    ledger = Ledger(store)
    records = [
        rec(tenant=tenant, key_id=key, user=user, model=model, day=day, prompt_tokens=n, cost_nano=n * 7)
        for n, (tenant, key, user, model, day) in enumerate(
            list(itertools.product(["acme", "beta"], ["k1", "k2"], [None, "alice"], ["m1", "m2"], [DAY, NEXT_DAY])) * 3
        )
    ]
    for record in records:
        ledger.record(record)
    assert store.calls == 0  # nothing on the request path
    await ledger.flush()
    assert store.calls == 1
    await ledger.flush()
    assert store.calls == 1  # nothing left: no write
    rows = await ledger.read(None, DAY, NEXT_DAY)
    assert len(rows) == 32
    assert summed(rows) == expected_totals(records)
    for row in rows:
        group = (row.tenant, row.day, row.key_id, row.user, row.model)
        assert row.totals == expected_totals(
            [r for r in records if (r.tenant, r.day, r.key_id, r.user, r.model) == group]
        )
    assert summed(await ledger.read(["acme"], DAY, DAY)) == expected_totals(
        [r for r in records if r.tenant == "acme" and r.day == DAY]
    )
    assert await ledger.read(["nobody"], DAY, NEXT_DAY) == []
    assert await ledger.read(None, date(2029, 1, 1), date(2029, 12, 31)) == []


async def test_unpriced_requests_are_counted_and_left_out_of_the_cost(stores: Stores) -> None:
    ledger = Ledger(stores.open())
    ledger.record(rec(cost_nano=1500))
    ledger.record(rec(cost_nano=None))
    ledger.record(rec(cost_nano=None, estimated=True))
    ledger.record(rec(cost_nano=0))
    await ledger.flush()
    totals = summed(await ledger.read(["acme"], DAY, DAY))
    assert (totals.requests, totals.cost_nano, totals.unpriced_requests, totals.priced_requests) == (4, 1500, 2, 2)
    assert totals.estimated_requests == 1


async def test_names_with_separators_round_trip(stores: Stores) -> None:
    ledger = Ledger(stores.open())
    odd = rec(tenant="a:b", key_id="k|1%7C", user="u|%25|x", model="m%|")
    ledger.record(odd)
    ledger.record(rec(user=""))  # an empty user is no user
    ledger.record(rec(user="\ud800é"))  # a lone surrogate cannot be stored, so it becomes "?"
    await ledger.flush()
    rows = {(r.key_id, r.user, r.model) for r in await ledger.read(["a:b", "acme"], DAY, DAY)}
    assert rows == {("k|1%7C", "u|%25|x", "m%|"), ("k1", None, "gpt-4o-mini"), ("k1", "?é", "gpt-4o-mini")}


async def test_the_flusher_writes_on_its_interval_and_only_when_needed(stores: Stores) -> None:
    store = spy(stores.open())
    ledger = Ledger(store, flush_interval_s=0.02)
    ledger.start()
    try:
        await asyncio.sleep(0.1)
        assert store.calls == 0  # idle: no writes
        ledger.record(rec())
        ledger.record(rec())
        await eventually(lambda: _requests(ledger, 2))
        assert store.calls == 1
    finally:
        await ledger.aclose()


async def _requests(ledger: Ledger, expected: int) -> bool:
    return summed(await ledger.read(None, DAY, NEXT_DAY)).requests == expected


async def test_a_full_batch_is_written_at_once(stores: Stores) -> None:
    store = spy(stores.open())
    ledger = Ledger(store, flush_interval_s=60, max_batch=10)
    ledger.start()
    try:
        for _ in range(9):
            ledger.record(rec())
        await asyncio.sleep(0.05)
        assert store.calls == 0
        ledger.record(rec())
        await eventually(lambda: _requests(ledger, 10))
    finally:
        await ledger.aclose()


async def test_awaiting_a_record_commits_it_with_its_neighbours(stores: Stores) -> None:
    store = spy(stores.open())
    ledger = Ledger(store, flush_interval_s=60, commit_delay_s=0.01)
    ledger.start()
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(_record_and_wait(ledger, rec(user=f"u{i}")) for i in range(200)))
        assert all(results)
        assert time.perf_counter() - started < 2.0
        assert store.calls <= 3  # one group commit (maybe split by timing), not one write per request
        assert summed(await ledger.read(["acme"], DAY, DAY)).requests == 200
    finally:
        await ledger.aclose()


async def _record_and_wait(ledger: Ledger, record: UsageRecord) -> bool:
    await asyncio.sleep(0)
    return await asyncio.wait_for(ledger.record(record), 5)


async def test_a_waiter_cancelled_by_its_timeout_leaves_the_record_to_be_written(stores: Stores) -> None:
    store = spy(stores.open())
    store.fail = "before"
    ledger = Ledger(store, flush_interval_s=0.01, commit_delay_s=0.001)
    ledger.start()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ledger.record(rec()), 0.1)
        store.fail = None
        await eventually(lambda: _requests(ledger, 1))
    finally:
        await ledger.aclose()


# nothing lost, nothing twice


@pytest.mark.parametrize("failure", ["before", "after"])
async def test_a_failed_flush_is_retried_without_counting_twice(stores: Stores, failure: str) -> None:
    store = spy(stores.open())
    ledger = Ledger(store)
    first = [rec(prompt_tokens=n) for n in range(5)]
    for record in first:
        ledger.record(record)
    store.fail = failure
    with pytest.raises(StoreError):
        await ledger.flush()
    with pytest.raises(StoreError):
        await ledger.flush()  # still down: the same batch, the same number
    later = [rec(prompt_tokens=100, model="m2")]
    ledger.record(later[0])
    assert ledger.pending_records == 6
    store.fail = None
    await ledger.flush()
    assert ledger.pending_records == 0
    assert summed(await ledger.read(["acme"], DAY, DAY)) == expected_totals(first + later)


async def test_concurrent_records_flushes_and_replicas_lose_nothing(stores: Stores) -> None:
    ledgers = [Ledger(stores.open(), flush_interval_s=0.005, commit_delay_s=0.001) for _ in range(3)]
    for ledger in ledgers:
        ledger.start()
    records: list[UsageRecord] = []

    async def client(index: int) -> None:
        ledger = ledgers[index % len(ledgers)]
        for n in range(40):
            record = rec(key_id=f"k{index % 4}", user=f"u{n % 3}", prompt_tokens=n, cost_nano=None if n % 7 == 0 else n)
            records.append(record)
            waiter = ledger.record(record)
            if n % 5 == 0:
                assert await waiter
            if n % 11 == 0:
                await ledger.flush()  # a manual flush racing the flusher
            await asyncio.sleep(0)

    await asyncio.gather(*(client(i) for i in range(30)))
    for ledger in ledgers:
        await ledger.aclose()
    assert summed(await ledgers[0].read(None, DAY, DAY)) == expected_totals(records)


async def test_records_written_before_close_survive_a_restart(stores: Stores) -> None:
    ledger = Ledger(stores.open())
    ledger.start()
    before = [rec(), rec(user="alice", cost_nano=None)]
    for record in before:
        ledger.record(record)
    await ledger.aclose()  # writes what is left
    await stores.opened[0].aclose()

    restarted = Ledger(stores.open())  # a new process: a new store instance, a new writer
    assert summed(await restarted.read(None, DAY, DAY)) == expected_totals(before)
    after = [rec(prompt_tokens=1000)]
    restarted.record(after[0])
    await restarted.flush()
    assert summed(await restarted.read(["acme"], DAY, DAY)) == expected_totals(before + after)


async def test_what_cannot_be_written_at_close_is_reported_lost(
    stores: Stores, caplog: pytest.LogCaptureFixture
) -> None:
    store = spy(stores.open())
    store.fail = "before"
    ledger = Ledger(store)
    waiter = ledger.record(rec())
    with caplog.at_level(logging.ERROR, "gateway.ledger"):
        await ledger.aclose(attempts=2)
    assert await waiter is False
    assert "1 usage records could not be written" in caplog.text
    with caplog.at_level(logging.ERROR, "gateway.ledger"):
        assert await ledger.record(rec()) is False  # too late: said at once, never a hang
    assert "after the ledger closed" in caplog.text


# helpers


def test_aggregate_groups_and_sorts() -> None:
    rows = [
        LedgerRow("acme", NEXT_DAY, "k2", "bob", "m1", Totals(requests=1)),
        LedgerRow("acme", DAY, "k1", None, "m2", Totals(requests=2)),
        LedgerRow("beta", DAY, "k1", "alice", "m1", Totals(requests=4)),
    ]
    assert [(k, t.requests) for k, t in aggregate(rows, ["day"])] == [((DAY,), 6), ((NEXT_DAY,), 1)]
    assert [(k, t.requests) for k, t in aggregate(rows, ["user"])] == [((None,), 2), (("alice",), 4), (("bob",), 1)]
    assert [k for k, _ in aggregate(rows, ["tenant", "model"])] == [("acme", "m1"), ("acme", "m2"), ("beta", "m1")]
    with pytest.raises(ValueError, match="cannot group by"):
        aggregate(rows, ["colour"])


def test_money_helpers() -> None:
    assert usd_text(0) == "0.000000000"
    assert usd_text(1_234_567) == "0.001234567"
    assert usd_text(12 * 10**9 + 5) == "12.000000005"
    assert nano_usd(None) is None
    assert nano_usd(Decimal("0.000000001")) == 1
    assert nano_usd(Decimal("0.0000000015")) == 2  # half-even
    assert nano_usd(Decimal("0.0000000025")) == 2
    assert nano_usd(Decimal("1.5")) == 1_500_000_000


def test_totals_values_follow_metrics() -> None:
    totals = Totals(*range(1, 9))
    assert totals.values() == tuple(getattr(totals, name) for name in METRICS) == tuple(range(1, 9))


def test_records_refuse_negative_numbers() -> None:
    with pytest.raises(ValueError, match="negative"):
        rec(prompt_tokens=-1)
    with pytest.raises(ValueError, match="negative"):
        rec(cost_nano=-5)
    assert replace(rec(), cost_nano=None).cost_nano is None


# killed under load, then restarted

_CHILD = """
import asyncio, sys
from datetime import date
from gateway.cost.ledger import Ledger, UsageRecord
from gateway.store import open_store

async def main(url, prefix, workers, total):
    store = open_store(url)
    if prefix:
        from gateway.store.redis import RedisStore
        store = RedisStore(url, prefix=prefix)
    ledger = Ledger(store, flush_interval_s=0.05, commit_delay_s=0.005)
    ledger.start()
    issued = 0

    async def worker(n):
        nonlocal issued
        while total == 0 or issued < total:
            issued += 1
            record = UsageRecord("acme", f"k{n % 3}", None, "m", date(2030, 1, 1), 1, 0, 1, 0, 1, False)
            sys.stdout.write("i\\n"); sys.stdout.flush()
            assert await ledger.record(record)
            sys.stdout.write("a\\n"); sys.stdout.flush()

    await asyncio.gather(*(worker(n) for n in range(workers)))
    await ledger.aclose()
    await store.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


def _child(url: str, prefix: str, total: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, prefix, "50", str(total)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_killed_under_load_then_restarted_the_ledger_holds_what_clients_got(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        url, prefix = f"sqlite:///{tmp_path / 'gateway.db'}", ""
        store: Store = open_store(url)
    else:
        from gateway.store.redis import RedisStore

        url, prefix = request.getfixturevalue("redis_server").url, f"killtest{next(_prefixes)}:"
        store = RedisStore(url, prefix=prefix)
    try:
        child = _child(url, prefix, 0)
        assert child.stdout is not None
        acked = issued = 0
        while acked < 1500:  # under load: 50 concurrent requests, each waiting for its commit
            line = child.stdout.readline()
            assert line, "the child died"
            issued += line == b"i\n"
            acked += line == b"a\n"
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
        child.stdout.close()
        child.wait()
        issued += rest.count(b"i\n")
        acked += rest.count(b"a\n")
        ledger = Ledger(store)
        requests = summed(await ledger.read(["acme"], DAY, DAY)).requests
        assert acked <= requests <= issued  # nothing acknowledged is lost, nothing is counted twice

        restarted = _child(url, prefix, 500)  # restarts, serves 500 requests, shuts down cleanly
        out, _ = restarted.communicate(timeout=60)
        assert restarted.returncode == 0
        assert out.count(b"a\n") == 500
        after = summed(await ledger.read(["acme"], DAY, DAY))
        assert after.requests == requests + 500
        assert after.prompt_tokens == after.requests == after.cost_nano
    finally:
        await store.aclose()
