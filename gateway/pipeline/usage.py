"""Stage: find out how many tokens each answer used, and put it on the response as `response.usage`.

On the way in, a streaming chat completion always asks the upstream for usage
(`stream_options.include_usage`), keeping the client's other stream options. On the way out the usage
comes from the upstream's `usage`: a plain answer's body is read, never rewritten; a stream is metered
as it passes (gateway/cost/usage.py), and if the client did not ask for usage the meter removes it, so
the client sees what OpenAI would have sent. A stream's usage is known when it closes. Without usage
from the upstream (none reported, a stream cut short by an upstream failure or a client disconnect)
the gateway counts the tokens itself and marks the usage `estimated`.

It runs last before Forward, so that the stages that spend usage (budgets, rate limits, accounting)
are outside it and find `response.usage` set, for streams in their own `on_close`.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from gateway.context import Handler, ProxyRequest, ProxyResponse, Usage, aclose
from gateway.cost.tokens import count_input, count_prompt, count_tokens
from gateway.cost.usage import StreamMeter, completion_text, usage_in_body

logger = logging.getLogger("gateway.usage")


class MeasureUsage:
    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        asked = _ask_for_usage(request) if request.stream else True
        response = await call_next(request)
        model = response.model or request.model
        if response.stream is not None:
            upstream = response.stream
            meter = StreamMeter(strip=not asked)
            response.stream = meter.filter(upstream)

            async def finish() -> None:
                await aclose(upstream)  # also when the metered stream was closed before it started
                usage = meter.usage
                if usage is None:
                    prompt, completion = count_prompt(request.body, model), meter.completion_tokens(model)
                    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, estimated=True)
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
