"""Stage: find out how many tokens each answer used, and put it on the response as `response.usage`.

On the way in, a streaming chat completion always asks the upstream for usage
(`stream_options.include_usage`), keeping the client's other stream options. On the way out the usage
comes from the upstream's `usage`: a plain answer's body is read, never rewritten; a stream is metered
as it passes (gateway/cost/usage.py), and if the client did not ask for usage the meter removes it, so
the client sees what OpenAI would have sent. A stream's usage is known when it closes. Without usage
from the upstream (none reported, a stream cut short by an upstream failure or a client disconnect)
the gateway counts the tokens itself and marks the usage `estimated`.

When a budget hold covers only so many completion tokens (`request.output_cap`, set by the limits
stage when the client's own max_tokens does not keep the answer within the hold), a stream's tokens
are counted as they pass. Before the first event that would take them past the cap, the stream ends
with an `insufficient_quota` / `budget_reserve_exhausted` error event and the upstream is closed; the
usage recorded is then the tokens the client was sent, estimated, and never more than the hold.

It runs last before Forward, so that the stages that spend usage (budgets, rate limits, accounting)
are outside it and find `response.usage` set, for streams in their own `on_close`.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import orjson

from gateway.context import Handler, ProxyRequest, ProxyResponse, Usage, aclose
from gateway.cost.tokens import count_input, count_prompt, count_tokens
from gateway.cost.usage import StreamMeter, completion_text, usage_in_body
from gateway.errors import BudgetExceeded
from gateway.pipeline.parse import choices, output_limit

logger = logging.getLogger("gateway.usage")

CAP_CODE = "budget_reserve_exhausted"  # the error event of a stream ended at its budget hold


class MeasureUsage:
    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        asked = _ask_for_usage(request) if request.stream else True
        response = await call_next(request)
        model = response.model or request.model
        if response.stream is not None:
            upstream = response.stream
            cap = request.output_cap if 200 <= response.status < 300 else None
            cap_event = bytes if cap is None else partial(_cap_event, request, cap)  # built only if it is cut
            meter = StreamMeter(strip=not asked, cap=cap, model=model, cap_event=cap_event)
            response.stream = meter.filter(upstream)

            async def finish() -> None:
                await aclose(upstream)  # also when the metered stream was closed before it started
                usage = meter.usage
                if usage is None or meter.cut:  # a cut stream's usage chunk, if any, was never sent
                    prompt, completion = count_prompt(request.body, model), meter.completion_tokens(model)
                    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, estimated=True)
                if meter.cut:
                    logger.info(
                        "request_id=%s model=%s stream stopped at its budget hold: %d completion tokens",
                        request.request_id,
                        model,
                        usage.completion_tokens,
                    )
                _record(request, response, usage)

            response.on_close(finish)
        elif 200 <= response.status < 300:
            _record(request, response, usage_in_body(response.body) or _estimate(request, response.body, model))
        return response


def _ask_for_usage(request: ProxyRequest) -> bool:
    """Make a streaming request ask for usage; return whether the client asked for it itself."""
    options = request.body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return True  # not ours to fix: the upstream refuses it
    if options.get("include_usage") is True:
        return True
    request.set_body_field("stream_options", {**options, "include_usage": True})
    return False


def _cap_event(request: ProxyRequest, cap: int) -> bytes:
    """The error event that ends a stream at its cap: why, and what to do (never the prompt's text)."""
    n = choices(request.body)
    per_choice = max(1, cap // n)
    total = f"{cap} completion tokens" + (f" ({n} choices together)" if n > 1 else "")
    limit = output_limit(request.body)
    asked = (
        "it sets neither max_tokens nor max_completion_tokens"
        if limit is None
        else f"its {limit[0]} ({limit[1]}) is more than that"
    )
    message = (
        f"The answer was stopped at its limit of {total}, all that this request's budget hold covers "
        f"(the budget's reserve_max_tokens, {per_choice} per choice), as {asked}. Set max_completion_tokens "
        f"or max_tokens to {per_choice} or less to get an answer that ends within the hold, or ask the "
        "gateway's operator to raise the budget's reserve_max_tokens."
    )
    return BudgetExceeded(message, code=CAP_CODE).sse_event()


def _estimate(request: ProxyRequest, body: bytes, model: str) -> Usage:
    if not request.endpoint.can_stream:  # embeddings
        return Usage(prompt_tokens=count_input(request.body.get("input"), model), estimated=True)
    try:
        answer: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    completion = count_tokens("".join(completion_text(answer)), model)
    return Usage(prompt_tokens=count_prompt(request.body, model), completion_tokens=completion, estimated=True)


def _record(request: ProxyRequest, response: ProxyResponse, usage: Usage) -> None:
    response.usage = usage
    logger.debug("request_id=%s model=%s usage %s", request.request_id, response.model or request.model, usage)
