#!/usr/bin/env python3
"""Measure the limit primitives (`Store.admit`, `Store.settle`) on memory://, sqlite:/// and Redis.

For each backend: microseconds per `admit` of a request with the tenant's limits (2 rate buckets and
2 budget windows: 4 checks) and with the key's too (8 checks), and per `settle` of the latter (its 4
windows and a token correction), one call at a time (the latency a request pays), with 0 and 1000
other requests in flight holding budget in the same windows.

`--concurrent N[,M...]` measures throughput instead, as the gateway loads the store: N tasks, each
looping `admit` then `settle` for `--seconds` on one shared store, for a request with the tenant's
limits (4 checks; settle: 2 windows and a token correction) and with the key's too (8 checks; 4
windows). It reports admit+settle pairs per second, the wall-clock microseconds per pair (1e6 / pairs
per second) and the CPU this process spent per pair (all its threads; not Redis's). Concurrent calls
share a store round trip (gateway/store/coalesce.py), so the cost per pair falls as N grows. CPU is
the steadier figure on a busy machine.

    .venv/bin/python benchmarks/limits_admit.py [--redis-url redis://127.0.0.1:PORT/0] [--uvloop]
    .venv/bin/python benchmarks/limits_admit.py --concurrent 1,16 --uvloop

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


async def pairs(store: Store, scopes: list[str], deadline: float) -> int:
    """Admit then settle, again and again until `deadline`; the number of pairs done."""
    request = checks(scopes, time.time() + 86400)
    correction = [RateCheck(f"rl:{scopes[0]}:tok", 10**8, -200)]
    done = 0
    while time.perf_counter() < deadline:
        admitted = await store.admit(request)
        await store.settle(admitted.hold, 4000, correction)
        done += 1
    return done


async def concurrent(name: str, factory: Callable[[], Store], tasks: int, scopes: list[str], seconds: float) -> str:
    store = factory()
    await store.ping()
    await asyncio.gather(*(pairs(store, scopes, time.perf_counter() + 0.3) for _ in range(tasks)))  # warm up
    started, cpu = time.perf_counter(), time.process_time()
    done = sum(await asyncio.gather(*(pairs(store, scopes, started + seconds) for _ in range(tasks))))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await store.aclose()
    rate = done / elapsed
    checks = 4 * len(scopes)
    return f"| {name} | {tasks} | {checks} | {rate:,.0f} | {1e6 / rate:.0f} | {cpu / done * 1e6:.0f} |"


async def main(redis_url: str | None, rounds: int, tasks: list[int], seconds: float) -> None:
    server = None
    if redis_url is None:
        from redis_server import start_redis_server

        server = start_redis_server(Path(tempfile.mkdtemp()) / "redis")
        redis_url = server.url
    columns = (
        ["tasks", "checks", "admit+settle pairs/s", "µs per pair", "CPU µs per pair"]
        if tasks
        else ["in flight", "admit, 4 checks (µs)", "admit, 8 checks (µs)", "settle, 4 windows + 1 bucket (µs)"]
    )
    print("| backend | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    try:
        with tempfile.TemporaryDirectory() as directory:
            prefixes = iter(range(100))
            backends: list[tuple[str, Callable[[], Store]]] = [
                ("memory", MemoryStore),
                ("sqlite", lambda: open_store(f"sqlite:///{directory}/limits-{next(prefixes)}.db")),
                ("redis", lambda: RedisStore(str(redis_url), prefix=f"bench{next(prefixes)}:")),
            ]
            for name, factory in backends:
                for n in tasks:
                    for scopes in (["tenant:acme"], ["tenant:acme", "key:acme/k1"]):
                        print(await concurrent(name, factory, n, scopes, seconds), flush=True)
                for row in [] if tasks else await measure(name, factory, rounds):
                    print(row, flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as `gateway serve` does")
    parser.add_argument("--concurrent", default="", metavar="N[,M...]", help="throughput of N tasks instead")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each --concurrent run lasts")
    options = parser.parse_args()
    if options.uvloop:
        import uvloop

        uvloop.install()
    tasks = [int(n) for n in options.concurrent.split(",") if n]
    asyncio.run(main(options.redis_url, options.rounds, tasks, options.seconds))
