"""Stage: parse the JSON body once and check the few fields the gateway itself relies on.

Everything else passes through untouched: the upstream validates what it understands.
"""

from __future__ import annotations

from typing import Any

from gateway.context import Handler, ProxyRequest, ProxyResponse
from gateway.errors import InvalidRequest
from gateway.jsonbody import parse_object


def _expect(body: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str, required: bool) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(
                f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
            )
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidRequest(
            f"Invalid type for '{name}': expected {what}, but got {_json_type(value)}.",
            param=name,
            code="invalid_type",
        )
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


class ParseBody:
    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        body = parse_object(request.raw_body)
        request.body = body
        request.model = _expect(body, "model", str, "a string", required=True)
        stream = _expect(body, "stream", bool, "a boolean", required=False)
        if stream and not request.endpoint.can_stream:
            raise InvalidRequest(f"'stream' is not supported by {request.endpoint.name}.", param="stream")
        request.stream = bool(stream)
        if request.endpoint.can_stream:  # chat completions
            messages = _expect(body, "messages", list, "an array", required=True)
            if not messages:
                raise InvalidRequest(
                    "'messages' must contain at least one message.", param="messages", code="empty_array"
                )
        else:
            _expect(body, "input", (str, list), "a string or an array", required=True)
        user = _expect(body, "user", str, "a string", required=False)
        principal_user = request.principal.user if request.principal is not None else None
        request.user = user or request.headers.get("x-gateway-user") or principal_user
        return await call_next(request)
