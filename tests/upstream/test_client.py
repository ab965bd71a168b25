from __future__ import annotations

import asyncio
import email.utils
import gzip
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import UpstreamConfig
from gateway.errors import UpstreamAuthFailed, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.client import (
    MAX_RETRY_AFTER_S,
    RetriesExhausted,
    UpstreamClient,
    UpstreamHTTPError,
    retry_after_seconds,
)
from gateway.upstream.httpx_transport import HttpxTransport
from gateway.upstream.providers import provider_for
from gateway.upstream.transport import Timeouts

KEY = "sk-upstream-secret-0123456789abcdef"
BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
OK = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}

Step = httpx.Response | Exception | Callable[[httpx.Request], Any]


@dataclass
class Harness:
    client: UpstreamClient
    requests: list[httpx.Request] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)

    async def send(
        self,
        *,
        stream: bool = False,
        timeout: float = 30.0,
        headers: dict[str, str] | None = None,
        model: str = "gpt-4o",
        body: bytes = BODY,
    ) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        return await self.client.send("/chat/completions", model, body, headers or {}, stream=stream, deadline=deadline)

    async def exhausted(self, **kwargs: Any) -> Any:
        with pytest.raises(RetriesExhausted) as caught:
            await self.send(**kwargs)
        return caught.value.error


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status, content=orjson.dumps(payload), headers={"content-type": "application/json", **(headers or {})}
    )


def _sse(*chunks: bytes, status: int = 200) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return httpx.Response(status, content=body(), headers={"content-type": "text/event-stream"})


@pytest.fixture
async def harness() -> AsyncIterator[Callable[..., Harness]]:
    transports: list[HttpxTransport] = []

    def build(*steps: Step, jitter: float = 1.0, **fields: Any) -> Harness:
        config = UpstreamConfig.model_validate(
            {
                "base_url": "http://upstream.test/v1",
                "api_key": KEY,
                "backoff_initial_s": 1.0,
                "backoff_max_s": 8.0,
                **fields,
            }
        )
        remaining = list(steps)
        harness: Harness

        async def handle(request: httpx.Request) -> httpx.Response:
            harness.requests.append(request)
            assert remaining, f"unexpected extra attempt #{len(harness.requests)}"
            step = remaining.pop(0)
            if isinstance(step, Exception):
                raise step
            if isinstance(step, httpx.Response):
                return step
            result = step(request)
            return await result if inspect.isawaitable(result) else result

        async def sleep(delay: float) -> None:
            harness.sleeps.append(delay)
            await asyncio.sleep(0)

        transport = HttpxTransport(httpx.AsyncClient(transport=httpx.MockTransport(handle)))
        transports.append(transport)
        client = UpstreamClient("up", config, provider_for(config), transport, sleep=sleep, jitter=lambda: jitter)
        harness = Harness(client)
        return harness

    yield build
    for transport in transports:
        await transport.aclose()


# --- success ---------------------------------------------------------------------------------


async def test_a_success_is_returned_after_one_attempt(harness: Callable[..., Harness]) -> None:
    h = harness(_json(200, OK, {"x-request-id": "up-1"}))
    reply = await h.send()
    assert reply.status == 200
    assert orjson.loads(reply.body) == OK
    assert reply.headers["x-request-id"] == "up-1"
    assert reply.stream is None
    assert reply.upstream_seconds >= 0
    (request,) = h.requests
    assert request.method == "POST"
    assert str(request.url) == "http://upstream.test/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.content == BODY  # the client sends the body it is given, byte for byte
    assert h.sleeps == []


async def test_the_transport_gets_the_configured_timeouts_and_the_time_left() -> None:
    seen: list[Timeouts] = []

    class Recording:
        async def send(self, method: str, url: str, headers: Any, body: bytes | None, timeouts: Timeouts) -> Any:
            seen.append(timeouts)
            response = httpx.Response(200, content=b"{}")

            class R:
                status = 200
                headers = response.headers

                async def read(self) -> bytes:
                    return b"{}"

                async def aclose(self) -> None:
                    return None

            return R()

        async def aclose(self) -> None:
            return None

    config = UpstreamConfig(base_url="http://u.test", connect_timeout_s=3, read_timeout_s=7)
    client = UpstreamClient("up", config, provider_for(config), Recording())  # type: ignore[arg-type]
    deadline = asyncio.get_running_loop().time() + 20
    await client.send("/embeddings", "m", b"{}", {}, stream=False, deadline=deadline)
    (timeouts,) = seen
    assert (timeouts.connect, timeouts.read) == (3, 7)
    assert timeouts.total is not None
    assert 19 < timeouts.total <= 20


# --- retries ---------------------------------------------------------------------------------


async def test_connect_errors_are_retried_with_exponential_backoff(harness: Callable[..., Harness]) -> None:
    h = harness(httpx.ConnectError("refused"), httpx.ConnectError("refused"), _json(200, OK))
    reply = await h.send()
    assert reply.status == 200
    assert len(h.requests) == 3
    assert h.sleeps == [1.0, 2.0]


async def test_max_retries_2_means_at_most_3_attempts(harness: Callable[..., Harness]) -> None:
    h = harness(*(httpx.ConnectError("refused") for _ in range(3)), max_retries=2)
    error = await h.exhausted()
    assert len(h.requests) == 3
    assert len(h.sleeps) == 2
    assert isinstance(error, UpstreamUnavailable)
    assert error.status == 502
    assert error.code == "upstream_unavailable"
    assert error.should_retry is False


async def test_max_retries_0_means_one_attempt(harness: Callable[..., Harness]) -> None:
    h = harness(_json(503, {"error": "busy"}), max_retries=0)
    await h.exhausted()
    assert len(h.requests) == 1
    assert h.sleeps == []


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
async def test_retryable_statuses_are_retried(harness: Callable[..., Harness], status: int) -> None:
    h = harness(_json(status, {"error": {"message": "try again"}}), _json(200, OK))
    reply = await h.send()
    assert reply.status == 200
    assert len(h.requests) == 2
    assert h.sleeps == [1.0]


async def test_exhausted_retryable_status_is_reported_with_that_status(harness: Callable[..., Harness]) -> None:
    h = harness(*(_json(503, {"error": {"message": "overloaded", "type": "server_error"}}) for _ in range(3)))
    error = await h.exhausted()
    assert isinstance(error, UpstreamHTTPError)
    assert error.status == 503
    assert error.message == "overloaded"
    assert error.type == "server_error"
    assert error.response_headers()["x-should-retry"] == "false"


async def test_read_failures_are_retried_and_reported_as_upstream_error(harness: Callable[..., Harness]) -> None:
    h = harness(*(httpx.ReadError("reset") for _ in range(3)))
    error = await h.exhausted()
    assert type(error) is UpstreamError
    assert error.code == "upstream_error"
    assert len(h.requests) == 3


async def test_a_body_that_fails_mid_read_is_retried(harness: Callable[..., Harness]) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b'{"id":'
        raise httpx.ReadError("connection reset")

    h = harness(httpx.Response(200, content=broken()), _json(200, OK))
    reply = await h.send()
    assert orjson.loads(reply.body) == OK
    assert len(h.requests) == 2


async def test_timeouts_before_the_deadline_are_retried(harness: Callable[..., Harness]) -> None:
    h = harness(httpx.ReadTimeout("slow"), httpx.ConnectTimeout("slow"), _json(200, OK))
    reply = await h.send()
    assert reply.status == 200
    assert len(h.requests) == 3


async def test_repeated_timeouts_end_as_upstream_timeout(harness: Callable[..., Harness]) -> None:
    h = harness(*(httpx.ReadTimeout("slow") for _ in range(3)))
    error = await h.exhausted()
    assert isinstance(error, UpstreamTimeout)
    assert (error.status, error.code) == (504, "upstream_timeout")


def test_backoff_is_exponential_capped_and_half_jittered() -> None:
    config = UpstreamConfig(base_url="http://u.test", backoff_initial_s=0.5, backoff_max_s=3.0)
    transport = HttpxTransport(httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200))))
    high = UpstreamClient("u", config, provider_for(config), transport, jitter=lambda: 1.0)
    low = UpstreamClient("u", config, provider_for(config), transport, jitter=lambda: 0.0)
    assert [high.backoff(attempt) for attempt in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert [low.backoff(attempt) for attempt in range(5)] == [0.25, 0.5, 1.0, 1.5, 1.5]


# --- Retry-After -----------------------------------------------------------------------------


async def test_retry_after_seconds_is_honoured(harness: Callable[..., Harness]) -> None:
    h = harness(_json(429, {"error": {"message": "slow down"}}, {"retry-after": "3"}), _json(200, OK))
    await h.send()
    assert h.sleeps == [3.0]


async def test_retry_after_ms_is_honoured_and_wins(harness: Callable[..., Harness]) -> None:
    headers = {"retry-after-ms": "1500", "retry-after": "9"}
    h = harness(_json(503, {}, headers), _json(200, OK))
    await h.send()
    assert h.sleeps == [1.5]


async def test_a_too_long_retry_after_is_not_waited_for(harness: Callable[..., Harness]) -> None:
    h = harness(_json(429, {"error": {"message": "quota", "type": "rate_limit_error"}}, {"retry-after": "3600"}))
    error = await h.exhausted()
    assert h.sleeps == []
    assert len(h.requests) == 1
    assert error.status == 429
    assert error.response_headers()["retry-after"] == "3600"  # the client learns how long to wait


async def test_a_retry_after_beyond_the_deadline_is_not_waited_for(harness: Callable[..., Harness]) -> None:
    h = harness(_json(503, {}, {"retry-after": "20"}))
    await h.exhausted(timeout=5)
    assert h.sleeps == []
    assert len(h.requests) == 1


async def test_a_backoff_beyond_the_deadline_is_not_waited_for(harness: Callable[..., Harness]) -> None:
    h = harness(httpx.ConnectError("refused"), backoff_initial_s=2.0)
    await h.exhausted(timeout=1)
    assert h.sleeps == []


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "nonsense", "retry-after": "4"}, 4.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
    ],
)
def test_retry_after_seconds_parsing(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(headers) == expected


def test_retry_after_as_an_http_date() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds({"retry-after": email.utils.formatdate(now + 30, usegmt=True)}, now=now) == 30.0
    assert retry_after_seconds({"retry-after": email.utils.formatdate(now - 30, usegmt=True)}, now=now) == 0.0


def test_the_retry_after_cap_is_a_minute() -> None:
    assert MAX_RETRY_AFTER_S == 60.0


# --- errors that are not retried -------------------------------------------------------------


async def test_a_400_is_not_retried_and_passes_through(harness: Callable[..., Harness]) -> None:
    error_body = {
        "error": {"message": "bad messages", "type": "invalid_request_error", "param": "messages", "code": None}
    }
    h = harness(_json(400, error_body, {"x-request-id": "up-9"}))
    reply = await h.send()
    assert reply.status == 400
    assert orjson.loads(reply.body) == error_body
    assert reply.headers["x-request-id"] == "up-9"
    assert len(h.requests) == 1
    assert h.sleeps == []


async def test_a_non_openai_400_body_is_reshaped(harness: Callable[..., Harness]) -> None:
    h = harness(httpx.Response(422, content=b"<html>nope</html>"))
    reply = await h.send()
    assert reply.status == 422
    assert orjson.loads(reply.body) == {
        "error": {"message": "the upstream answered HTTP 422", "type": "upstream_error", "param": None, "code": None}
    }


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_auth_failure_is_a_502_and_not_retried(harness: Callable[..., Harness], status: int) -> None:
    h = harness(_json(status, {"error": {"message": f"Incorrect API key provided: {KEY}"}}))
    error = await h.exhausted()
    assert isinstance(error, UpstreamAuthFailed)
    assert (error.status, error.code, error.type) == (502, "upstream_auth_failed", "api_error")
    assert error.should_retry is False
    assert len(h.requests) == 1
    assert h.sleeps == []
    assert KEY.encode() not in error.body()
    assert "api_key" in error.message


# --- scrubbing -------------------------------------------------------------------------------


async def test_the_upstream_key_is_scrubbed_from_a_passed_through_error(harness: Callable[..., Harness]) -> None:
    body = {"error": {"message": f"key {KEY} lacks scope", "type": "invalid_request_error", "param": None, "code": "x"}}
    h = harness(_json(400, body))
    reply = await h.send()
    assert KEY.encode() not in reply.body
    assert KEY[:12].encode() not in reply.body
    assert b"[REDACTED]" in reply.body
    assert orjson.loads(reply.body)["error"]["code"] == "x"


async def test_the_upstream_key_is_scrubbed_from_an_exhausted_error(harness: Callable[..., Harness]) -> None:
    h = harness(*(httpx.Response(500, content=f"crash while using {KEY}".encode()) for _ in range(3)))
    error = await h.exhausted()
    assert KEY not in error.message
    assert KEY.encode() not in error.body()


async def test_other_secret_looking_keys_are_masked(harness: Callable[..., Harness]) -> None:
    other = "sk-proj-AbCdEf1234567890"
    h = harness(_json(400, {"error": {"message": f"bad key {other}", "type": "x", "param": None, "code": None}}))
    reply = await h.send()
    assert other.encode() not in reply.body
    assert b"sk-pro***" in reply.body


async def test_a_key_in_a_non_json_error_body_is_scrubbed(harness: Callable[..., Harness]) -> None:
    h = harness(httpx.Response(404, content=f'{{"error": "no route for {KEY}"}}'.encode()))
    reply = await h.send()
    assert reply.status == 404
    assert KEY.encode() not in reply.body
    assert "[REDACTED]" in orjson.loads(reply.body)["error"]["message"]


# --- the overall deadline --------------------------------------------------------------------


async def test_the_deadline_gives_upstream_timeout_504(harness: Callable[..., Harness]) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return _json(200, OK)

    h = harness(slow, slow, slow)
    loop = asyncio.get_running_loop()
    started = loop.time()
    error = await h.exhausted(timeout=0.05)
    assert loop.time() - started < 1
    assert isinstance(error, UpstreamTimeout)
    assert (error.status, error.code) == (504, "upstream_timeout")
    assert "did not answer within" in error.message
    assert len(h.requests) == 1  # no time was left for another attempt
    assert h.sleeps == []


# --- streams ---------------------------------------------------------------------------------


async def test_a_stream_is_returned_after_its_first_chunk(harness: Callable[..., Harness]) -> None:
    pulled: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for index in range(3):
            pulled.append(index)
            yield f"data: {index}\n\n".encode()

    h = harness(httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"}))
    reply = await h.send(stream=True)
    assert pulled == [0]  # the first chunk was read before the reply was handed on
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream"
    assert reply.stream is not None
    chunks = [chunk async for chunk in reply.stream]
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert pulled == [0, 1, 2]


async def test_a_stream_failing_before_its_first_chunk_is_retried(harness: Callable[..., Harness]) -> None:
    async def broken() -> AsyncIterator[bytes]:
        raise httpx.ReadError("reset")
        yield b""  # pragma: no cover

    h = harness(httpx.Response(200, content=broken()), _sse(b"data: ok\n\n"))
    reply = await h.send(stream=True)
    assert b"".join([chunk async for chunk in reply.stream]) == b"data: ok\n\n"
    assert len(h.requests) == 2
    assert h.sleeps == [1.0]


async def test_an_error_status_on_a_stream_is_retried(harness: Callable[..., Harness]) -> None:
    h = harness(_json(503, {"error": {"message": "busy"}}), _sse(b"data: ok\n\n"))
    reply = await h.send(stream=True)
    assert reply.status == 200
    assert len(h.requests) == 2


async def test_an_error_status_on_a_stream_passes_through_as_a_body(harness: Callable[..., Harness]) -> None:
    h = harness(_json(400, {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}))
    reply = await h.send(stream=True)
    assert reply.status == 400
    assert reply.stream is None
    assert orjson.loads(reply.body)["error"]["message"] == "bad"


async def test_an_empty_stream_yields_nothing(harness: Callable[..., Harness]) -> None:
    h = harness(_sse())
    reply = await h.send(stream=True)
    assert [chunk async for chunk in reply.stream] == []


async def test_a_gzipped_stream_is_decoded(harness: Callable[..., Harness]) -> None:
    payload = b"data: compressed\n\ndata: [DONE]\n\n"
    compressed = gzip.compress(payload)

    async def body() -> AsyncIterator[bytes]:
        yield compressed[:10]
        yield compressed[10:]

    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    h = harness(httpx.Response(200, content=body(), headers=headers))
    reply = await h.send(stream=True)
    assert b"".join([chunk async for chunk in reply.stream]) == payload


async def test_a_stream_given_as_one_body_is_streamed(harness: Callable[..., Harness]) -> None:
    h = harness(httpx.Response(200, content=b"data: 1\n\ndata: 2\n\n"))
    reply = await h.send(stream=True)
    assert b"".join([chunk async for chunk in reply.stream]) == b"data: 1\n\ndata: 2\n\n"


# --- providers on the wire -------------------------------------------------------------------


async def test_azure_request_shape(harness: Callable[..., Harness]) -> None:
    h = harness(
        _json(200, OK),
        kind="azure",
        base_url="https://res.openai.azure.com/",
        api_version="2024-10-21",
    )
    await h.send(model="my-deployment")
    (request,) = h.requests
    assert request.url.path == "/openai/deployments/my-deployment/chat/completions"
    assert request.url.params["api-version"] == "2024-10-21"
    assert request.headers["api-key"] == KEY
    assert "authorization" not in request.headers
    assert request.content == BODY


async def test_forward_headers_reach_the_upstream(harness: Callable[..., Harness]) -> None:
    h = harness(_json(200, OK), forward_headers=["x-trace-id", "openai-beta*"])
    await h.send(
        headers={
            "x-trace-id": "t-1",
            "openai-beta-feature": "on",
            "authorization": "Bearer sk-gw-client",
            "cookie": "session=1",
        }
    )
    (request,) = h.requests
    assert request.headers["x-trace-id"] == "t-1"
    assert request.headers["openai-beta-feature"] == "on"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert "cookie" not in request.headers


async def test_configured_static_headers_reach_the_upstream(harness: Callable[..., Harness]) -> None:
    h = harness(_json(200, OK), headers={"OpenAI-Organization": "org-42"})
    await h.send()
    assert h.requests[0].headers["openai-organization"] == "org-42"


async def test_the_client_does_not_rewrite_the_body(harness: Callable[..., Harness]) -> None:
    h = harness(_json(200, OK))
    await h.send(model="renamed-upstream-model")
    assert h.requests[0].content == BODY  # rewriting `model` is Forward's job, done before send
