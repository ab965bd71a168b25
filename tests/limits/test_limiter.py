"""The limiter over a real store (memory://): scopes, headers, budgets over UTC windows, alerts, settlement."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from fake_clock import FakeClock

from gateway.config.schema import PolicyConfig
from gateway.context import Principal
from gateway.errors import BudgetExceeded, RateLimited
from gateway.limits import Limiter
from gateway.store.memory import MemoryStore

USD = 10**9


def principal(tenant: dict[str, Any] | None = None, key: dict[str, Any] | None = None, key_id: str = "k1") -> Principal:
    key_policy = None if key is None else PolicyConfig.model_validate(key)
    return Principal("acme", key_id, "default", PolicyConfig.model_validate(tenant or {}), key_policy=key_policy)


def cents(n: int) -> Any:
    return lambda output_tokens: n * USD // 100


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2030, 1, 30, 23, 59, 30, tzinfo=UTC))


@pytest.fixture
def limiter(clock: FakeClock) -> Limiter:
    return Limiter(MemoryStore(), clock=clock)


async def test_a_principal_without_limits_costs_no_store_call(clock: FakeClock) -> None:
    class NoStore(MemoryStore):
        async def admit(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("called the store")

    limiter = Limiter(NoStore(), clock=clock)
    grant = await limiter.admit(principal({"budget": {"alert_at": 0.5}}), tokens=10, worst_case_nano=cents(1))
    assert grant.headers == {}
    assert await limiter.settle(grant, tokens=5, cost_nano=3) == []


async def test_every_response_carries_openais_ratelimit_headers(limiter: Limiter) -> None:
    who = principal({"rate_limit": {"requests_per_minute": 60, "tokens_per_minute": 10_000}})
    grant = await limiter.admit(who, tokens=500, worst_case_nano=cents(1))
    assert grant.headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "9500",
        "x-ratelimit-reset-tokens": "3s",
    }


async def test_a_rate_limited_request_gets_retry_after(limiter: Limiter, clock: FakeClock) -> None:
    who = principal({"rate_limit": {"requests_per_minute": 2}})
    for _ in range(2):
        await limiter.admit(who, tokens=0, worst_case_nano=cents(1))
    clock.advance(10)
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(who, tokens=0, worst_case_nano=cents(1))
    assert caught.value.status == 429
    assert caught.value.response_headers() == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "50s",
        "retry-after": "20",
        "retry-after-ms": "20000",
    }
    assert "(tenant acme)" in caught.value.message
    clock.advance(20)
    await limiter.admit(who, tokens=0, worst_case_nano=cents(1))


async def test_the_stricter_of_key_and_policy_applies_each_on_its_own_counters(limiter: Limiter) -> None:
    tenant = {"rate_limit": {"requests_per_minute": 100}}
    strict_key = principal(tenant, {"rate_limit": {"requests_per_minute": 2}}, key_id="k1")
    other_key = principal(tenant, key_id="k2")
    for _ in range(2):
        grant = await limiter.admit(strict_key, tokens=0, worst_case_nano=cents(1))
    assert grant.headers["x-ratelimit-limit-requests"] == "2"  # the key's is the binding one
    with pytest.raises(RateLimited, match=r"\(API key k1\)"):
        await limiter.admit(strict_key, tokens=0, worst_case_nano=cents(1))
    grant = await limiter.admit(other_key, tokens=0, worst_case_nano=cents(1))
    assert grant.headers["x-ratelimit-remaining-requests"] == "97"  # the tenant counted k1's two, not the refusal


async def test_a_looser_key_limit_does_not_lift_the_policys(limiter: Limiter) -> None:
    loose_key = principal({"rate_limit": {"requests_per_minute": 1}}, {"rate_limit": {"requests_per_minute": 50}})
    await limiter.admit(loose_key, tokens=0, worst_case_nano=cents(1))
    with pytest.raises(RateLimited, match=r"\(tenant acme\)"):
        await limiter.admit(loose_key, tokens=0, worst_case_nano=cents(1))


async def test_budgets_count_in_utc_days_and_months(limiter: Limiter, clock: FakeClock) -> None:
    who = principal({"budget": {"usd_per_day": 1, "usd_per_month": 1.5}})
    grant = await limiter.admit(who, tokens=0, worst_case_nano=cents(70))  # Jan 30, 23:59:30
    await limiter.settle(grant, tokens=None, cost_nano=70 * USD // 100)
    with pytest.raises(BudgetExceeded, match=r"daily budget of \$1\.00 cannot cover"):
        await limiter.admit(who, tokens=0, worst_case_nano=cents(70))
    clock.advance(30)  # Jan 31, 00:00:00: a new day, the same month
    grant = await limiter.admit(who, tokens=0, worst_case_nano=cents(70))
    await limiter.settle(grant, tokens=None, cost_nano=70 * USD // 100)
    with pytest.raises(BudgetExceeded) as caught:
        await limiter.admit(who, tokens=0, worst_case_nano=cents(20))  # fits the day, not the month
    assert caught.value.message.startswith("tenant acme's monthly budget of $1.50 cannot cover")
    assert caught.value.response_headers() == {"x-should-retry": "false"}
    clock.advance(86400)  # Feb 1: both windows start over
    await limiter.admit(who, tokens=0, worst_case_nano=cents(70))


async def test_a_spent_budget_names_itself(limiter: Limiter) -> None:
    who = principal(key={"budget": {"usd_per_day": 5}})
    grant = await limiter.admit(who, tokens=0, worst_case_nano=cents(1))
    await limiter.settle(grant, tokens=None, cost_nano=5 * USD)
    with pytest.raises(BudgetExceeded) as caught:
        await limiter.admit(who, tokens=0, worst_case_nano=cents(1))
    assert caught.value.code == "insufficient_quota"
    assert (
        caught.value.message
        == "API key k1's daily budget of $5.00 is spent ($5.00); it resets at 2030-01-31T00:00:00Z."
    )


async def test_a_budget_refusal_wins_over_a_rate_limit_and_keeps_the_headers(limiter: Limiter) -> None:
    who = principal({"budget": {"usd_per_day": 1}, "rate_limit": {"requests_per_minute": 1}})
    await limiter.admit(who, tokens=0, worst_case_nano=cents(100))
    with pytest.raises(BudgetExceeded) as caught:  # the bucket refuses too, but waiting would not help
        await limiter.admit(who, tokens=0, worst_case_nano=cents(1))
    assert caught.value.headers["x-ratelimit-remaining-requests"] == "0"


async def test_the_hold_is_the_cost_of_max_tokens_capped_by_reserve_max_tokens(limiter: Limiter) -> None:
    asked: list[int] = []

    def worst_case(output_tokens: int) -> int:
        asked.append(output_tokens)
        return output_tokens

    tenant = {"budget": {"usd_per_day": 1, "reserve_max_tokens": 4096}}
    who = principal(tenant, {"budget": {"usd_per_month": 1, "reserve_max_tokens": 100}})
    grant = await limiter.admit(who, tokens=0, worst_case_nano=worst_case)
    assert asked == [4096, 100]
    assert grant.hold is not None
    assert [check.amount for check in grant.hold.budgets] == [4096, 100]
    asked.clear()
    await limiter.admit(who, tokens=0, worst_case_nano=worst_case, max_tokens=500)
    assert asked == [500, 100]


async def test_concurrent_requests_never_overshoot_a_budget(limiter: Limiter) -> None:
    who = principal({"budget": {"usd_per_day": 1}})
    outcomes = await asyncio.gather(
        *(limiter.admit(who, tokens=0, worst_case_nano=cents(10)) for _ in range(50)), return_exceptions=True
    )
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 10
    assert all(isinstance(o, BudgetExceeded) for o in outcomes if isinstance(o, BaseException))


async def test_alert_at_fires_once_per_window(limiter: Limiter, clock: FakeClock) -> None:
    url = "https://hooks.example.com/budget"
    who = principal({"budget": {"usd_per_day": 1, "alert_at": 0.8, "webhook_url": url}})

    async def spend(cost_cents: int) -> Sequence[Any]:
        grant = await limiter.admit(who, tokens=0, worst_case_nano=cents(cost_cents))
        return await limiter.settle(grant, tokens=None, cost_nano=cost_cents * USD // 100)

    assert await spend(50) == []
    (alert,) = await spend(35)
    assert (alert.who, alert.window.label, alert.spent_nano, alert.limit_nano) == (
        "tenant acme",
        "2030-01-30",
        85 * USD // 100,
        USD,
    )
    assert alert.webhook_url == url
    assert alert.message == (
        "tenant acme has spent $0.85 of its daily budget of $1.00 (85%, alert at 80%) in 2030-01-30"
    )
    assert await spend(10) == []
    clock.advance(60)  # the next day
    assert await spend(79) == []
    assert len(await spend(1)) == 1


async def test_settle_charges_the_real_tokens(limiter: Limiter) -> None:
    who = principal({"rate_limit": {"tokens_per_minute": 1000}})
    grant = await limiter.admit(who, tokens=600, worst_case_nano=cents(1))
    assert grant.headers["x-ratelimit-remaining-tokens"] == "400"
    await limiter.settle(grant, tokens=100, cost_nano=None)
    grant = await limiter.admit(who, tokens=0, worst_case_nano=cents(1))
    assert grant.headers["x-ratelimit-remaining-tokens"] == "900"


async def test_a_request_larger_than_tokens_per_minute_is_refused_for_good(limiter: Limiter) -> None:
    who = principal({"rate_limit": {"tokens_per_minute": 1000}})
    with pytest.raises(RateLimited, match="Request too large") as caught:
        await limiter.admit(who, tokens=1001, worst_case_nano=cents(1))
    assert caught.value.should_retry is False
    assert "retry-after" not in caught.value.response_headers()


def test_holds_must_lapse_before_their_windows_go() -> None:
    with pytest.raises(ValueError, match="hold_s"):
        Limiter(MemoryStore(), hold_s=100, grace_s=10)


async def test_a_changed_policy_applies_at_once(limiter: Limiter) -> None:
    # The limiter keeps each principal's limits worked out; a new policy object (an admin edit) replaces them.
    await limiter.admit(principal({"rate_limit": {"requests_per_minute": 1}}), tokens=0, worst_case_nano=cents(1))
    with pytest.raises(RateLimited):
        await limiter.admit(principal({"rate_limit": {"requests_per_minute": 1}}), tokens=0, worst_case_nano=cents(1))
    raised = principal({"rate_limit": {"requests_per_minute": 100}})
    grant = await limiter.admit(raised, tokens=0, worst_case_nano=cents(1))
    assert grant.headers["x-ratelimit-limit-requests"] == "100"
    unlimited = await limiter.admit(principal({}), tokens=0, worst_case_nano=cents(1))
    assert unlimited.headers == {}
    assert unlimited.hold is None


async def test_settlements_in_the_background_finish_before_drain_returns(limiter: Limiter) -> None:
    who = principal({"budget": {"usd_per_day": 1}})
    grant = await limiter.admit(who, tokens=0, worst_case_nano=cents(60))
    settled: list[Sequence[Any]] = []

    async def settle() -> None:
        settled.append(await limiter.settle(grant, tokens=None, cost_nano=10 * USD // 100))

    limiter.in_background(settle())
    assert settled == []  # not on the caller's path
    await limiter.drain()
    assert settled == [[]]
    grant = await limiter.admit(who, tokens=0, worst_case_nano=cents(90))  # the 60-cent hold became 10 cents spent
    assert grant.hold is not None
