"""Stage: rate limits and budgets, taken in one store call before forwarding, settled afterwards.

Before: the request's worst-case cost (prompt tokens plus `max_completion_tokens` or `max_tokens`,
else the budget's `reserve_max_tokens`) is reserved and its tokens charged, atomically for every
limit of the tenant and of the key (the stricter applies). After: the reservation is settled to the
real cost and tokens that the accounting stage (inside this one) put on the response, in a background
task once the answer is out (the hold covers the request until then); a request that failed settles
at zero. A stream whose client set no output limit within the hold is marked with the tokens held
(`request.output_cap`), for the usage stage to stop it there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from gateway.context import Handler, Principal, ProxyRequest, ProxyResponse
from gateway.cost.prices import PriceBook
from gateway.cost.tokens import count_prompt
from gateway.errors import BudgetExceeded, RateLimited
from gateway.identity.keys import now_utc
from gateway.limits import BudgetAlert, Grant, Limiter
from gateway.metrics import Metrics
from gateway.pipeline.parse import choices, output_limit
from gateway.quietlog import QuietWarning

logger = logging.getLogger("gateway.limits")


# A prompt this large takes ~1 ms or more to count: a thread keeps the event loop serving the others.
_COUNT_IN_THREAD_BYTES = 16_384


def has_limits(principal: Principal) -> bool:
    policy = principal.policy
    return policy.rate_limit is not None or policy.budget is not None or principal.key_policy is not None


class EnforceLimits:
    def __init__(
        self,
        limiter: Limiter,
        prices: PriceBook,
        metrics: Metrics,
        *,
        notify: Callable[[BudgetAlert], None] | None = None,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self._limiter = limiter
        self._prices = prices
        self._metrics = metrics
        self._notify = notify
        self._clock = clock
        self._unsettled = QuietWarning(logger, "could not settle a request's limits; its holds lapse on their own")

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        principal = request.principal
        assert principal is not None, "Authenticate must run before EnforceLimits"
        if not has_limits(principal):
            return await call_next(request)  # no store call for a principal without limits
        body = request.body
        if len(request.raw_body) > _COUNT_IN_THREAD_BYTES:  # tiktoken releases the GIL: the loop goes on meanwhile
            prompt = await asyncio.to_thread(count_prompt, body, request.model)
        else:
            prompt = count_prompt(body, request.model)
        limit = output_limit(body)
        cap = None if limit is None else limit[1]
        n = choices(body)
        price = self._prices.price_for(request.model, self._clock().date())

        def worst_case_nano(output_tokens: int) -> int:
            if price is None:
                return 0  # an unpriced model reserves nothing; accounting counts it unpriced
            return price.cost_nano(prompt, 0, output_tokens * n) or 0

        try:
            grant = await self._limiter.admit(
                principal, tokens=prompt + (cap or 0) * n, worst_case_nano=worst_case_nano, max_tokens=cap
            )
        except BudgetExceeded:
            self._metrics.budget_rejections.labels(principal.tenant).inc()
            raise
        except RateLimited:
            self._metrics.rate_limited.labels(principal.tenant).inc()
            raise
        if grant.held_output is not None and (cap is None or cap > grant.held_output):
            request.output_cap = grant.held_output * n
        try:
            response = await call_next(request)
        except BaseException:
            self._limiter.in_background(self._settle(principal, grant, None))  # at zero: the request failed
            raise
        response.headers.update(grant.headers)
        if response.stream is None:
            # Off the request path: the hold covers the request until then, so nothing can overshoot.
            self._limiter.in_background(self._settle(principal, grant, response))
        else:

            async def on_close() -> None:
                self._limiter.in_background(self._settle(principal, grant, response))

            response.on_close(on_close)
        return response

    async def _settle(self, principal: Principal, grant: Grant, response: ProxyResponse | None) -> None:
        usage = response.usage if response is not None else None
        cost = response.cost_nano if response is not None else 0
        try:
            alerts = await self._limiter.settle(
                grant, tokens=usage.total_tokens if usage is not None else 0, cost_nano=cost
            )
        except Exception as exc:
            self._unsettled.warn(exc)
            return
        for alert in alerts:
            logger.warning("budget alert: %s", alert.message)
            self._metrics.budget_alerts.labels(principal.tenant).inc()
            if self._notify is not None:
                self._notify(alert)
