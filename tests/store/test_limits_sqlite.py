"""What only sqlite:/// promises for `admit` and `settle`: one transaction, correct across processes on one file."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.store.limits import BudgetCheck, BudgetResult, RateCheck
from gateway.store.sqlite import SQLiteStore

# A worker process: waits for the common start time, then races the others on one file, all at one `now`.
WORKER = """
import asyncio, sys, time
from gateway.store.limits import BudgetCheck, RateCheck
from gateway.store.sqlite import SQLiteStore

async def main(path, start_at, now, rounds):
    store = SQLiteStore(path)
    await store.ping()
    time.sleep(max(0.0, start_at - time.time()))
    rate = budget = 0
    for _ in range(rounds):
        rate += (await store.admit([RateCheck("rl:shared", 40)], now=now)).allowed
        budget += (await store.admit([BudgetCheck("budget:shared", 3000, 100, now + 86400)], now=now)).allowed
    await store.aclose()
    print(rate, budget)

asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
"""


async def test_admit_is_atomic_across_processes(tmp_path: Path) -> None:
    path, rounds, now = tmp_path / "shared.db", 60, math.ceil(time.time()) + 1
    store = SQLiteStore(str(path))
    await store.ping()
    start_at = time.time() + 1.0
    args = [str(path), str(start_at), str(now), str(rounds)]
    command = [sys.executable, "-c", WORKER, *args]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    await asyncio.sleep(max(0.0, start_at - time.time()))
    rate = budget = 0
    for _ in range(rounds):
        rate += (await store.admit([RateCheck("rl:shared", 40)], now=now)).allowed
        budget += (await store.admit([BudgetCheck("budget:shared", 3000, 100, now + 86400)], now=now)).allowed
    for worker in workers:
        out, err = await asyncio.to_thread(worker.communicate, timeout=60)
        assert worker.returncode == 0, err
        rate_there, budget_there = map(int, out.split())
        rate, budget = rate + rate_there, budget + budget_there
    assert (rate, budget) == (40, 30)  # of 180 tries each
    probe = await store.admit([BudgetCheck("budget:shared", 3000, 0, now + 86400)], now=now)
    assert probe.results == (BudgetResult(True, 0, 3000),)
    await store.aclose()


async def test_admit_and_settle_stay_on_the_event_loop_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"), maintenance_interval_s=3600)
    await store.set("k", b"v")  # the first write schedules maintenance on the worker...
    await store.scan("")  # ...which is over once this, queued behind it, has run

    async def no_thread(*args: object) -> None:
        raise AssertionError("went to the worker thread")

    monkeypatch.setattr(store, "_in_worker", no_thread)
    admitted = await store.admit([RateCheck("rl:x", 10), BudgetCheck("budget:x", 1000, 10, time.time() + 60)])
    assert admitted.allowed
    await store.settle(admitted.hold, 5, [RateCheck("rl:x", 10, cost=-1)])
    monkeypatch.undo()
    await store.aclose()


async def test_admit_waits_for_another_writer(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.ping()
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    admitting = asyncio.create_task(store.admit([RateCheck("rl:w", 1)]))
    await asyncio.sleep(0.2)
    assert not admitting.done()
    other.execute("COMMIT")
    assert (await asyncio.wait_for(admitting, 5)).allowed
    assert not (await store.admit([RateCheck("rl:w", 1)])).allowed  # the first one was applied once
    other.close()
    await store.aclose()


async def test_maintenance_purges_lapsed_limit_rows(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(str(path), maintenance_interval_s=0)
    past = time.time() - 3600  # everything it writes lapsed long ago
    checks = [RateCheck("rl:old", 10), BudgetCheck("budget:old", 100, 10, past + 1)]
    await store.admit(checks, hold_s=1, now=past)  # a hold that lapsed
    await store.settle((await store.admit(checks[1:], hold_s=1, now=past)).hold, 5, now=past)  # spend
    await store.set("trigger", b"z")  # a write schedules maintenance on the worker thread...
    await store.scan("")  # ...which runs before this scan, queued behind it on the same thread
    raw = sqlite3.connect(path)
    counts = [raw.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ("rate", "spend", "holds")]  # noqa: S608
    assert counts == [0, 0, 0]
    raw.close()
    await store.aclose()
