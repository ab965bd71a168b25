"""The limits stage over a real limiter and store (memory://): what it reserves, marks and settles."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from fake_clock import FakeClock

from gateway.config.schema import PolicyConfig, PriceEntry
from gateway.context import CHAT_COMPLETIONS, Principal, ProxyRequest, ProxyResponse, Usage
from gateway.cost.prices import PriceBook
from gateway.cost.tokens import count_prompt
from gateway.errors import BudgetExceeded
from gateway.jsonbody import dumps
from gateway.limits import Limiter
from gateway.metrics import Metrics
from gateway.pipeline import limits as limits_stage
from gateway.pipeline.limits import EnforceLimits
from gateway.store.limits import BudgetCheck, BudgetResult
from gateway.store.memory import MemoryStore

MODEL = "gpt-4o-mini"
NANO_PER_TOKEN = 1_000  # $1 per 1M tokens, in and out: one token costs 1000 nano-USD
DAY_KEY = "budget:tenant:acme:day:2030-01-30"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2030, 1, 30, 12, tzinfo=UTC))


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def limiter(store: MemoryStore, clock: FakeClock) -> Limiter:
    return Limiter(store, clock=clock)


@pytest.fixture
def stage(limiter: Limiter, clock: FakeClock) -> EnforceLimits:
    prices = PriceBook({MODEL: [PriceEntry(input=Decimal(1), output=Decimal(1), effective_from=date(2030, 1, 1))]})
    return EnforceLimits(limiter, prices, Metrics(), clock=clock)


def principal(policy: dict[str, Any]) -> Principal:
    return Principal("acme", "k1", "default", PolicyConfig.model_validate(policy))


def request(who: Principal, **body: Any) -> ProxyRequest:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], **body}
    return ProxyRequest("req-1", CHAT_COMPLETIONS, dumps(body), {}, 0.0, body=body, principal=who, model=MODEL)


def answer(completion_tokens: int) -> Any:
    async def call_next(req: ProxyRequest) -> ProxyResponse:
        response = ProxyResponse(200, {}, b"{}", model=MODEL)
        response.usage = Usage(prompt_tokens=10, completion_tokens=completion_tokens)
        response.cost_nano = (10 + completion_tokens) * NANO_PER_TOKEN
        return response

    return call_next


async def held_and_spent(store: MemoryStore, clock: FakeClock) -> tuple[int, int]:
    """The day window's (spent, held), read through a zero-amount check that takes nothing."""
    check = BudgetCheck(DAY_KEY, 10**15, 0, clock().timestamp() + 86400)
    admission = await store.admit([check], now=clock().timestamp())
    result = admission.results[0]
    assert isinstance(result, BudgetResult)
    return result.spent, result.held


async def test_the_hold_is_the_prompt_plus_max_tokens_and_settles_to_the_real_cost(
    stage: EnforceLimits, limiter: Limiter, store: MemoryStore, clock: FakeClock
) -> None:
    who = principal({"budget": {"usd_per_day": 10}})
    req = request(who, max_tokens=100)
    prompt = count_prompt(req.body, MODEL)
    seen: list[tuple[int, int]] = []

    async def call_next(req: ProxyRequest) -> ProxyResponse:
        seen.append(await held_and_spent(store, clock))
        return await answer(5)(req)

    response = await stage(req, call_next)
    assert seen == [(0, (prompt + 100) * NANO_PER_TOKEN)]  # the worst case, held while forwarding
    assert req.output_cap is None  # max_tokens keeps the answer within the hold
    await limiter.drain()  # the settlement runs off the request path
    assert await held_and_spent(store, clock) == (15 * NANO_PER_TOKEN, 0)
    assert response.status == 200


async def test_without_max_tokens_the_stream_is_capped_at_the_reserve(stage: EnforceLimits) -> None:
    who = principal({"budget": {"usd_per_day": 10, "reserve_max_tokens": 50}})
    capped = request(who, stream=True, n=2)
    await stage(capped, answer(1))
    assert capped.output_cap == 100  # 50 per choice
    over = request(who, max_completion_tokens=80)
    await stage(over, answer(1))
    assert over.output_cap == 50  # asks for more than the hold covers
    within = request(who, max_completion_tokens=20)
    await stage(within, answer(1))
    assert within.output_cap is None


async def test_a_failed_request_releases_its_hold(
    stage: EnforceLimits, limiter: Limiter, store: MemoryStore, clock: FakeClock
) -> None:
    who = principal({"budget": {"usd_per_day": 10}})

    async def failing(req: ProxyRequest) -> ProxyResponse:
        raise RuntimeError("upstream exploded")

    with pytest.raises(RuntimeError):
        await stage(request(who, max_tokens=100), failing)
    await limiter.drain()
    assert await held_and_spent(store, clock) == (0, 0)


async def test_a_large_prompt_is_counted_off_the_event_loop_to_the_same_count(
    stage: EnforceLimits, store: MemoryStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real = limits_stage.count_prompt

    def spy(body: dict[str, Any], model: str) -> int:
        threads.append(threading.current_thread().name)
        return real(body, model)

    monkeypatch.setattr(limits_stage, "count_prompt", spy)
    who = principal({"budget": {"usd_per_day": 10}})
    big = request(who, max_tokens=1, messages=[{"role": "user", "content": "lorem ipsum " * 4000}])
    seen: list[tuple[int, int]] = []

    async def call_next(req: ProxyRequest) -> ProxyResponse:
        seen.append(await held_and_spent(store, clock))
        return await answer(1)(req)

    await stage(big, call_next)
    await stage(request(who, max_tokens=1), answer(1))
    assert threads[0] != "MainThread"
    assert threads[1] == "MainThread"  # small prompts: a thread hop would cost more than the count
    assert seen == [(0, (real(big.body, MODEL) + 1) * NANO_PER_TOKEN)]


async def test_a_spent_budget_refuses_before_forwarding(stage: EnforceLimits, limiter: Limiter) -> None:
    who = principal({"budget": {"usd_per_day": 0.00002}})  # 20_000 nano: 20 tokens
    await stage(request(who, max_tokens=1), answer(20))
    await limiter.drain()

    async def never(req: ProxyRequest) -> ProxyResponse:
        raise AssertionError("forwarded")

    with pytest.raises(BudgetExceeded):
        await stage(request(who, max_tokens=1), never)
