"""Stage: parse the JSON body once and check the few fields the gateway itself relies on.

Everything else passes through untouched: the upstream validates what it understands.
"""

from __future__ import annotations

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
