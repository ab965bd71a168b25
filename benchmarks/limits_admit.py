#!/usr/bin/env python3
"""Measure the limit primitives (`Store.admit`, `Store.settle`) on memory://, sqlite:/// and Redis.

For each backend: microseconds per `admit` of a request with the tenant's limits (2 rate buckets and
2 budget windows: 4 checks) and with the key's too (8 checks), and per `settle` of the latter (its 4
windows and a token correction), one call at a time (the latency a request pays), with 0 and 1000
other requests in flight holding budget in the same windows.

    .venv/bin/python benchmarks/limits_admit.py [--redis-url redis://127.0.0.1:PORT/0] [--uvloop]

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gateway.store import Store, open_store  # noqa: E402
from gateway.store.limits import BudgetCheck, LimitCheck, RateCheck  # noqa: E402
from gateway.store.memory import MemoryStore  # noqa: E402
from gateway.store.redis import RedisStore  # noqa: E402

BIG = 10**12  # budgets that never refuse


def checks(scopes: list[str], expires_at: float) -> list[LimitCheck]:
    found: list[LimitCheck] = []
    for scope in scopes:
        found += [RateCheck(f"rl:{scope}:req", 10**6), RateCheck(f"rl:{scope}:tok", 10**8, 700)]
        found += [BudgetCheck(f"budget:{scope}:{p}", BIG, 5000, expires_at, BIG // 2) for p in ("day", "month")]
    return found


async def per_call(store: Store, scopes: list[str], rounds: int) -> tuple[float, float]:
    """Median over 5 batches of the mean microseconds of one admit, and of one settle, each awaited alone."""
    request = checks(scopes, time.time() + 86400)
    correction = [RateCheck(f"rl:{scopes[0]}:tok", 10**8, -200)]
    admits, settles = [], []
    for _ in range(5):
        admit_s = settle_s = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            admitted = await store.admit(request)
            between = time.perf_counter()
            await store.settle(admitted.hold, 4000, correction)
            admit_s, settle_s = admit_s + between - started, settle_s + time.perf_counter() - between
        admits.append(admit_s / rounds * 1e6)
        settles.append(settle_s / rounds * 1e6)
    return statistics.median(admits), statistics.median(settles)


async def measure(name: str, factory: Callable[[], Store], rounds: int) -> list[str]:
    rows = []
    for in_flight in (0, 1000):
        store = factory()
        await store.ping()
        for i in range(in_flight):  # other requests holding budget in the same windows, never settled
            await store.admit(checks(["tenant:acme", "key:acme/k1"], time.time() + 86400)[2:4], hold_s=3600)
            if i % 100 == 0:
                await asyncio.sleep(0)
        await per_call(store, ["tenant:acme"], rounds // 10)  # warm up
        tenant, _ = await per_call(store, ["tenant:acme"], rounds)
        both, settle = await per_call(store, ["tenant:acme", "key:acme/k1"], rounds)
        rows.append(f"| {name} | {in_flight} | {tenant:.0f} | {both:.0f} | {settle:.0f} |")
        await store.aclose()
    return rows


async def main(redis_url: str | None, rounds: int) -> None:
    server = None
    if redis_url is None:
        from redis_server import start_redis_server

        server = start_redis_server(Path(tempfile.mkdtemp()) / "redis")
        redis_url = server.url
    print("| backend | in flight | admit, 4 checks (µs) | admit, 8 checks (µs) | settle, 4 windows + 1 bucket (µs) |")
    print("|---|---|---|---|---|")
    try:
        with tempfile.TemporaryDirectory() as directory:
            prefixes = iter(range(100))
            backends: list[tuple[str, Callable[[], Store]]] = [
                ("memory", MemoryStore),
                ("sqlite", lambda: open_store(f"sqlite:///{directory}/limits-{next(prefixes)}.db")),
                ("redis", lambda: RedisStore(str(redis_url), prefix=f"bench{next(prefixes)}:")),
            ]
            for name, factory in backends:
                for row in await measure(name, factory, rounds):
                    print(row, flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as `gateway serve` does")
    options = parser.parse_args()
    if options.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(options.redis_url, options.rounds))
