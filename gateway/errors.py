"""The gateway's error hierarchy, and the only place the OpenAI error JSON and SSE error events are shaped.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}` with the status the
`openai` SDK maps to the right exception class. Codes are stable and listed in docs/errors.md.
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = "internal_error"
    # None: let the client's own retry rules decide; False: retrying cannot help.
    should_retry: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if should_retry is not None:
            self.should_retry = should_retry
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return headers

    def sse_event(self) -> bytes:
        """The error as the last event of a stream whose headers were already sent."""
        return b"data: " + self.body() + b"\n\n"


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_denied"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.", param="model")


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"
    should_retry = False  # the SDK retries 409 by default; repeating a conflicting change cannot help


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    should_retry = False


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetExceeded(GatewayError):
    """A budget of the tenant or of the key is spent: retrying before its window resets cannot help."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    should_retry = False


class StoreUnavailable(GatewayError):
    """The gateway's own store (keys, limits) failed: the request was not forwarded, a retry may pass."""

    status = 503
    type = "api_error"
    code = "store_unavailable"


class UpstreamError(GatewayError):
    """The upstream failed and the gateway already retried, so the client should not."""

    status = 502
    type = "api_error"
    code = "upstream_error"
    should_retry = False


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamAuthFailed(UpstreamError):
    code = "upstream_auth_failed"


class ClientDisconnected(Exception):
    """The client went away; nothing can be sent, the work is cancelled."""
