"""Every error class, as the `openai` SDK sees it: exception type, status, `code`, retry hint."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from .support import ACME_KEY, UPSTREAM_KEY, WRONG_UPSTREAM_KEY, Proc

Finder = Callable[[str], list[dict[str, Any]]]
MESSAGES: Any = [{"role": "user", "content": "hi"}]


def _error_shape(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


# ---------------------------------------------------------------- authentication


def test_wrong_key_is_401(gateway: Proc) -> None:
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-gw-test-wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as excinfo:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert excinfo.value.status_code == 401
        assert excinfo.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()


async def test_wrong_key_is_401_async(gateway: Proc) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="sk-nope", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as excinfo:
            await sdk.embeddings.create(model="text-embedding-3-small", input="x")
    assert excinfo.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": ""}, {"authorization": f"Basic {ACME_KEY}"}, {"authorization": "Bearer"}],
    ids=["none", "empty", "basic", "bearer-without-key"],
)
def test_missing_key_is_401(http: httpx.Client, headers: dict[str, str]) -> None:
    response = http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES}, headers=headers)
    _error_shape(response, 401, "invalid_api_key")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_scheme_is_case_insensitive(http: httpx.Client, scheme: str) -> None:
    response = http.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        headers={"authorization": f"{scheme} {ACME_KEY}"},
    )
    assert response.status_code == 200, response.text


def test_auth_is_checked_before_the_body(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    _error_shape(response, 401, "invalid_api_key")


# ---------------------------------------------------------------- models and policies


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert excinfo.value.status_code == 404
    assert excinfo.value.code == "model_not_found"
    assert excinfo.value.param == "model"


def test_forbidden_model_looks_unknown(limited_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as forbidden:
        limited_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError) as unknown:
        limited_client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert forbidden.value.code == unknown.value.code == "model_not_found"
    # Same status, type, param and code: a forbidden model cannot be told apart from a missing one.
    assert (forbidden.value.type, forbidden.value.param) == (unknown.value.type, unknown.value.param)
    assert "gpt-4o" in forbidden.value.message
    with pytest.raises(openai.NotFoundError) as embeddings:
        limited_client.embeddings.create(model="text-embedding-3-small", input="x")
    assert embeddings.value.code == "model_not_found"


# ---------------------------------------------------------------- malformed bodies


def _post_raw(http: httpx.Client, body: bytes, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"authorization": f"Bearer {ACME_KEY}", "content-type": "application/json"}
    return http.post(path, content=body, headers=headers)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "gpt-4o-mini", "messages": [', "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (
            b'{"model": "gpt-4o-mini", "model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}',
            "invalid_json",
        ),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
            "invalid_json",
        ),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
            "invalid_json",
        ),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8"),
        (b'{"model": 4, "messages": [{"role": "user", "content": "x"}]}', "invalid_type"),
        (b'{"model": "gpt-4o-mini", "messages": "hello"}', "invalid_type"),
        (b'{"model": "gpt-4o-mini", "messages": []}', "empty_array"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "invalid_type"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "missing_required_parameter"),
    ],
    ids=[
        "truncated",
        "empty",
        "array",
        "duplicate-key",
        "nan",
        "infinity",
        "invalid-utf8",
        "model-type",
        "messages-type",
        "messages-empty",
        "stream-type",
        "no-model",
    ],
)
def test_malformed_chat_body_is_400(http: httpx.Client, body: bytes, code: str) -> None:
    error = _error_shape(_post_raw(http, body), 400, code)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "text-embedding-3-small", "input": 5}', "input"),
        (b'{"model": "text-embedding-3-small"}', "input"),
        (b'{"model": "text-embedding-3-small", "input": "x", "stream": true}', "stream"),
    ],
    ids=["input-type", "no-input", "stream"],
)
def test_malformed_embeddings_body_is_400(http: httpx.Client, body: bytes, param: str) -> None:
    error = _error_shape(_post_raw(http, body, "/v1/embeddings"), 400)
    assert error["param"] == param


def test_sdk_sees_400_as_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert excinfo.value.status_code == 400
    assert excinfo.value.code == "empty_array"
    assert excinfo.value.param == "messages"


def test_unknown_route_and_method(http: httpx.Client) -> None:
    _error_shape(http.get("/v1/nothing-here"), 404)
    _error_shape(http.get("/v1/chat/completions", headers={"authorization": f"Bearer {ACME_KEY}"}), 405)


# ---------------------------------------------------------------- upstream failures


def _mock_headers(**headers: str) -> dict[str, str]:
    return {f"x-mock-{name.replace('_', '-')}": value for name, value in headers.items()}


def test_upstream_429_after_retries(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    with pytest.raises(openai.RateLimitError) as excinfo:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=_mock_headers(status="429", tag=tag)
        )
    error = excinfo.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.response.headers["x-should-retry"] == "false"
    assert error.response.headers["x-request-id"]
    assert len(upstream_requests(tag)) == 3  # max_retries: 2
    assert "retry-after" not in error.response.headers


def test_upstream_short_retry_after_is_honoured(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    with pytest.raises(openai.RateLimitError) as excinfo:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=_mock_headers(status="429", retry_after="0", tag=tag)
        )
    assert excinfo.value.response.headers["retry-after"] == "0"
    assert len(upstream_requests(tag)) == 3


def test_upstream_long_retry_after_is_handed_to_the_client(
    client: openai.OpenAI, tag: str, upstream_requests: Finder
) -> None:
    with pytest.raises(openai.RateLimitError) as excinfo:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            extra_headers=_mock_headers(status="429", retry_after="120", tag=tag),
        )
    assert excinfo.value.response.headers["retry-after"] == "120"
    assert excinfo.value.response.headers["x-should-retry"] == "false"
    assert len(upstream_requests(tag)) == 1  # no point holding the client for two minutes


def test_upstream_500_after_retries(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    with pytest.raises(openai.InternalServerError) as excinfo:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=_mock_headers(status="500", tag=tag)
        )
    assert excinfo.value.status_code == 500
    assert excinfo.value.response.headers["x-should-retry"] == "false"
    assert len(upstream_requests(tag)) == 3


def test_upstream_400_is_passed_through_without_retry(
    client: openai.OpenAI, tag: str, upstream_requests: Finder
) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, n=1000, extra_headers=_mock_headers(tag=tag)
        )
    assert excinfo.value.param == "n"
    assert len(upstream_requests(tag)) == 1


async def test_upstream_400_on_a_stream_is_a_json_error(async_client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        await async_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, n=1000, stream=True)
    assert excinfo.value.param == "n"
    assert excinfo.value.response.headers["content-type"].startswith("application/json")


def test_gateway_retries_until_success(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    # The SDK client has max_retries=0: the success proves the gateway retried.
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "third time lucky"}],
        extra_headers=_mock_headers(fail_times="2", fail_key=tag, status="503", tag=tag),
    )
    assert raw.status_code == 200
    assert raw.parse().choices[0].message.content == "Mock reply to: third time lucky"
    assert len(upstream_requests(tag)) == 3


async def test_gateway_retries_streaming_async(
    async_client: openai.AsyncOpenAI, tag: str, upstream_requests: Finder
) -> None:
    stream = await async_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "retry my stream"}],
        stream=True,
        extra_headers=_mock_headers(fail_times="1", fail_key=tag, status="429", tag=tag),
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Mock reply to: retry my stream"
    assert len(upstream_requests(tag)) == 2


def test_fallback_model_answers(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="dead-with-fallback",
        messages=[{"role": "user", "content": "fall back"}],
        extra_headers=_mock_headers(tag=tag),
    )
    assert raw.status_code == 200
    assert raw.headers["x-gateway-fallback-model"] == "gpt-4o-mini"
    assert raw.parse().choices[0].message.content == "Mock reply to: fall back"
    [seen] = upstream_requests(tag)
    assert seen["body"]["model"] == "gpt-4o-mini"


async def test_fallback_model_streams_async(async_client: openai.AsyncOpenAI) -> None:
    raw = await async_client.chat.completions.with_raw_response.create(
        model="dead-with-fallback", messages=[{"role": "user", "content": "stream fallback"}], stream=True
    )
    assert raw.headers["x-gateway-fallback-model"] == "gpt-4o-mini"
    stream = raw.parse()
    chunks = [chunk async for chunk in stream]
    assert {c.model for c in chunks} == {"gpt-4o-mini"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Mock reply to: stream fallback"


def test_no_fallback_header_without_fallback(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "x-gateway-fallback-model" not in raw.headers


def test_unreachable_upstream_is_502(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as excinfo:
        client.chat.completions.create(model="dead-model", messages=MESSAGES)
    assert excinfo.value.status_code == 502
    assert excinfo.value.code == "upstream_unavailable"
    assert excinfo.value.response.headers["x-should-retry"] == "false"


def test_upstream_timeout_is_504(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    with pytest.raises(openai.InternalServerError) as excinfo:
        client.chat.completions.create(
            model="slow-model", messages=MESSAGES, extra_headers=_mock_headers(latency_ms="3000", tag=tag)
        )
    assert excinfo.value.status_code == 504
    assert excinfo.value.code == "upstream_timeout"
    assert excinfo.value.response.headers["x-should-retry"] == "false"
    assert len(upstream_requests(tag)) == 1  # the overall deadline (0.5 s) leaves no time to retry


def test_upstream_auth_failure_is_502(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    with pytest.raises(openai.InternalServerError) as excinfo:
        client.chat.completions.create(model="bad-auth-model", messages=MESSAGES, extra_headers=_mock_headers(tag=tag))
    assert excinfo.value.status_code == 502
    assert excinfo.value.code == "upstream_auth_failed"
    assert WRONG_UPSTREAM_KEY not in excinfo.value.response.text
    assert UPSTREAM_KEY not in excinfo.value.response.text
    assert len(upstream_requests(tag)) == 1  # retrying cannot fix credentials


# ---------------------------------------------------------------- mid-stream failures


def _drain(stream: Any, into: list[Any]) -> None:
    for chunk in stream:
        into.append(chunk)


async def _adrain(stream: Any, into: list[Any]) -> None:
    async for chunk in stream:
        into.append(chunk)


def test_mid_stream_disconnect_raises_after_earlier_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "one two three four five six"}],
        stream=True,
        extra_headers=_mock_headers(disconnect_after="4"),
    )
    received: list[Any] = []
    with pytest.raises(openai.APIError) as excinfo:
        _drain(stream, received)
    assert not isinstance(excinfo.value, openai.APIStatusError)  # the status was 200; the stream failed
    assert excinfo.value.code == "upstream_error"
    # The role chunk and three words arrived before the upstream went away.
    assert len(received) == 4
    assert "".join(c.choices[0].delta.content or "" for c in received) == "Mock reply to:"


async def test_mid_stream_disconnect_async(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "async break"}],
        stream=True,
        extra_headers=_mock_headers(disconnect_after="2", chunk_delay_ms="20"),
    )
    received: list[Any] = []
    with pytest.raises(openai.APIError) as excinfo:
        await _adrain(stream, received)
    assert len(received) == 2
    assert excinfo.value.code == "upstream_error"


def test_stream_failing_before_its_first_event_is_retried(
    client: openai.OpenAI, tag: str, upstream_requests: Finder
) -> None:
    # Nothing reached the client yet, so the gateway may retry, and it says it did.
    with pytest.raises(openai.InternalServerError) as excinfo:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            extra_headers=_mock_headers(disconnect_after="0", tag=tag),
        )
    assert excinfo.value.status_code == 502
    assert excinfo.value.code == "upstream_error"
    assert excinfo.value.response.headers["x-should-retry"] == "false"
    assert len(upstream_requests(tag)) == 3


def test_mid_stream_timeout(client: openai.OpenAI) -> None:
    # slow-model's upstream has timeout_s 0.5: the stream starts in time but cannot finish.
    stream = client.chat.completions.create(
        model="slow-model",
        messages=[{"role": "user", "content": "a b c d e f g h"}],
        stream=True,
        extra_headers=_mock_headers(chunk_delay_ms="150"),
    )
    received: list[Any] = []
    with pytest.raises(openai.APIError) as excinfo:
        _drain(stream, received)
    assert 2 <= len(received) <= 5
    assert excinfo.value.code == "upstream_timeout"


def test_mid_stream_silence_ends_the_stream(client: openai.OpenAI) -> None:
    # stall-model's upstream allows 0.3 s between chunks (read_timeout_s) within a 600 s deadline.
    stream = client.chat.completions.create(
        model="stall-model",
        messages=[{"role": "user", "content": "a b c"}],
        stream=True,
        extra_headers=_mock_headers(chunk_delay_ms="1000"),
    )
    received: list[Any] = []
    with pytest.raises(openai.APIError) as excinfo:
        _drain(stream, received)
    assert len(received) == 1
    # Like the deadline, a silence over read_timeout_s is reported as a timeout (tests/pipeline agrees).
    assert excinfo.value.code == "upstream_timeout"
    assert "mid-stream" in excinfo.value.message


def test_mid_stream_error_event_from_upstream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "a b c d e f"}],
        stream=True,
        extra_headers=_mock_headers(stream_error="1"),
    )
    received: list[Any] = []
    with pytest.raises(openai.APIError) as excinfo:
        _drain(stream, received)
    assert received
    assert excinfo.value.code == "stream_error"


def test_mid_stream_error_event_is_one_sse_event(http: httpx.Client) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    headers = {"authorization": f"Bearer {ACME_KEY}", **_mock_headers(disconnect_after="2")}
    response = http.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert len(events) == 3
    assert all(e.startswith("data: ") for e in events)
    assert '"error"' in events[-1]
    assert "[DONE]" not in response.text


def test_request_id_is_echoed_when_sane(http: httpx.Client) -> None:
    mine = f"test-{uuid.uuid4().hex}"
    response = http.post("/v1/chat/completions", json={}, headers={"x-request-id": mine})
    assert response.status_code == 401
    assert response.headers["x-request-id"] == mine
    insane = http.get("/healthz", headers={"x-request-id": "bad id with spaces"})
    assert insane.headers["x-request-id"] != "bad id with spaces"
    assert insane.headers["x-request-id"]
