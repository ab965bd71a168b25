"""Stage: parse the JSON body once and check the few fields the gateway itself relies on.

Everything else passes through untouched: the upstream validates what it understands.
"""

from __future__ import annotations

from typing import Any

from gateway.context import Handler, ProxyRequest, ProxyResponse
from gateway.errors import InvalidRequest
from gateway.jsonbody import expect, parse_object


class ParseBody:
    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        body = parse_object(request.raw_body)
        request.body = body
        request.model = expect(body, "model", str, "a string", required=True)
        stream = expect(body, "stream", bool, "a boolean", required=False)
        if stream and not request.endpoint.can_stream:
            raise InvalidRequest(f"'stream' is not supported by {request.endpoint.name}.", param="stream")
        request.stream = bool(stream)
        if request.endpoint.can_stream:  # chat completions
            messages = expect(body, "messages", list, "an array", required=True)
            if not messages:
                raise InvalidRequest(
                    "'messages' must contain at least one message.", param="messages", code="empty_array"
                )
        else:
            expect(body, "input", (str, list), "a string or an array", required=True)
        user = expect(body, "user", str, "a string", required=False)
        principal_user = request.principal.user if request.principal is not None else None
        request.user = user or request.headers.get("x-gateway-user") or principal_user
        return await call_next(request)


def output_limit(body: dict[str, Any]) -> tuple[str, int] | None:
    """The client's own cap on output tokens, `max_completion_tokens` first, as (field, value); None if unset."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def choices(body: dict[str, Any]) -> int:
    """How many answers the request asks for (`n`; 1 when absent or not a count above 1)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
