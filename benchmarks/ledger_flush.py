#!/usr/bin/env python3
"""Measure the spend ledger (gateway/cost/ledger.py) on memory://, sqlite:/// and Redis.

For each backend: the cost of one flush (`Store.add_counts`) of 1, 100 and 1000 groups; the cost of
`record()` on the request path; and the latency a response pays when it awaits its record's commit
(group commit), with 1 and 200 concurrent requests, with the store writes per second that causes.

    .venv/bin/python benchmarks/ledger_flush.py [--redis-url redis://127.0.0.1:PORT/0]

Without --redis-url it starts a throwaway redis-server on a free port (tests/redis_server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gateway.cost.ledger import Ledger, UsageRecord  # noqa: E402
from gateway.store import Store, open_store  # noqa: E402
from gateway.store.memory import MemoryStore  # noqa: E402
from gateway.store.redis import RedisStore  # noqa: E402


def record(n: int) -> UsageRecord:
    return UsageRecord(
        "acme", f"k{n % 10}", f"user-{n}", "gpt-4o-mini", date(2030, 1, 1), 1200, 200, 300, 0, 420, False
    )


async def flush_cost(store: Store, groups: int, rounds: int = 30) -> float:
    """Median milliseconds of one flush of `groups` distinct (key, user, model) groups."""
    ledger = Ledger(store)
    times = []
    for round_ in range(rounds):
        for n in range(groups):
            ledger.record(record(round_ * 100_000 + n))
        started = time.perf_counter()
        await ledger.flush()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def record_cost(store: Store, calls: int = 100_000) -> float:
    """Microseconds per `record()` (no I/O)."""
    ledger = Ledger(store)
    records = [record(n % 1000) for n in range(calls)]
    started = time.perf_counter()
    for rec in records:
        ledger.record(rec)
    return (time.perf_counter() - started) / calls * 1e6


async def durable_latency(store: Store, clients: int, seconds: float = 2.0) -> tuple[float, float, float]:
    """p50 and p99 milliseconds of `await ledger.record(...)`, and store writes per second."""
    writes = 0
    original = store.add_counts

    async def counting(*args: object) -> bool:
        nonlocal writes
        writes += 1
        return await original(*args)  # type: ignore[arg-type]

    store.add_counts = counting  # type: ignore[method-assign]
    ledger = Ledger(store)
    ledger.start()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(index: int) -> None:
        n = index
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            assert await ledger.record(record(n))
            latencies.append(time.perf_counter() - started)
            n += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    await ledger.aclose()
    store.add_counts = original  # type: ignore[method-assign]
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    return p50 * 1000, p99 * 1000, writes / seconds


async def measure(name: str, factory: Callable[[], Store]) -> None:
    store = factory()
    flushes = [await flush_cost(store, groups) for groups in (1, 100, 1000)]
    per_record = record_cost(store)
    durable = [await durable_latency(store, clients) for clients in (1, 200)]
    await store.aclose()
    print(
        f"| {name} | {flushes[0]:.2f} | {flushes[1]:.2f} | {flushes[2]:.1f} | {per_record:.2f} | "
        + " | ".join(f"{p50:.1f} / {p99:.1f} ms, {wps:.0f} writes/s" for p50, p99, wps in durable)
        + " |"
    )


async def main(redis_url: str) -> None:
    print("| backend | flush 1 group (ms) | 100 groups | 1000 groups | record() (us) | awaited, 1 | awaited, 200 |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        await measure("memory", MemoryStore)
        await measure("sqlite", lambda: open_store(f"sqlite:///{directory}/ledger.db"))
        await measure("redis", lambda: RedisStore(redis_url, prefix="ledgerbench:"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="a Redis to use (default: start a throwaway redis-server)")
    args = parser.parse_args()
    if args.redis_url:
        asyncio.run(main(args.redis_url))
    else:
        from redis_server import start_redis_server

        with tempfile.TemporaryDirectory() as redis_dir:
            server = start_redis_server(Path(redis_dir))
            try:
                asyncio.run(main(server.url))
            finally:
                server.stop()
