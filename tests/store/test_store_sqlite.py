"""What only sqlite:/// promises: several processes on one file, a lock-free read path, maintenance."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.store import StoreError
from gateway.store.sqlite import SQLiteStore
from gateway.store.sqlite_session import Worker

# A worker process: waits for the common start time, then races the others on one file.
WORKER = """
import asyncio, sys, time
from gateway.store.sqlite import SQLiteStore
from gateway.store.sqlite_session import Worker

async def main(path, start_at, rounds):
    store = SQLiteStore(path)
    await store.ping()
    time.sleep(max(0.0, start_at - time.time()))
    won = 0
    for i in range(rounds):
        await store.incr("counter")
        await store.incr("windowed", 2, ttl_s=60)
        won += await store.add(f"once:{i}", b"x")
    await store.publish("done", f"{won}".encode())
    await store.aclose()
    print(won)

asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
"""


def spawn_worker(path: Path, start_at: float, rounds: int) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", WORKER, str(path), str(start_at), str(rounds)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def finish(process: subprocess.Popen[str]) -> str:
    out, err = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 0, err
    return out


async def test_incr_and_add_are_atomic_across_processes(tmp_path: Path) -> None:
    path, rounds = tmp_path / "shared.db", 300
    store = SQLiteStore(str(path))
    await store.ping()  # creates the file before the race
    start_at = time.time() + 1.0
    workers = [spawn_worker(path, start_at, rounds) for _ in range(2)]
    async with store.subscribe("done") as done:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        won_here = 0
        for i in range(rounds):
            await store.incr("counter")
            won_here += await store.add(f"once:{i}", b"x")
            if i % 50 == 0:
                await asyncio.sleep(0)
        outputs = [await finish(worker) for worker in workers]
        reported = sorted([await asyncio.wait_for(anext(done), 5), await asyncio.wait_for(anext(done), 5)])
    assert await store.get("counter") == str(3 * rounds).encode()
    assert await store.get("windowed") == str(2 * 2 * rounds).encode()
    won = [int(out) for out in outputs]
    assert won_here + sum(won) == rounds  # every key created exactly once
    assert reported == sorted(str(n).encode() for n in won)  # published from another process
    await store.aclose()


async def test_a_write_waits_for_another_writer_while_reads_go_on(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.set("k", b"before")
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    writing = asyncio.create_task(store.incr("n"))
    await asyncio.sleep(0.2)
    assert not writing.done()
    assert await store.get("k") == b"before"  # WAL: readers never wait for the writer
    other.execute("COMMIT")
    assert await asyncio.wait_for(writing, 5) == 1
    other.close()
    await store.aclose()


async def test_a_write_gives_up_after_busy_timeout(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"), busy_timeout_s=0.2)
    await store.ping()
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="locked"):
        await store.set("k", b"v")
    other.execute("ROLLBACK")
    other.close()
    await store.set("k", b"v")
    await store.aclose()


async def test_point_reads_and_writes_stay_on_the_event_loop_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"), maintenance_interval_s=3600)
    await store.set("k", b"v")  # the first write schedules maintenance on the worker...
    await store.scan("")  # ...which is over once this, queued behind it, has run

    def no_thread(*args: object) -> None:
        raise AssertionError("went to the worker thread")

    monkeypatch.setattr(Worker, "submit", no_thread)
    assert await store.get("k") == b"v"
    assert await store.add("new", b"v") is True
    assert await store.incr("n") == 1
    assert await store.delete("k") is True
    monkeypatch.undo()
    await store.aclose()


async def test_maintenance_purges_expired_keys_and_old_events(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(str(path), maintenance_interval_s=0, event_retention_s=0.1)
    await store.set("short", b"x", ttl_s=0.1)
    await store.set("long", b"y", ttl_s=60)
    await store.publish("c", b"old")
    await asyncio.sleep(0.2)
    await store.set("trigger", b"z")  # a write schedules maintenance on the worker thread...
    await store.scan("")  # ...which runs before this scan, queued behind it on the same thread
    raw = sqlite3.connect(path)
    assert [key for (key,) in raw.execute("SELECT key FROM kv ORDER BY key")] == ["long", "trigger"]
    assert raw.execute("SELECT count(*) FROM events").fetchone() == (0,)
    assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    raw.close()
    await store.aclose()


async def test_data_survives_a_restart_and_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "gateway.db"
    store = SQLiteStore(str(path))
    await store.set("tenant:acme", b"{}")
    await store.incr("n", 3)
    await store.aclose()
    reopened = SQLiteStore(str(path))
    assert await reopened.scan("") == [("n", b"3"), ("tenant:acme", b"{}")]
    await reopened.aclose()


async def test_an_unusable_path_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    store = SQLiteStore(str(tmp_path / "file" / "gateway.db"))
    with pytest.raises(StoreError, match="SQLite store"):
        await store.ping()
    await store.aclose()
