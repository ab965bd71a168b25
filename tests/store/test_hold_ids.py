"""Hold ids: a random prefix per process and a counter, so no system call per hold, unique across processes."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from gateway.store.limits import new_hold_id

FORK = """
import os
from gateway.store.limits import new_hold_id
print(new_hold_id(), flush=True)
child = os.fork()
if child == 0:
    print(new_hold_id(), flush=True)
    os._exit(0)
os.waitpid(child, 0)
print(new_hold_id(), flush=True)
"""


def test_hold_ids_are_unique_without_drawing_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_entropy(*args: object) -> bytes:
        raise AssertionError("drew randomness for a hold id")

    monkeypatch.setattr(os, "urandom", no_entropy)
    monkeypatch.setattr(secrets, "token_hex", no_entropy)
    ids = [new_hold_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert len({hold_id[:16] for hold_id in ids}) == 1  # one prefix, drawn once
    assert all(":" not in hold_id for hold_id in ids)  # Redis members are "amount:id"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_process_and_forked_child_draws_a_prefix_of_its_own() -> None:
    runs = [subprocess.run([sys.executable, "-c", FORK], capture_output=True, text=True, check=True) for _ in range(2)]
    ids = [hold_id for run in runs for hold_id in run.stdout.split()]
    assert len(ids) == 6
    parent_before, child, parent_after = ids[:3]
    assert parent_before[:16] == parent_after[:16]
    assert child[:16] != parent_before[:16]
    prefixes = {hold_id[:16] for hold_id in ids} | {new_hold_id()[:16]}
    assert len(prefixes) == 5  # two processes, two children, and this one
