from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import GatewayConfig, parse_config
from gateway.context import CHAT_COMPLETIONS, EMBEDDINGS, Endpoint, ProxyRequest, ProxyResponse
from gateway.errors import UpstreamAuthFailed, UpstreamUnavailable
from gateway.jsonbody import parse_object
from gateway.pipeline.forward import Forward
from gateway.routing import Router
from gateway.sse import Decoder
from gateway.upstream.client import UpstreamClient, UpstreamHTTPError
from gateway.upstream.httpx_transport import HttpxTransport
from gateway.upstream.providers import provider_for
from gateway.upstream.transport import ReadFailed, Timeouts

OK = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}
MESSAGES = [{"role": "user", "content": "hi"}]

CONFIG: dict[str, Any] = {
    "store": {"url": "memory://"},
    "upstreams": {
        "primary": {"base_url": "http://primary.test/v1", "api_key": "sk-primary-key", "max_retries": 2},
        "backup": {"base_url": "http://backup.test/v1", "api_key": "sk-backup-key", "max_retries": 0},
        "azure": {
            "kind": "azure",
            "base_url": "https://res.openai.azure.com",
            "api_key": "azure-key",
            "api_version": "2024-10-21",
        },
    },
    "models": {
        "gpt-4o": {"upstream": "primary", "fallbacks": ["gpt-4o-mini"]},
        "gpt-4o-mini": {"upstream": "backup", "upstream_model": "gpt-4o-mini-2024-07-18"},
        "alias": {"upstream": "primary", "upstream_model": "real-model"},
        "az": {"upstream": "azure", "upstream_model": "deployment-1"},
        "embed": {"upstream": "primary"},
    },
}

Step = httpx.Response | Exception | Callable[[httpx.Request], Any]


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status, content=orjson.dumps(payload), headers={"content-type": "application/json", **(headers or {})}
    )


def _stream(*chunks: bytes | Exception, delays: Mapping[int, float] | None = None) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        for index, chunk in enumerate(chunks):
            if delays and index in delays:
                await asyncio.sleep(delays[index])
            if isinstance(chunk, Exception):
                raise chunk
            yield chunk

    return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})


@dataclass
class Upstreams:
    """One scripted httpx mock per upstream, and the Forward stage built over them."""

    config: GatewayConfig
    steps: dict[str, list[Step]] = field(default_factory=dict)
    requests: dict[str, list[httpx.Request]] = field(default_factory=dict)
    clients: dict[str, UpstreamClient] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, upstream in self.config.upstreams.items():
            self.steps[name] = []
            self.requests[name] = []
            transport = HttpxTransport(httpx.AsyncClient(transport=httpx.MockTransport(self._handler(name))))
            self.clients[name] = UpstreamClient(name, upstream, provider_for(upstream), transport, sleep=_no_sleep)

    def _handler(self, name: str) -> Callable[[httpx.Request], Any]:
        async def handle(request: httpx.Request) -> httpx.Response:
            self.requests[name].append(request)
            assert self.steps[name], f"unexpected request to upstream {name!r}"
            step = self.steps[name].pop(0)
            if isinstance(step, Exception):
                raise step
            if isinstance(step, httpx.Response):
                return step
            result = step(request)
            return await result if inspect.isawaitable(result) else result

        return handle

    def script(self, name: str, *steps: Step) -> None:
        self.steps[name].extend(steps)

    @property
    def forward(self) -> Forward:
        return Forward(Router(self.config), self.clients)

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.transport.aclose()


async def _no_sleep(delay: float) -> None:
    await asyncio.sleep(0)


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Upstreams]]:
    built: list[Upstreams] = []

    def build(**upstream_overrides: dict[str, Any]) -> Upstreams:
        data = orjson.loads(orjson.dumps(CONFIG))
        for name, fields in upstream_overrides.items():
            data["upstreams"][name].update(fields)
        made = Upstreams(parse_config(data, "test.yaml", env={}))
        built.append(made)
        return made

    yield build
    for made in built:
        await made.aclose()


def _request(
    body: dict[str, Any] | bytes, endpoint: Endpoint = CHAT_COMPLETIONS, headers: dict[str, str] | None = None
) -> ProxyRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    request = ProxyRequest("req_test", endpoint, raw, headers or {}, 0.0)
    request.body = parse_object(raw)
    request.model = request.body["model"]
    request.stream = bool(request.body.get("stream"))
    return request


async def _collect(response: ProxyResponse) -> list[bytes]:
    assert response.stream is not None
    return [chunk async for chunk in response.stream]


# --- the happy path --------------------------------------------------------------------------


async def test_the_models_upstream_answers(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    headers = {
        "x-request-id": "up-req-1",
        "openai-processing-ms": "12",
        "x-ratelimit-remaining-requests": "99",
        "set-cookie": "a=b",
    }
    u.script("primary", _json(200, OK, headers))
    response = await u.forward(_request({"model": "gpt-4o", "messages": MESSAGES}))
    assert response.status == 200
    assert orjson.loads(response.body) == OK
    assert response.headers == {
        "content-type": "application/json",
        "openai-processing-ms": "12",
        "x-upstream-request-id": "up-req-1",
    }
    assert (response.model, response.upstream) == ("gpt-4o", "primary")
    assert response.stream is None
    assert str(u.requests["primary"][0].url) == "http://primary.test/v1/chat/completions"


async def test_the_embeddings_path_is_used(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("primary", _json(200, {"data": []}))
    await u.forward(_request({"model": "embed", "input": "x"}, EMBEDDINGS))
    assert u.requests["primary"][0].url.path == "/v1/embeddings"


async def test_an_unchanged_body_is_forwarded_byte_for_byte(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("primary", _json(200, OK))
    raw = b'{ "model" : "gpt-4o",\n  "messages": [{"role": "user", "content": "h\\u00e9"}], "n": 1.0 }'
    await u.forward(_request(raw))
    assert u.requests["primary"][0].content == raw


async def test_a_changed_body_is_reserialised(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("primary", _json(200, OK))
    request = _request({"model": "gpt-4o", "messages": MESSAGES})
    request.set_body_field("user", "tenant-acme")
    await u.forward(request)
    assert orjson.loads(u.requests["primary"][0].content) == {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "user": "tenant-acme",
    }


async def test_the_model_is_rewritten_to_the_upstream_model(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("primary", _json(200, OK))
    raw = b'{"model": "alias", "messages": [{"role": "user", "content": "hi"}], "seed": 1180591620717411303424}'
    response = await u.forward(_request(raw))
    sent = u.requests["primary"][0].content
    assert parse_object(sent) == {"model": "real-model", "messages": MESSAGES, "seed": 2**70}
    assert b"1180591620717411303424" in sent  # a big integer survives the rewrite exactly
    assert response.model == "alias"
    assert "x-gateway-fallback-model" not in response.headers


async def test_azure_keeps_the_model_and_addresses_the_deployment(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("azure", _json(200, OK))
    raw = orjson.dumps({"model": "az", "messages": MESSAGES})
    await u.forward(_request(raw))
    (request,) = u.requests["azure"]
    assert request.content == raw
    assert request.url.path == "/openai/deployments/deployment-1/chat/completions"
    assert request.url.params["api-version"] == "2024-10-21"
    assert request.headers["api-key"] == "azure-key"


# --- fallbacks -------------------------------------------------------------------------------


async def test_the_fallback_answers_when_the_first_upstream_exhausts_retries(
    upstreams: Callable[..., Upstreams],
) -> None:
    u = upstreams()
    u.script("primary", *(_json(503, {"error": {"message": "overloaded"}}) for _ in range(3)))
    u.script("backup", _json(200, OK, {"x-request-id": "backup-1"}))
    response = await u.forward(_request({"model": "gpt-4o", "messages": MESSAGES}))
    assert len(u.requests["primary"]) == 3  # max_retries: 2
    assert response.status == 200
    assert response.headers["x-gateway-fallback-model"] == "gpt-4o-mini"
    assert response.headers["x-upstream-request-id"] == "backup-1"
    assert (response.model, response.upstream) == ("gpt-4o-mini", "backup")
    sent = orjson.loads(u.requests["backup"][0].content)
    assert sent["model"] == "gpt-4o-mini-2024-07-18"
    assert sent["messages"] == MESSAGES


async def test_connect_failures_fall_back_too(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("primary", *(httpx.ConnectError("refused") for _ in range(3)))
    u.script("backup", _json(200, OK))
    response = await u.forward(_request({"model": "gpt-4o", "messages": MESSAGES}))
    assert response.headers["x-gateway-fallback-model"] == "gpt-4o-mini"


async def test_a_non_retryable_400_does_not_fall_back(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    error = {"error": {"message": "context too long", "type": "invalid_request_error", "param": None, "code": "x"}}
    u.script("primary", _json(400, error))
    response = await u.forward(_request({"model": "gpt-4o", "messages": MESSAGES}))
    assert response.status == 400
    assert orjson.loads(response.body) == error
    assert "x-gateway-fallback-model" not in response.headers
    assert len(u.requests["primary"]) == 1
    assert u.requests["backup"] == []


async def test_an_upstream_auth_failure_is_not_retried_but_falls_back(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("primary", _json(401, {"error": {"message": "bad key"}}))
    u.script("backup", _json(200, OK))
    response = await u.forward(_request({"model": "gpt-4o", "messages": MESSAGES}))
    assert len(u.requests["primary"]) == 1
    assert response.headers["x-gateway-fallback-model"] == "gpt-4o-mini"


async def test_when_every_model_fails_the_last_failure_is_raised(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("primary", *(httpx.ConnectError("refused") for _ in range(3)))
    u.script("backup", _json(502, {"error": {"message": "bad gateway"}}))
    with pytest.raises(UpstreamHTTPError) as caught:
        await u.forward(_request({"model": "gpt-4o", "messages": MESSAGES}))
    assert caught.value.status == 502
    assert caught.value.message == "bad gateway"
    assert caught.value.should_retry is False


async def test_a_model_without_fallbacks_raises_its_own_failure(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("backup", httpx.ConnectError("refused"))
    with pytest.raises(UpstreamUnavailable):
        await u.forward(_request({"model": "gpt-4o-mini", "messages": MESSAGES}))


async def test_an_auth_failure_with_nowhere_to_fall_back_is_a_502(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("backup", _json(403, {"error": {"message": "forbidden"}}))
    with pytest.raises(UpstreamAuthFailed) as caught:
        await u.forward(_request({"model": "gpt-4o-mini", "messages": MESSAGES}))
    assert (caught.value.status, caught.value.code) == (502, "upstream_auth_failed")


async def test_a_stream_falls_back_before_any_byte_is_sent(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("primary", *(_stream(httpx.ReadError("reset")) for _ in range(3)))
    u.script("backup", _stream(b"data: from-backup\n\n", b"data: [DONE]\n\n"))
    response = await u.forward(_request({"model": "gpt-4o", "messages": MESSAGES, "stream": True}))
    assert response.headers["x-gateway-fallback-model"] == "gpt-4o-mini"
    assert b"".join(await _collect(response)) == b"data: from-backup\n\ndata: [DONE]\n\n"


# --- streams ---------------------------------------------------------------------------------


async def test_stream_chunks_are_reframed_into_whole_events(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("primary", _stream(b'data: {"a"', b":1}\n\nda", b'ta: {"b":2}\r\n\r', b"\ndata: [DONE]\n\n"))
    response = await u.forward(_request({"model": "gpt-4o", "messages": MESSAGES, "stream": True}))
    assert response.headers["content-type"] == "text/event-stream"
    chunks = await _collect(response)
    assert all(chunk.endswith(b"\n\n") for chunk in chunks)
    assert b"".join(chunks) == b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'


async def test_a_mid_stream_failure_ends_with_one_error_event(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("primary", _stream(b'data: {"n":1}\n\n', b'data: {"n":2}\n\ndata: {"partial', httpx.ReadError("reset")))
    response = await u.forward(_request({"model": "gpt-4o", "messages": MESSAGES, "stream": True}))
    chunks = await _collect(response)
    body = b"".join(chunks)
    assert b"partial" not in body  # never half an event
    assert all(chunk.endswith(b"\n\n") for chunk in chunks)
    events = Decoder().feed(body)
    assert [event.data for event in events[:-1]] == [b'{"n":1}', b'{"n":2}']
    error = orjson.loads(events[-1].data)
    assert set(error) == {"error"}
    assert error["error"]["code"] == "upstream_error"
    assert "mid-stream" in error["error"]["message"]
    assert sum(b'"error"' in event.raw for event in events) == 1
    assert len(u.requests["primary"]) == 1  # bytes were out: no retry, no fallback
    assert u.requests["backup"] == []


async def test_a_mid_stream_read_timeout_ends_with_a_timeout_event(upstreams: Callable[..., Upstreams]) -> None:
    u = upstreams()
    u.script("primary", _stream(b"data: 1\n\n", b"data: 2\n\nda", httpx.ReadTimeout("silent too long")))
    response = await u.forward(_request({"model": "gpt-4o", "messages": MESSAGES, "stream": True}))
    events = Decoder().feed(b"".join(await _collect(response)))
    assert [event.data for event in events[:-1]] == [b"1", b"2"]
    error = orjson.loads(events[-1].data)["error"]
    assert error["code"] == "upstream_timeout"
    assert "mid-stream" in error["message"]


async def test_a_stream_past_the_deadline_ends_with_a_timeout_event(upstreams: Callable[..., Upstreams]) -> None:
    # A deadline with room for the first events on a loaded machine, and a stall well past it.
    u = upstreams(primary={"timeout_s": 0.5})
    u.script("primary", _stream(b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n", delays={1: 1.0}))
    response = await u.forward(_request({"model": "gpt-4o", "messages": MESSAGES, "stream": True}))
    events = Decoder().feed(b"".join(await _collect(response)))
    assert [event.data for event in events[:-1]] == [b"1", b"2"]
    assert orjson.loads(events[-1].data)["error"]["code"] == "upstream_timeout"


class _Response:
    status = 200
    headers: Mapping[str, str] = {"content-type": "text/event-stream"}

    def __init__(self) -> None:
        self.closed = False

    async def read(self) -> bytes:
        raise AssertionError("a stream is not read whole")

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"
        raise ReadFailed("reset")

    async def aclose(self) -> None:
        self.closed = True


class _Transport:
    def __init__(self) -> None:
        self.responses: list[_Response] = []

    async def send(self, method: str, url: str, headers: Any, body: bytes | None, timeouts: Timeouts) -> _Response:
        self.responses.append(_Response())
        return self.responses[-1]

    async def aclose(self) -> None:
        return None


def _forward_over(transport: _Transport) -> Forward:
    config = parse_config(CONFIG, "test.yaml", env={})
    upstream = config.upstreams["backup"]
    clients = {name: UpstreamClient(name, upstream, provider_for(upstream), transport) for name in config.upstreams}  # type: ignore[arg-type]
    return Forward(Router(config), clients)


async def test_closing_the_stream_early_closes_the_upstream_response() -> None:
    transport = _Transport()
    response = await _forward_over(transport)(_request({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}))
    assert response.stream is not None
    assert await anext(response.stream) == b"data: 1\n\n"
    assert not transport.responses[0].closed
    await response.stream.aclose()  # type: ignore[attr-defined]
    assert transport.responses[0].closed


async def test_a_failed_stream_closes_the_upstream_response() -> None:
    transport = _Transport()
    response = await _forward_over(transport)(_request({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}))
    chunks = await _collect(response)
    assert chunks[:2] == [b"data: 1\n\n", b"data: 2\n\n"]
    assert b"upstream_error" in chunks[2]
    assert transport.responses[0].closed
