"""The limit primitives of the Store contract (`admit`, `settle`), run against memory://, sqlite:/// and Redis.

Every call passes `now` explicitly (epoch seconds from the real clock, moved forward by the test), so
all three backends see the same times. "Replicas" are two store instances on one file or one prefix.
"""

from __future__ import annotations

import asyncio
import math
import random
import time

import pytest

from gateway.store import Store
from gateway.store.limits import (
    Admission,
    BudgetCheck,
    BudgetResult,
    LimitCheck,
    RateCheck,
    RateResult,
    Settlement,
)
from gateway.store.memory import MemoryStore

from .support import Backend, probe

DAY = 86400.0


@pytest.fixture
def t0() -> float:
    return math.ceil(time.time()) + 1  # whole seconds, ahead of the stores' own clocks


def budget(key: str = "b", limit: int = 1000, amount: int = 100, t0: float = 0.0, **extra: int) -> BudgetCheck:
    return BudgetCheck(key, limit, amount, (t0 or time.time()) + DAY, extra.get("alert_at"))


# rate buckets


async def test_a_bucket_admits_exactly_its_capacity_under_concurrency(backend: Backend, t0: float) -> None:
    replicas = [backend.open() for _ in range(2)]
    check = RateCheck("rl:tenant:acme:req", 10)  # 10 a minute, 10 at once
    admitted = await asyncio.gather(*(replicas[i % 2].admit([check], now=t0) for i in range(100)))
    assert sum(a.allowed for a in admitted) == 10
    later = await asyncio.gather(*(replicas[i % 2].admit([check], now=t0 + 6.0) for i in range(20)))
    assert sum(a.allowed for a in later) == 1  # one more every 6 s


async def test_a_bucket_reports_remaining_reset_and_retry_after(store: Store, t0: float) -> None:
    check = RateCheck("rl:k:req", 2)  # one every 30 s, two at once
    first = await store.admit([check], now=t0)
    assert first.results == (RateResult(True, 1, 30_000, None),)
    second = await store.admit([check], now=t0)
    assert second.results == (RateResult(True, 0, 60_000, None),)
    refused = await store.admit([check], now=t0 + 10)
    assert refused.allowed is False
    assert refused.results == (RateResult(False, 0, 50_000, 20_000),)
    assert refused.hold is None
    assert (await store.admit([check], now=t0 + 30)).results == (RateResult(True, 0, 60_000, None),)


async def test_tokens_take_their_cost_and_a_cost_above_the_burst_never_passes(store: Store, t0: float) -> None:
    tokens = RateCheck("rl:k:tok", 1000, cost=600)
    assert (await store.admit([tokens], now=t0)).results[0] == RateResult(True, 400, 36_000, None)
    refused = (await store.admit([tokens], now=t0)).results[0]
    assert refused == RateResult(False, 400, 36_000, 12_000)  # 200 more tokens drain in 12 s
    huge = RateCheck("rl:k:tok", 1000, cost=1001)
    assert (await store.admit([huge], now=t0 + 3600)).results[0].retry_after_ms is None


async def test_a_refused_call_changes_nothing(store: Store, t0: float) -> None:
    room = RateCheck("rl:room", 100, cost=5)
    full = budget("budget:full", limit=100, amount=100, t0=t0)
    assert (await store.admit([full], now=t0)).allowed
    checks: list[LimitCheck] = [room, budget("budget:full", limit=100, amount=1, t0=t0)]
    before = await probe(store, checks, t0)
    refused = await store.admit(checks, now=t0)
    assert refused.allowed is False
    assert refused.results[0].allowed is True  # the rate check alone would pass...
    assert refused.results[1] == BudgetResult(False, 0, 100)
    assert await probe(store, checks, t0) == before  # ...but took nothing


async def test_admit_is_all_or_nothing_across_checks(backend: Backend, t0: float) -> None:
    store = backend.open()
    rate = RateCheck("rl:a", 3)
    money = budget("budget:a", limit=1000, amount=400, t0=t0)
    results = [await store.admit([rate, money], now=t0) for _ in range(3)]
    assert [a.allowed for a in results] == [True, True, False]  # the budget refuses the third...
    assert await probe(store, [rate, money], t0) == (RateResult(True, 1, 40_000, None), BudgetResult(True, 0, 800))
    small = budget("budget:a", limit=1000, amount=100, t0=t0)
    assert (await store.admit([rate, small], now=t0)).allowed  # ...which left the rate bucket alone
    refused = await store.admit([rate, small], now=t0)  # now the bucket refuses: no hold is added
    assert refused.allowed is False
    assert await probe(store, [money], t0) == (BudgetResult(True, 0, 900),)


# budgets


async def test_concurrent_holds_never_overshoot_the_budget(backend: Backend, t0: float) -> None:
    replicas = [backend.open() for _ in range(2)]
    check = budget("budget:tenant:acme:day", limit=1000, amount=100, t0=t0)
    admitted = await asyncio.gather(*(replicas[i % 2].admit([check], now=t0) for i in range(50)))
    winners = [a for a in admitted if a.allowed]
    assert len(winners) == 10
    assert all(isinstance(r, BudgetResult) and r.spent + r.held <= 1000 for a in admitted for r in a.results)
    settled = await asyncio.gather(*(replicas[i % 2].settle(a.hold, 100, now=t0 + 1) for i, a in enumerate(winners)))
    assert sorted(s.spent[0] for s in settled) == list(range(100, 1001, 100))
    assert await probe(replicas[0], [check], t0 + 2) == (BudgetResult(False, 1000, 0),)
    assert not (await replicas[1].admit([check], now=t0 + 2)).allowed


async def test_settle_turns_the_hold_into_the_real_spend(store: Store, t0: float) -> None:
    check = budget("budget:s", limit=1000, amount=300, t0=t0)
    admitted = await store.admit([check], now=t0)
    assert admitted.hold is not None
    assert admitted.hold.budgets == (check,)
    assert admitted.results == (BudgetResult(True, 0, 300),)
    assert await store.settle(admitted.hold, 37, now=t0 + 1) == Settlement((37,), ())
    assert await probe(store, [check], t0 + 1) == (BudgetResult(True, 37, 0),)
    zero = await store.admit([check], now=t0 + 2)
    assert await store.settle(zero.hold, 0, now=t0 + 3) == Settlement((37,), ())  # a failed request: release only
    assert await probe(store, [check], t0 + 3) == (BudgetResult(True, 37, 0),)
    assert await store.settle(None, 0, now=t0) == Settlement((), ())


async def test_a_hold_lapses_after_hold_s(store: Store, t0: float) -> None:
    check = budget("budget:crash", limit=1000, amount=600, t0=t0)
    crashed = await store.admit([check], hold_s=1.0, now=t0)  # never settled: its replica died
    assert crashed.allowed
    assert not (await store.admit([check], now=t0 + 0.999)).allowed
    assert await probe(store, [check], t0 + 0.999) == (BudgetResult(True, 0, 600),)
    assert await probe(store, [check], t0 + 1.0) == (BudgetResult(True, 0, 0),)
    late = await store.admit([check], hold_s=1.0, now=t0 + 1.0)
    assert late.allowed
    await store.settle(crashed.hold, 250, now=t0 + 1.5)  # a settle after the lapse still counts the spend
    assert await probe(store, [check], t0 + 1.5) == (BudgetResult(True, 250, 600),)  # and keeps the live hold


async def test_a_budget_at_its_limit_refuses_even_a_free_request(store: Store, t0: float) -> None:
    check = budget("budget:z", limit=100, amount=100, t0=t0)
    await store.settle((await store.admit([check], now=t0)).hold, 100, now=t0)
    assert (await store.admit([budget("budget:z", limit=100, amount=0, t0=t0)], now=t0)).allowed is False


async def test_a_window_expires_with_its_counters(store: Store) -> None:
    now = time.time()
    check = BudgetCheck("budget:short", 1000, 0, now + 0.3)  # no hold: it would keep the window alive
    await store.settle((await store.admit([check], now=now)).hold, 100, now=now)
    await asyncio.sleep(0.4)  # real time: Redis expires keys on its own clock
    assert await probe(store, [check], time.time()) == (BudgetResult(True, 0, 0),)


async def test_alert_at_is_crossed_once_per_window(backend: Backend, t0: float) -> None:
    replicas = [backend.open() for _ in range(2)]
    check = budget("budget:alert:day1", limit=1000, amount=100, t0=t0, alert_at=800)
    holds = [(await replicas[0].admit([check], now=t0)).hold for _ in range(10)]
    settled = await asyncio.gather(*(replicas[i % 2].settle(h, 90, now=t0 + 1) for i, h in enumerate(holds)))
    crossed = [s for s in settled if s.alerts]
    assert len(crossed) == 1  # the settlement that brought spend to 810, on whichever replica
    assert crossed[0].alerts == (check,)
    assert crossed[0].spent == (810,)
    again = await replicas[1].admit([check], now=t0 + 2)
    assert (await replicas[1].settle(again.hold, 100, now=t0 + 2)).alerts == ()
    other_day = budget("budget:alert:day2", limit=1000, amount=100, t0=t0, alert_at=800)
    hold = (await replicas[0].admit([other_day], now=t0 + 3)).hold
    assert (await replicas[0].settle(hold, 800, now=t0 + 3)).alerts == (other_day,)


async def test_settle_corrects_the_token_bucket(store: Store, t0: float) -> None:
    tokens = RateCheck("rl:t:tok", 1000, cost=600)
    await store.admit([tokens], now=t0)
    await store.settle(None, 0, [RateCheck("rl:t:tok", 1000, cost=-500)], now=t0)  # used 100, not 600
    assert await probe(store, [tokens], t0) == (RateResult(True, 900, 6_000, None),)
    await store.settle(None, 0, [RateCheck("rl:t:tok", 1000, cost=1400)], now=t0)  # used 1500 in all: in debt
    refused = (await probe(store, [tokens], t0))[0]
    assert refused == RateResult(False, 0, 90_000, 30_000)
    await store.settle(None, 0, [RateCheck("rl:t:tok", 1000, cost=10**6)], now=t0)  # debt: one more burst at most
    assert await probe(store, [tokens], t0) == (RateResult(False, 0, 120_000, 60_000),)
    await store.settle(None, 0, [RateCheck("rl:new:tok", 1000, cost=-10)], now=t0)  # nothing to refund
    assert await probe(store, [RateCheck("rl:new:tok", 1000)], t0) == (RateResult(True, 1000, 0, None),)


async def test_invalid_checks_are_a_value_error(store: Store) -> None:
    with pytest.raises(ValueError, match="key of its own"):
        await store.admit([RateCheck("k", 1), RateCheck("k", 2)])
    with pytest.raises(ValueError, match="cost"):
        await store.admit([RateCheck("k", 1, cost=-1)])
    with pytest.raises(ValueError, match="hold_s"):
        await store.admit([budget()], hold_s=0)
    with pytest.raises(ValueError, match="2\\*\\*53"):
        await store.admit([BudgetCheck("b", 2**60, 1, time.time() + 60)])
    with pytest.raises(ValueError, match="spend"):
        await store.settle(None, -1)


# every backend computes what the reference computes


def _comparable(outcome: Admission | Settlement) -> object:
    if isinstance(outcome, Admission):
        return outcome.allowed, outcome.results, outcome.hold and outcome.hold.budgets
    return outcome


async def _random_run(store: Store, seed: int, t0: float) -> list[object]:
    rng = random.Random(seed)
    limits, periods, budgets, alerts = [3, 7, 60, 1000], [1.0, 60.0], [1000, 2500], [None, 900]
    rates = [RateCheck(f"rl:{seed}:{i}", rng.choice(limits), period_s=rng.choice(periods)) for i in range(3)]
    windows = [BudgetCheck(f"b:{seed}:{i}", rng.choice(budgets), 0, t0 + DAY, rng.choice(alerts)) for i in range(2)]
    holds, seen, now = [], [], t0
    for _ in range(200):
        now += rng.choice([0, 0, 0.001, 0.013, 0.5, 2.0])
        if holds and rng.random() < 0.3:
            settled = await store.settle(holds.pop(rng.randrange(len(holds))), rng.randrange(120), now=now)
            seen.append(_comparable(settled))
            continue
        checks: list[LimitCheck] = [
            RateCheck(r.key, r.limit, rng.choice([0, 1, 1, 2, r.limit // 4, r.limit + 1]), r.period_s)
            for r in rng.sample(rates, 2)
        ]
        checks += [
            BudgetCheck(w.key, w.limit, rng.randrange(150), w.expires_at, w.alert_at) for w in rng.sample(windows, 1)
        ]
        admitted = await store.admit(checks, hold_s=rng.choice([1.0, 5.0]), now=now)
        seen.append(_comparable(admitted))
        if admitted.hold is not None:
            holds.append(admitted.hold)
    return seen


async def test_every_backend_computes_what_the_reference_computes(store: Store, t0: float) -> None:
    for seed in range(3):
        reference = await _random_run(MemoryStore(), seed, t0 + seed * 1000)
        assert await _random_run(store, seed, t0 + seed * 1000) == reference
