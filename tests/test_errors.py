from __future__ import annotations

import orjson
import pytest

from gateway import errors
from gateway.errors import GatewayError
from gateway.sse import Decoder


@pytest.mark.parametrize(
    ("cls", "status", "type_", "code"),
    [
        (errors.GatewayError, 500, "api_error", "internal_error"),
        (errors.InvalidRequest, 400, "invalid_request_error", "invalid_request"),
        (errors.AuthenticationFailed, 401, "invalid_request_error", "invalid_api_key"),
        (errors.PermissionDenied, 403, "permission_denied", "permission_denied"),
        (errors.NotFound, 404, "invalid_request_error", "not_found"),
        (errors.MethodNotAllowed, 405, "invalid_request_error", "method_not_allowed"),
        (errors.RequestTooLarge, 413, "invalid_request_error", "request_too_large"),
        (errors.RateLimited, 429, "rate_limit_error", "rate_limit_exceeded"),
        (errors.UpstreamError, 502, "api_error", "upstream_error"),
        (errors.UpstreamUnavailable, 502, "api_error", "upstream_unavailable"),
        (errors.UpstreamTimeout, 504, "api_error", "upstream_timeout"),
        (errors.UpstreamAuthFailed, 502, "api_error", "upstream_auth_failed"),
    ],
)
def test_each_error_has_its_status_type_and_code(cls: type[GatewayError], status: int, type_: str, code: str) -> None:
    error = cls("something went wrong")
    assert (error.status, error.type, error.code) == (status, type_, code)
    assert orjson.loads(error.body()) == {
        "error": {"message": "something went wrong", "type": type_, "param": None, "code": code}
    }


def test_the_body_has_exactly_the_openai_error_keys() -> None:
    body = orjson.loads(errors.InvalidRequest("bad", param="messages", code="empty_array").body())
    assert body == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": "empty_array"}
    }


def test_overrides_apply_to_the_instance_not_the_class() -> None:
    error = errors.InvalidRequest("x", code="custom", status=422, should_retry=True)
    assert (error.code, error.status, error.should_retry) == ("custom", 422, True)
    fresh = errors.InvalidRequest("y")
    assert (fresh.code, fresh.status, fresh.should_retry) == ("invalid_request", 400, None)


def test_model_not_found_names_the_model_and_the_param() -> None:
    error = errors.ModelNotFound("gpt-9")
    assert error.status == 404
    assert error.code == "model_not_found"
    assert error.param == "model"
    assert "`gpt-9`" in error.message
    assert isinstance(error, errors.NotFound)


def test_upstream_errors_tell_the_client_not_to_retry() -> None:
    for cls in (errors.UpstreamError, errors.UpstreamTimeout, errors.UpstreamUnavailable, errors.UpstreamAuthFailed):
        assert cls("x").response_headers()["x-should-retry"] == "false"
    assert errors.RequestTooLarge("x").response_headers()["x-should-retry"] == "false"


def test_without_a_retry_opinion_no_header_is_sent() -> None:
    assert "x-should-retry" not in errors.InvalidRequest("x").response_headers()
    assert errors.GatewayError("x", should_retry=True).response_headers()["x-should-retry"] == "true"


def test_response_headers_copy_the_given_headers() -> None:
    given = {"retry-after": "3"}
    error = errors.RateLimited("slow down", headers=given)
    headers = error.response_headers()
    assert headers == {"retry-after": "3"}
    headers["x"] = "y"
    assert error.response_headers() == {"retry-after": "3"}
    assert given == {"retry-after": "3"}


def test_sse_event_is_one_whole_data_event() -> None:
    error = errors.UpstreamError("upstream 'a' failed mid-stream")
    event = error.sse_event()
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    assert event.count(b"\n") == 2
    decoded = Decoder().feed(event)
    assert len(decoded) == 1
    assert orjson.loads(decoded[0].data) == orjson.loads(error.body())


def test_a_message_with_newlines_still_makes_one_sse_event() -> None:
    event = errors.UpstreamError("line one\n\nline two\r\n").sse_event()
    decoded = Decoder().feed(event)
    assert len(decoded) == 1
    assert orjson.loads(decoded[0].data)["error"]["message"] == "line one\n\nline two\r\n"


def test_client_disconnected_is_not_a_gateway_error() -> None:
    # It must never be rendered as a response: there is nobody to send it to.
    assert not issubclass(errors.ClientDisconnected, GatewayError)
