"""The limiter: every rate limit and budget of a request, checked and taken in ONE store call.

    grant = await limiter.admit(principal, tokens=estimate, worst_case_nano=cost_of, max_tokens=...)
    ...forward, then with the real usage:
    alerts = await limiter.settle(grant, tokens=usage_total, cost_nano=real_cost)

Both the tenant (its policy's `rate_limit` and `budget`) and the key (its own) are checked, each on
counters of its own, so the stricter applies. `admit` raises BudgetExceeded (429 insufficient_quota)
or RateLimited (429 rate_limit_exceeded, with Retry-After); a budget wins, since waiting for a rate
limit would not help. Every outcome carries the `x-ratelimit-*` headers of the binding buckets.
A principal without limits costs no store call. `settle` must be called once per grant, also when
the request failed (cost 0); a crashed replica's holds lapse after `hold_s`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from gateway.config.schema import BudgetConfig, PolicyConfig
from gateway.context import Principal
from gateway.identity.keys import now_utc
from gateway.limits.budget import Budget, BudgetAlert, budget_exceeded, budgets, with_amount
from gateway.limits.ratelimit import TOKENS, RateLimit, rate_limited, rate_limits, ratelimit_headers
from gateway.store import Store
from gateway.store.limits import BudgetResult, Hold, LimitCheck, RateCheck, RateResult

DEFAULT_HOLD_S = 660.0  # the longest a request may take (an upstream's default timeout_s, 600 s) and a margin
DEFAULT_GRACE_S = 2 * 86400.0  # how long a window's counters outlive it


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose limits: `key` is the counters' namespace ("tenant:acme", "key:acme/0123abcd")."""

    who: str
    key: str
    policy: PolicyConfig


def scopes_of(principal: Principal) -> list[Scope]:
    """The tenant's policy, then the key's own limits if it has any."""
    found = [Scope(f"tenant {principal.tenant}", f"tenant:{principal.tenant}", principal.policy)]
    if principal.key_policy is not None:
        key = f"key:{principal.tenant}/{principal.key_id}"
        found.append(Scope(f"API key {principal.key_id}", key, principal.key_policy))
    return found


@dataclass(slots=True)
class Grant:
    """An admitted request: its headers, and what `settle` needs."""

    headers: dict[str, str]  # x-ratelimit-* for the response
    hold: Hold | None = None
    tokens: int = 0  # the estimate the token buckets were charged
    token_checks: tuple[RateCheck, ...] = ()
    budgets: Mapping[str, Budget] = field(default_factory=dict)  # by counter key
    held_output: int | None = None  # the fewest output tokens (per choice) a budget's hold covers; None: no budget


class _Plan:
    """A principal's limits, worked out once: what every request of it checks, but for the amounts.

    Budget windows depend on the UTC day, so they are kept for the last day seen.
    """

    __slots__ = ("_day", "_windows", "budgets", "key_policy", "policy", "rates", "requests")

    def __init__(self, principal: Principal) -> None:
        self.policy, self.key_policy = principal.policy, principal.key_policy
        self.rates: list[tuple[str, str, int | None, int | None]] = []  # who, key, rpm, tpm
        self.budgets: list[tuple[Scope, BudgetConfig]] = []
        for scope in scopes_of(principal):
            limit, budget = scope.policy.rate_limit, scope.policy.budget
            if limit is not None and (limit.requests_per_minute or limit.tokens_per_minute):
                self.rates.append((scope.who, scope.key, limit.requests_per_minute, limit.tokens_per_minute))
            if budget is not None and (budget.usd_per_day is not None or budget.usd_per_month is not None):
                self.budgets.append((scope, budget))
        # The request buckets always take 1: their limits are the same objects every time.
        self.requests = {key: rate_limits(who, key, rpm, None, 0) for who, key, rpm, _ in self.rates if rpm}
        self._day: date | None = None
        self._windows: list[tuple[Budget, int]] = []  # (window with amount 0, output tokens it reserves)

    def matches(self, principal: Principal) -> bool:
        return self.policy is principal.policy and self.key_policy is principal.key_policy

    def windows(self, moment: datetime, max_tokens: int | None, grace_s: float) -> list[tuple[Budget, int]]:
        day = moment.date()
        if day != self._day:
            self._windows = [
                (window, config.reserve_max_tokens)
                for scope, config in self.budgets
                for window in budgets(scope.who, scope.key, config, moment, 0, grace_s)
            ]
            self._day = day
        if max_tokens is None:
            return self._windows
        return [(window, min(max_tokens, reserve)) for window, reserve in self._windows]


_NO_LIMITS = Grant({})
_PLAN_CACHE_LIMIT = 10_000  # principals; cleared when full, so it stays bounded


class Limiter:
    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] = now_utc,
        hold_s: float = DEFAULT_HOLD_S,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        if not 0 < hold_s <= grace_s:
            raise ValueError(f"need 0 < hold_s <= grace_s, got hold_s={hold_s}, grace_s={grace_s}")
        self.store = store
        self._clock = clock
        self._hold_s = hold_s
        self._grace_s = grace_s
        self._plans: dict[tuple[str, str], _Plan] = {}
        self._background: set[asyncio.Task[None]] = set()

    def _plan(self, principal: Principal) -> _Plan:
        key = (principal.tenant, principal.key_id)
        plan = self._plans.get(key)
        if plan is None or not plan.matches(principal):  # a policy changed: its objects are new
            if len(self._plans) >= _PLAN_CACHE_LIMIT:
                self._plans.clear()
            plan = self._plans[key] = _Plan(principal)
        return plan

    async def admit(
        self,
        principal: Principal,
        *,
        tokens: int,
        worst_case_nano: Callable[[int], int],
        max_tokens: int | None = None,
    ) -> Grant:
        """Take the request's limits, or raise BudgetExceeded / RateLimited (nothing taken).

        `tokens` is the estimate charged to tokens_per_minute (prompt plus output cap); settle corrects it.
        `worst_case_nano(n)` is the request's cost, in nano-USD, if its output ran to `n` tokens; a budget
        holds it for n = max_tokens capped by its `reserve_max_tokens` (that alone, without max_tokens).
        """
        plan = self._plan(principal)
        if not plan.rates and not plan.budgets:
            return _NO_LIMITS
        moment = self._clock()
        rates: list[RateLimit] = []
        for who, key, rpm, tpm in plan.rates:
            if rpm:
                rates += plan.requests[key]
            if tpm:
                rates += rate_limits(who, key, None, tpm, tokens)
        windows: list[Budget] = []
        costs: dict[int, int] = {}
        held = plan.windows(moment, max_tokens, self._grace_s)
        for template, output in held:
            amount = costs.get(output)
            if amount is None:
                amount = costs[output] = max(0, worst_case_nano(output))
            windows.append(with_amount(template, amount))
        checks: list[LimitCheck] = [rate.check for rate in rates]
        checks += [window.check for window in windows]
        admission = await self.store.admit(checks, hold_s=self._hold_s, now=moment.timestamp())
        results = admission.results
        rate_outcomes = [
            (rate, result)
            for rate, result in zip(rates, results[: len(rates)], strict=True)
            if isinstance(result, RateResult)
        ]
        headers = ratelimit_headers(rate_outcomes)
        if not admission.allowed:
            budget_outcomes = [
                (window, result)
                for window, result in zip(windows, results[len(rates) :], strict=True)
                if isinstance(result, BudgetResult)
            ]
            error = budget_exceeded(budget_outcomes, headers) or rate_limited(rate_outcomes, headers)
            if error is None:
                raise AssertionError(f"the store refused with no check refused: {admission}")
            raise error
        token_checks = tuple(rate.check for rate in rates if rate.dimension == TOKENS)
        by_key = {window.check.key: window for window in windows} if windows else {}
        held_output = min((output for _, output in held), default=None)
        return Grant(headers, admission.hold, max(0, tokens), token_checks, by_key, held_output)

    def in_background(self, settlement: Coroutine[Any, Any, None]) -> None:
        """Run a settlement off the request path; `drain` waits for every one still running."""
        task = asyncio.get_running_loop().create_task(settlement)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for the settlements in flight (at shutdown, before the store closes)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def settle(self, grant: Grant, *, tokens: int | None, cost_nano: int | None) -> list[BudgetAlert]:
        """Record the real cost (None: unpriced, counts 0) and tokens (None: keep the estimate) of a grant.

        Returns the budgets whose alert_at this settlement crossed, once per window across all replicas.
        """
        corrections: list[RateCheck] = []
        if tokens is not None and tokens != grant.tokens:
            corrections = [
                RateCheck(check.key, check.limit, tokens - grant.tokens, check.period_s, check.burst)
                for check in grant.token_checks
            ]
        if grant.hold is None and not corrections:
            return []
        now = self._clock().timestamp()
        settlement = await self.store.settle(grant.hold, max(0, cost_nano or 0), corrections, now=now)
        held = grant.hold.budgets if grant.hold is not None else ()
        spent = {check.key: amount for check, amount in zip(held, settlement.spent, strict=True)}
        alerts = []
        for check in settlement.alerts:
            budget = grant.budgets[check.key]
            config = budget.config
            who, window = budget.who, budget.window
            alerts.append(BudgetAlert(who, window, check.limit, spent[check.key], config.alert_at, config.webhook_url))
        return alerts
