"""Properties of the limit primitives, on the reference backend (every backend computes the same: tests/store)."""

from __future__ import annotations

import asyncio
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.store.limits import BudgetCheck, BudgetResult, Hold, RateCheck, now_ms
from gateway.store.memory import MemoryStore

T0 = 2_000_000_000.0


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(1, 50),
    burst=st.integers(1, 100),
    period_s=st.sampled_from([1.0, 60.0]),
    calls=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 60)), min_size=1, max_size=60),
)
def test_a_bucket_never_admits_more_than_burst_plus_rate_in_any_window(
    limit: int, burst: int, period_s: float, calls: list[tuple[int, int]]
) -> None:
    """In every interval [t_i, t_j], admitted units <= burst + limit x (t_j - t_i) / period."""

    async def run() -> list[tuple[int, int]]:
        store, now, admitted = MemoryStore(), T0, []
        for gap_ms, cost in calls:
            now += gap_ms / 1000
            check = RateCheck("rl", limit, cost, period_s, burst)
            if (await store.admit([check], now=now)).allowed:
                admitted.append((now_ms(now), cost))
        return admitted

    admitted = asyncio.run(run())
    period_ms = round(period_s * 1000)
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, cost in admitted[i:]:
            total += cost
            assert total * period_ms <= burst * period_ms + (end - start) * limit


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(1, 10_000),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("admit"), st.integers(0, 3000)),
            st.tuples(st.just("settle"), st.integers(0, 100)),  # a share of its hold, in %
            st.tuples(st.just("crash"), st.integers(0, 3000)),
            st.tuples(st.just("wait"), st.integers(0, 3000)),  # ms
        ),
        max_size=60,
    ),
)
def test_a_budget_is_never_overshot_by_settlements_within_their_holds(limit: int, steps: list[tuple[str, int]]) -> None:
    """spent + held <= limit after every step, when each request costs at most its hold and settles in time."""
    hold_s = 1.0

    async def run() -> None:
        store, now = MemoryStore(), T0
        window = BudgetCheck("budget", limit, 0, T0 + 86400)
        live: list[tuple[Hold, int, float]] = []  # (hold, amount, admitted at)
        for action, value in steps:
            live = [entry for entry in live if entry[2] + hold_s > now + 0.001]  # settle only while held
            if action == "wait":
                now += value / 1000
            elif action in ("admit", "crash"):
                check = BudgetCheck("budget", limit, value, window.expires_at)
                admitted = await store.admit([check], hold_s=hold_s, now=now)
                if admitted.hold is not None and action == "admit":
                    live.append((admitted.hold, value, now))
            elif live:
                hold, amount, _ = live.pop(0)
                await store.settle(hold, math.floor(amount * value / 100), now=now)
            (state,) = (await store.admit([window], now=now)).results
            assert isinstance(state, BudgetResult)
            assert state.spent + state.held <= limit

    asyncio.run(run())
