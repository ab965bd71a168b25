from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.context import CHAT_COMPLETIONS, EMBEDDINGS, Endpoint, ProxyRequest, ProxyResponse
from gateway.errors import InvalidRequest
from gateway.pipeline.parse import ParseBody

MESSAGES = [{"role": "user", "content": "hi"}]


def _request(body: Any, endpoint: Endpoint = CHAT_COMPLETIONS, headers: dict[str, str] | None = None) -> ProxyRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return ProxyRequest("req_test", endpoint, raw, headers or {}, 0.0)


async def _ok(request: ProxyRequest) -> ProxyResponse:
    return ProxyResponse(200, {}, b"passed")


async def _parse(request: ProxyRequest) -> ProxyRequest:
    response = await ParseBody()(request, _ok)
    assert response.body == b"passed"
    return request


async def _rejected(body: Any, endpoint: Endpoint = CHAT_COMPLETIONS) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        await ParseBody()(_request(body, endpoint), _ok)
    assert caught.value.status == 400
    return caught.value


async def test_a_chat_request_is_parsed_into_the_request() -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "temperature": 0.2, "extra_field": {"kept": True}}
    request = await _parse(_request(body))
    assert request.body == body
    assert request.model == "gpt-4o"
    assert request.stream is False
    assert request.user is None
    assert request.body_changed is False


async def test_stream_true_is_recorded() -> None:
    request = await _parse(_request({"model": "m", "messages": MESSAGES, "stream": True}))
    assert request.stream is True


async def test_stream_null_means_false() -> None:
    request = await _parse(_request({"model": "m", "messages": MESSAGES, "stream": None}))
    assert request.stream is False


async def test_an_embeddings_request_needs_input() -> None:
    for value in ("text", ["a", "b"], [[1, 2, 3]]):
        request = await _parse(_request({"model": "e", "input": value}, EMBEDDINGS))
        assert request.model == "e"
    error = await _rejected({"model": "e"}, EMBEDDINGS)
    assert (error.param, error.code) == ("input", "missing_required_parameter")
    error = await _rejected({"model": "e", "input": 5}, EMBEDDINGS)
    assert (error.param, error.code) == ("input", "invalid_type")
    assert "expected a string or an array, but got an integer" in error.message


async def test_embeddings_do_not_need_messages() -> None:
    request = await _parse(_request({"model": "e", "input": "x"}, EMBEDDINGS))
    assert request.stream is False


async def test_stream_is_refused_where_it_is_not_supported() -> None:
    error = await _rejected({"model": "e", "input": "x", "stream": True}, EMBEDDINGS)
    assert error.param == "stream"
    assert "embeddings" in error.message


async def test_stream_false_is_fine_where_streams_are_not_supported() -> None:
    request = await _parse(_request({"model": "e", "input": "x", "stream": False}, EMBEDDINGS))
    assert request.stream is False


@pytest.mark.parametrize("body", [{"messages": MESSAGES}, {"model": None, "messages": MESSAGES}])
async def test_model_is_required(body: dict[str, Any]) -> None:
    error = await _rejected(body)
    assert (error.param, error.code) == ("model", "missing_required_parameter")
    assert error.message == "Missing required parameter: 'model'."


@pytest.mark.parametrize(
    ("field", "value", "got"),
    [
        ("model", 4, "an integer"),
        ("model", True, "a boolean"),
        ("model", ["gpt-4o"], "an array"),
        ("stream", "yes", "a string"),
        ("stream", 1, "an integer"),
        ("stream", 0.0, "a number"),
        ("messages", {"role": "user"}, "an object"),
        ("messages", "hi", "a string"),
        ("user", 42, "an integer"),
    ],
)
async def test_wrong_types_are_refused(field: str, value: Any, got: str) -> None:
    body = {"model": "m", "messages": MESSAGES, field: value}
    error = await _rejected(body)
    assert (error.param, error.code) == (field, "invalid_type")
    assert error.message.endswith(f"but got {got}.")


async def test_a_bool_is_not_an_integer_or_string() -> None:
    error = await _rejected({"model": False, "messages": MESSAGES})
    assert error.code == "invalid_type"


async def test_messages_is_required_and_not_empty() -> None:
    error = await _rejected({"model": "m"})
    assert (error.param, error.code) == ("messages", "missing_required_parameter")
    error = await _rejected({"model": "m", "messages": []})
    assert (error.param, error.code) == ("messages", "empty_array")


async def test_the_user_comes_from_the_body_or_the_header() -> None:
    request = await _parse(
        _request({"model": "m", "messages": MESSAGES, "user": "u-body"}, headers={"x-gateway-user": "h"})
    )
    assert request.user == "u-body"
    request = await _parse(_request({"model": "m", "messages": MESSAGES}, headers={"x-gateway-user": "u-header"}))
    assert request.user == "u-header"


async def test_invalid_json_stops_the_request() -> None:
    error = await _rejected(b'{"model": "m", "messages": [')
    assert error.code == "invalid_json"
    error = await _rejected(b'{"model": "\xff"}')
    assert error.code == "invalid_utf8"
    error = await _rejected(b'["not", "an", "object"]')
    assert error.code == "invalid_json"


async def test_later_stages_do_not_run_on_a_bad_request() -> None:
    async def never(request: ProxyRequest) -> ProxyResponse:
        raise AssertionError("must not be called")

    with pytest.raises(InvalidRequest):
        await ParseBody()(_request({"model": "m"}), never)
