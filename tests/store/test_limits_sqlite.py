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

from gateway.store import StoreError
from gateway.store.limits import Admission, BudgetCheck, BudgetResult, RateCheck, RateResult, Settlement
from gateway.store.sqlite import SQLiteStore
from gateway.store.sqlite_session import Session, Worker

# A worker process: waits for the common start time, then races the others on one file, all at one `now`.
WORKER = """
import asyncio, sys, time
from gateway.store.limits import BudgetCheck, RateCheck
from gateway.store.sqlite import SQLiteStore
from gateway.store.sqlite_session import Session, Worker

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

    def no_thread(*args: object) -> None:
        raise AssertionError("went to the worker thread")

    monkeypatch.setattr(Worker, "submit", no_thread)
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


# coalescing: the calls of one event-loop iteration share one transaction


async def test_a_failed_transaction_fails_every_call_of_its_batch(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(str(path))
    await store.ping()
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("CREATE TRIGGER refuse BEFORE INSERT ON holds BEGIN SELECT RAISE(ABORT, 'no holds today'); END")
    now = time.time()
    window = BudgetCheck("budget:t", 1000, 10, now + 60)
    outcomes = await asyncio.gather(
        store.admit([RateCheck("rl:t", 10)], now=now),  # would pass alone...
        store.admit([window], now=now),  # ...but this one's hold fails the transaction
        store.admit([RateCheck("rl:t", 10)], now=now),
        return_exceptions=True,
    )
    assert all(isinstance(o, StoreError) and "no holds today" in str(o) for o in outcomes), outcomes
    assert len({id(o) for o in outcomes}) == 3  # each caller its own exception
    raw.execute("DROP TRIGGER refuse")
    raw.close()
    probe = await store.admit([RateCheck("rl:t", 10, cost=0), BudgetCheck("budget:t", 1000, 0, now + 60)], now=now)
    assert probe.results == (RateResult(True, 10, 0, None), BudgetResult(True, 0, 0))  # nothing was applied
    await store.aclose()


async def test_an_invalid_call_fails_alone_at_once(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.ping()
    now = time.time()
    outcomes = await asyncio.gather(
        store.admit([RateCheck("rl:v", 10)], now=now),
        store.admit([RateCheck("rl:v", 10, cost=-1)], now=now),  # ValueError, before it joins the batch
        store.admit([RateCheck("rl:v", 10)], now=now),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], ValueError)
    assert [o.allowed for o in outcomes if isinstance(o, Admission)] == [True, True]
    await store.aclose()


async def test_a_batch_reads_and_writes_each_row_once(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"), maintenance_interval_s=3600)
    await store.ping()
    now = time.time()
    checks = [RateCheck("rl:a", 1000), RateCheck("rl:b", 1000), BudgetCheck("budget:a", 10**6, 5, now + 60)]
    held = [(await store.admit(checks, now=now)).hold for _ in range(5)]
    session = store._session
    assert session is not None
    assert session.conn is not None
    statements: list[str] = []
    session.conn.set_trace_callback(statements.append)
    outcomes = await asyncio.gather(
        *(store.admit(checks, now=now) for _ in range(30)), *(store.settle(hold, 3, now=now) for hold in held)
    )
    session.conn.set_trace_callback(None)
    assert all(isinstance(o, Settlement) or o.allowed for o in outcomes)

    def count(prefix: str) -> int:
        return sum(statement.startswith(prefix) for statement in statements)

    assert count("BEGIN") == count("COMMIT") == 1
    assert count("SELECT level, at, expires_at FROM rate") == 2  # each bucket read once...
    assert count("INSERT INTO rate") == 2  # ...and written once
    assert count("SELECT spent, held, alerted, expires_at FROM spend") == 1
    assert count("INSERT INTO spend") == 1
    assert count("INSERT OR REPLACE INTO holds") == 30  # holds: a row per request
    assert count("DELETE FROM holds") == 5
    raw = sqlite3.connect(tmp_path / "s.db")
    assert raw.execute("SELECT spent, held FROM spend").fetchone() == (15, 150)
    assert raw.execute("SELECT count(*), sum(amount) FROM holds").fetchone() == (30, 150)
    raw.close()
    await store.aclose()


async def test_a_batch_that_finds_the_file_locked_reruns_whole_on_the_worker(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.ping()
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    now = time.time()
    first = asyncio.gather(*(store.admit([RateCheck("rl:l", 10)], now=now) for _ in range(15)))
    await asyncio.sleep(0.1)
    second = asyncio.gather(*(store.admit([RateCheck("rl:l", 10)], now=now) for _ in range(15)))  # waits behind
    await asyncio.sleep(0.1)
    assert not first.done()
    assert not second.done()
    other.execute("COMMIT")
    outcomes = [*await asyncio.wait_for(first, 5), *await asyncio.wait_for(second, 5)]
    assert [o.allowed for o in outcomes] == [True] * 10 + [False] * 20  # in call order, each applied once
    other.close()
    await store.aclose()


# aclose: each connection stays on its thread; calls in flight finish or fail clearly; nothing hangs


async def burst(store: SQLiteStore, done: list[str], errors: list[StoreError]) -> None:
    """Admit, read and settle until the store says it is closed; note each admit and settle that returned."""
    window = BudgetCheck("budget:burst", 10**12, 1, time.time() + 600)
    try:
        while True:
            admitted = await store.admit([RateCheck("rl:burst", 10**6), window])
            done.append("admit")
            await store.get("k")
            await store.settle(admitted.hold, 1)
            done.append("settle")
    except StoreError as exc:
        errors.append(exc)


async def test_aclose_during_a_burst_finishes_or_fails_every_call_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed under load at varied moments (a segfault or a hang before connections kept to their threads)."""
    seen = {"queued": 0, "on the worker": 0, "opening": 0}  # what aclose met (the worker: see the next test)
    close = Session.close

    def watched(session: Session) -> asyncio.Future[None]:
        seen["queued"] += bool(session.limits._queue)
        seen["on the worker"] += session._on_worker
        seen["opening"] += session._opening.locked()
        return close(session)

    monkeypatch.setattr(Session, "close", watched)
    store = SQLiteStore(str(tmp_path / "s.db"), maintenance_interval_s=0.01)  # batches often on the worker
    await store.set("k", b"v")
    done: list[str] = []
    for round_ in range(16):
        errors: list[StoreError] = []
        if round_ % 4 == 3:
            await store.aclose()  # the burst opens the connections anew, and is closed meanwhile
        tasks = [asyncio.create_task(burst(store, done, errors)) for _ in range(16)]
        target = 0 if round_ % 4 == 3 else len(done) + 50 * (round_ % 3 + 1)
        while len(done) < target:
            await asyncio.sleep(0)
        for _ in range(round_ % 5 or 1):
            await asyncio.sleep(0)
        if round_ % 4 == 2:
            await asyncio.sleep(0.002)
        await store.aclose()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)  # a hang guard, not a timing
        assert len(errors) == 16
        assert all("closed (aclose) before the operation ran" in str(e) for e in errors), errors
        assert await store.get("k") == b"v"  # the next call reopens
    await store.aclose()
    assert seen["queued"], seen
    assert seen["opening"], seen
    raw = sqlite3.connect(tmp_path / "s.db")
    holds = raw.execute("SELECT count(*) FROM holds").fetchone()[0]
    spent, held = raw.execute("SELECT spent, held FROM spend WHERE key = 'budget:burst'").fetchone()
    raw.close()
    # Exactly what the callers were told: every admit that returned holds 1 until a settle that returned
    # frees it and spends 1; a call that failed did nothing.
    assert spent == done.count("settle")
    assert held == holds == done.count("admit") - done.count("settle")


async def test_aclose_lets_a_batch_waiting_on_the_worker_finish(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.ping()
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    now = time.time()
    waiting = asyncio.gather(*(store.admit([RateCheck("rl:c", 5)], now=now) for _ in range(8)))
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(store.aclose())
    await asyncio.sleep(0.1)
    assert not closing.done()  # it waits for the worker's batch...
    with pytest.raises(StoreError, match="closed"):
        await store.get("k")  # ...and refuses new calls meanwhile
    other.execute("COMMIT")
    other.close()
    assert [o.allowed for o in await asyncio.wait_for(waiting, 5)] == [True] * 5 + [False] * 3
    await asyncio.wait_for(closing, 5)
    assert (await store.admit([RateCheck("rl:c", 5, cost=0)], now=now)).results[0].remaining == 0
    await store.aclose()


async def test_each_connection_is_confined_to_its_thread(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.ping()
    session = store._session
    assert session is not None
    loop_conn = session.conn
    assert loop_conn is not None
    with pytest.raises(sqlite3.ProgrammingError, match="thread"):
        await asyncio.to_thread(loop_conn.execute, "SELECT 1")
    worker_conn = await session.in_worker(lambda conn: conn)
    with pytest.raises(sqlite3.ProgrammingError, match="thread"):
        worker_conn.execute("SELECT 1")
    await store.aclose()
