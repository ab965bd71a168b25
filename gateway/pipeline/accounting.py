"""Stage: price each answer's usage, record it in the spend ledger, and count it in metrics.

Runs on the way out, after the usage stage (inside it) has set `response.usage`; for a stream,
when the stream closes. Only the attempt that answered is billed, at the price of the model that
answered (`response.model`, after fallbacks). The cost goes on `response.cost_nano` for the limits
stage (outside this one) to settle budgets with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from gateway.context import Handler, Principal, ProxyRequest, ProxyResponse
from gateway.cost.ledger import Ledger, UsageRecord, usd_text
from gateway.cost.prices import PriceBook
from gateway.errors import InvalidRequest
from gateway.identity.keys import now_utc
from gateway.metrics import Metrics

logger = logging.getLogger("gateway.accounting")

DURABLE_WAIT_S = 2.0  # longest a response waits for its ledger write before it goes out anyway


class Account:
    def __init__(
        self,
        prices: PriceBook,
        ledger: Ledger,
        metrics: Metrics,
        *,
        reject_unpriced: bool = False,
        durable: bool = True,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self._prices = prices
        self._ledger = ledger
        self._metrics = metrics
        self._reject_unpriced = reject_unpriced
        self._durable = durable
        self._clock = clock

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if self._reject_unpriced and not self._prices.is_priced(request.model, self._clock().date()):
            raise InvalidRequest(
                f"The model `{request.model}` has no price, and this gateway refuses unpriced models.",
                param="model",
                code="model_unpriced",
            )
        response = await call_next(request)
        if response.status >= 400:
            return response  # an error answer has no usage to bill
        if response.stream is None:
            committed = self._record(request, response)
            if response.cost_nano is not None:
                response.headers["x-gateway-cost-usd"] = usd_text(response.cost_nano)
            if committed is not None:
                await _wait(committed)
        else:

            async def on_close() -> None:
                committed = self._record(request, response)
                if committed is not None:
                    await _wait(committed)

            response.on_close(on_close)
        return response

    def _record(self, request: ProxyRequest, response: ProxyResponse) -> Any:
        usage = response.usage
        principal = request.principal
        if usage is None or principal is None:
            return None
        model = response.model or request.model
        day = self._clock().date()
        response.cost_nano = self._prices.cost_nano(
            model,
            day,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=min(usage.cached_tokens, usage.prompt_tokens),
            completion_tokens=usage.completion_tokens,
        )
        self._count(principal, request.user, model, usage, response.cost_nano)
        record = UsageRecord(
            tenant=principal.tenant,
            key_id=principal.key_id,
            user=request.user,
            model=model,
            day=day,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=min(usage.cached_tokens, usage.prompt_tokens),
            completion_tokens=usage.completion_tokens,
            reasoning_tokens=min(usage.reasoning_tokens, usage.completion_tokens),
            cost_nano=response.cost_nano,
            estimated=usage.estimated,
        )
        committed = self._ledger.record(record)
        return committed if self._durable else None

    def _count(self, principal: Principal, user: str | None, model: str, usage: Any, cost_nano: int | None) -> None:
        # The metrics keep the children per label set (and bound the users when `user` is a label).
        children = self._metrics.cost_children(principal.tenant, model, principal.key_id, user)
        prompt, cached, completion, reasoning, cost, unpriced = children
        prompt.inc(usage.prompt_tokens)
        cached.inc(usage.cached_tokens)
        completion.inc(usage.completion_tokens)
        reasoning.inc(usage.reasoning_tokens)
        if cost_nano is None:
            unpriced.inc()
        else:
            cost.inc(cost_nano / 1e9)


async def _wait(committed: Any) -> None:
    """Wait for the ledger write (group commit), but never hold an answer for long on a slow store."""
    try:
        async with asyncio.timeout(DURABLE_WAIT_S):
            await committed
    except TimeoutError:
        logger.warning("the spend ledger did not confirm a write within %.1fs; it will retry", DURABLE_WAIT_S)
