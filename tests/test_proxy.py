from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import GatewayConfig, UpstreamConfig
from gateway.context import CHAT_COMPLETIONS, ProxyRequest, ProxyResponse
from gateway.errors import ModelNotFound
from gateway.metrics import Metrics
from gateway.proxy import ProxyEndpoint
from gateway.sse import Decoder
from gateway.store import StoreError
from gateway.store.memory import MemoryStore
from gateway.upstream.httpx_transport import HttpxTransport
from gateway.upstream.transport import Timeouts

GATEWAY_KEY = "sk-gw-test-key"  # tests/conftest.py BASE_CONFIG
UPSTREAM_KEY = "sk-upstream-secret-0123456789"
AUTH = {"authorization": f"Bearer {GATEWAY_KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"

Start = Callable[[Any], Awaitable[httpx.AsyncClient]]
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def _chat(model: str = "gpt-4o", **fields: Any) -> bytes:
    return orjson.dumps({"model": model, "messages": MESSAGES, **fields})


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


async def _echo(request: httpx.Request) -> httpx.Response:
    sent = orjson.loads(request.content)
    return httpx.Response(
        200,
        content=orjson.dumps({"object": "chat.completion", "model": sent["model"]}),
        headers={"content-type": "application/json", "x-request-id": "upstream-1"},
    )


class Upstreams:
    """Per-upstream httpx mocks; `handlers[name]` answers requests (default: echo the model)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = defaultdict(lambda: _echo)
        self.requests: dict[str, list[httpx.Request]] = defaultdict(list)

    def factory(self, name: str, config: UpstreamConfig) -> HttpxTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            self.requests[name].append(request)
            return await self.handlers[name](request)

        return HttpxTransport(httpx.AsyncClient(transport=httpx.MockTransport(handle)))


@pytest.fixture
def upstreams() -> Upstreams:
    return Upstreams()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def gateway(
    make_config: Callable[..., GatewayConfig], upstreams: Upstreams, registry: CollectorRegistry
) -> Callable[..., Any]:
    def build(overrides: dict[str, Any] | None = None, transport_factory: Any = None) -> Any:
        return create_app(
            make_config(overrides),
            transport_factory=transport_factory or upstreams.factory,
            metrics=Metrics(registry),
        )

    return build


def _count(registry: CollectorRegistry, model: str, status: int) -> float:
    return registry.get_sample_value("gateway_requests_total", {"model": model, "status": str(status)}) or 0.0


# --- the happy path --------------------------------------------------------------------------


async def test_a_chat_completion_is_proxied(gateway: Callable[..., Any], started: Start, upstreams: Upstreams) -> None:
    client = await started(gateway())
    response = await client.post(CHAT, content=_chat(), headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"object": "chat.completion", "model": "gpt-4o"}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers["x-upstream-request-id"] == "upstream-1"
    assert response.headers["x-request-id"].startswith("req_")
    (sent,) = upstreams.requests["primary"]
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.content == _chat()


async def test_embeddings_are_proxied(gateway: Callable[..., Any], started: Start, upstreams: Upstreams) -> None:
    client = await started(gateway())
    body = orjson.dumps({"model": "text-embedding-3-small", "input": "x"})
    response = await client.post("/v1/embeddings", content=body, headers=AUTH)
    assert response.status_code == 200
    assert upstreams.requests["primary"][0].url.path == "/v1/embeddings"


async def test_a_stream_is_proxied_as_sse(gateway: Callable[..., Any], started: Start, upstreams: Upstreams) -> None:
    async def stream(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield b'data: {"n":1}\n\nda'
            yield b'ta: {"n":2}\n\ndata: [DONE]\n\n'

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    upstreams.handlers["primary"] = stream
    client = await started(gateway())
    response = await client.post(CHAT, content=_chat(stream=True), headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert "x-request-id" in response.headers
    assert "content-length" not in response.headers
    assert response.content == b'data: {"n":1}\n\ndata: {"n":2}\n\ndata: [DONE]\n\n'


async def test_a_mid_stream_failure_reaches_the_client_as_one_error_event(
    gateway: Callable[..., Any], started: Start, upstreams: Upstreams
) -> None:
    async def stream(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield b'data: {"n":1}\n\ndata: {"n":'
            raise httpx.ReadError("reset")

        return httpx.Response(200, content=body())

    upstreams.handlers["primary"] = stream
    client = await started(gateway())
    response = await client.post(CHAT, content=_chat(stream=True), headers=AUTH)
    assert response.status_code == 200
    events = Decoder().feed(response.content)
    assert response.content.endswith(b"\n\n")
    assert [event.data for event in events[:-1]] == [b'{"n":1}']
    assert orjson.loads(events[-1].data)["error"]["code"] == "upstream_error"


async def test_the_fallback_model_is_named_in_a_header(
    gateway: Callable[..., Any], started: Start, upstreams: Upstreams, registry: CollectorRegistry
) -> None:
    async def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    upstreams.handlers["primary"] = down
    client = await started(gateway())
    response = await client.post(CHAT, content=_chat(), headers=AUTH)
    assert response.status_code == 200
    assert response.headers["x-gateway-fallback-model"] == "gpt-4o-mini"
    assert response.json()["model"] == "gpt-4o-mini"
    assert len(upstreams.requests["primary"]) == 3
    assert len(upstreams.requests["backup"]) == 1
    assert _count(registry, "gpt-4o", 200) == 1  # counted under the model the client asked for


# --- body limits and encoding ----------------------------------------------------------------


async def test_413_when_content_length_is_over_the_limit(
    gateway: Callable[..., Any], started: Start, asgi_call: Callable[..., Any], upstreams: Upstreams
) -> None:
    app = gateway({"server": {"max_body_bytes": 64}})
    await started(app)
    headers = [*AUTH.items(), ("content-length", "65")]
    response = await asgi_call(app, "POST", CHAT, headers, [b"x" * 65])
    assert response.status == 413
    error = orjson.loads(response.body)["error"]
    assert error["code"] == "request_too_large"
    assert "65 bytes" in error["message"]
    assert response.headers["x-should-retry"] == "false"
    assert "x-request-id" in response.headers
    assert upstreams.requests == {}


async def test_413_by_actual_size_without_content_length(
    gateway: Callable[..., Any], started: Start, asgi_call: Callable[..., Any], upstreams: Upstreams
) -> None:
    app = gateway({"server": {"max_body_bytes": 64}})
    await started(app)
    response = await asgi_call(app, "POST", CHAT, list(AUTH.items()), [b"x" * 40, b"x" * 40])
    assert response.status == 413
    assert orjson.loads(response.body)["error"]["code"] == "request_too_large"
    assert upstreams.requests == {}


async def test_413_when_the_body_is_longer_than_its_content_length(
    gateway: Callable[..., Any], started: Start, asgi_call: Callable[..., Any]
) -> None:
    app = gateway({"server": {"max_body_bytes": 64}})
    await started(app)
    headers = [*AUTH.items(), ("content-length", "10")]
    response = await asgi_call(app, "POST", CHAT, headers, [b"x" * 50, b"x" * 50])
    assert response.status == 413


async def test_a_body_exactly_at_the_limit_is_accepted(gateway: Callable[..., Any], started: Start) -> None:
    body = _chat()
    client = await started(gateway({"server": {"max_body_bytes": len(body)}}))
    response = await client.post(CHAT, content=body, headers=AUTH)
    assert response.status_code == 200


async def test_a_non_numeric_content_length_is_400(
    gateway: Callable[..., Any], started: Start, asgi_call: Callable[..., Any]
) -> None:
    app = gateway()
    await started(app)
    response = await asgi_call(app, "POST", CHAT, [*AUTH.items(), ("content-length", "ten")], [_chat()])
    assert response.status == 400
    assert orjson.loads(response.body)["error"]["type"] == "invalid_request_error"


async def test_invalid_utf8_is_400_invalid_utf8(
    gateway: Callable[..., Any], started: Start, upstreams: Upstreams
) -> None:
    client = await started(gateway())
    response = await client.post(CHAT, content=b'{"model": "gpt-4o", "messages": "\xff"}', headers=AUTH)
    assert response.status_code == 400
    error = _error(response)
    assert (error["code"], error["type"]) == ("invalid_utf8", "invalid_request_error")
    assert upstreams.requests == {}


async def test_invalid_json_is_400(gateway: Callable[..., Any], started: Start) -> None:
    client = await started(gateway())
    response = await client.post(CHAT, content=b'{"model": "gpt-4o", "model": "x"}', headers=AUTH)
    assert response.status_code == 400
    assert _error(response)["code"] == "invalid_json"


# --- errors in OpenAI's shape, each with a request id ----------------------------------------


async def test_a_missing_key_is_401(gateway: Callable[..., Any], started: Start, upstreams: Upstreams) -> None:
    client = await started(gateway())
    response = await client.post(CHAT, content=_chat())
    assert response.status_code == 401
    assert _error(response)["code"] == "invalid_api_key"
    assert "x-request-id" in response.headers
    assert upstreams.requests == {}


async def test_an_unknown_model_is_404(gateway: Callable[..., Any], started: Start) -> None:
    client = await started(gateway())
    response = await client.post(CHAT, content=_chat("gpt-9"), headers=AUTH)
    assert response.status_code == 404
    error = _error(response)
    assert (error["code"], error["param"]) == ("model_not_found", "model")


async def test_an_unknown_route_is_404_in_openai_shape(gateway: Callable[..., Any], started: Start) -> None:
    client = await started(gateway())
    for method, path in (("GET", "/nope"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions/x")):
        response = await client.request(method, path, headers=AUTH)
        assert response.status_code == 404, path
        error = _error(response)
        assert error["code"] == "not_found"
        assert path in error["message"]
        assert "x-request-id" in response.headers


async def test_a_wrong_method_is_405_in_openai_shape(gateway: Callable[..., Any], started: Start) -> None:
    client = await started(gateway())
    cases = (("GET", CHAT, "POST"), ("PUT", "/v1/embeddings", "POST"), ("POST", "/v1/models", "GET, HEAD"))
    for method, path, allow in (*cases, ("DELETE", "/healthz", "GET, HEAD")):
        response = await client.request(method, path, headers=AUTH)
        assert response.status_code == 405, (method, path)
        # RFC 9110: a 405 must say what is allowed (Starlette's order is a set's).
        assert sorted(response.headers["allow"].split(", ")) == sorted(allow.split(", "))
        error = _error(response)
        assert error["code"] == "method_not_allowed"
        assert method in error["message"]
        assert "x-request-id" in response.headers


async def test_upstream_auth_failure_is_502_and_hides_the_key(
    gateway: Callable[..., Any], started: Start, upstreams: Upstreams
) -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, content=f'{{"error": {{"message": "bad key {UPSTREAM_KEY}"}}}}'.encode())

    upstreams.handlers["backup"] = refuse
    client = await started(gateway())
    response = await client.post(CHAT, content=_chat("gpt-4o-mini"), headers=AUTH)
    assert response.status_code == 502
    assert _error(response)["code"] == "upstream_auth_failed"
    assert response.headers["x-should-retry"] == "false"
    assert UPSTREAM_KEY.encode() not in response.content
    assert len(upstreams.requests["backup"]) == 1


async def test_an_upstream_400_passes_through(
    gateway: Callable[..., Any], started: Start, upstreams: Upstreams
) -> None:
    error = {"error": {"message": "bad param", "type": "invalid_request_error", "param": "temperature", "code": None}}

    async def reject(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, content=orjson.dumps(error), headers={"content-type": "application/json"})

    upstreams.handlers["primary"] = reject
    client = await started(gateway())
    response = await client.post(CHAT, content=_chat(), headers=AUTH)
    assert response.status_code == 400
    assert response.json() == error
    assert upstreams.requests["backup"] == []


async def test_an_unexpected_failure_is_a_500_with_the_request_id(
    gateway: Callable[..., Any], started: Start, upstreams: Upstreams
) -> None:
    async def crash(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug")

    upstreams.handlers["primary"] = crash
    client = await started(gateway())
    response = await client.post(CHAT, content=_chat(), headers={**AUTH, "x-request-id": "trace-500"})
    assert response.status_code == 500
    error = _error(response)
    assert "trace-500" in error["message"]
    assert "bug" not in error["message"]
    assert response.headers["x-request-id"] == "trace-500"


# --- request ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, "/healthz", "/nope"])
async def test_a_sane_request_id_is_echoed(gateway: Callable[..., Any], started: Start, path: str) -> None:
    client = await started(gateway())
    method = "POST" if path == CHAT else "GET"
    response = await client.request(method, path, content=_chat(), headers={**AUTH, "x-request-id": "abc-123.x:y_z"})
    assert response.headers.get_list("x-request-id") == ["abc-123.x:y_z"]


@pytest.mark.parametrize("given", ["has space", "a" * 129, 'quote"', "semi;colon", ""])
@pytest.mark.parametrize("path", [CHAT, "/healthz"])
async def test_an_unsafe_request_id_is_replaced(
    gateway: Callable[..., Any], started: Start, given: str, path: str
) -> None:
    client = await started(gateway())
    method = "POST" if path == CHAT else "GET"
    response = await client.request(method, path, content=_chat(), headers={**AUTH, "x-request-id": given})
    (request_id,) = response.headers.get_list("x-request-id")
    assert request_id != given
    assert request_id.startswith("req_")


async def test_request_ids_are_unique(gateway: Callable[..., Any], started: Start) -> None:
    client = await started(gateway())
    ids = {(await client.post(CHAT, content=_chat(), headers=AUTH)).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


# --- other routes ----------------------------------------------------------------------------


async def test_models_are_listed_per_policy(gateway: Callable[..., Any], started: Start) -> None:
    client = await started(gateway({"policies": {"default": {"models": ["gpt-4o", "gpt-4o-mini"]}}}))
    response = await client.get("/v1/models", headers=AUTH)
    assert response.status_code == 200
    assert [model["id"] for model in response.json()["data"]] == ["gpt-4o", "gpt-4o-mini"]
    assert (await client.get("/v1/models/gpt-4o", headers=AUTH)).json()["owned_by"] == "primary"
    hidden = await client.get("/v1/models/text-embedding-3-small", headers=AUTH)
    assert hidden.status_code == 404
    assert _error(hidden)["code"] == "model_not_found"
    unauthenticated = await client.get("/v1/models")
    assert unauthenticated.status_code == 401
    assert _error(unauthenticated)["code"] == "invalid_api_key"


async def test_health_and_readiness(gateway: Callable[..., Any], started: Start) -> None:
    client = await started(gateway())
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


# --- client disconnects ----------------------------------------------------------------------


class HangingTransport:
    """Its requests never answer; it records being cancelled and closed."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False
        self.closed = False

    async def send(self, method: str, url: str, headers: Any, body: bytes | None, timeouts: Timeouts) -> Any:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    async def aclose(self) -> None:
        self.closed = True


async def test_a_client_disconnect_cancels_the_upstream_call(
    gateway: Callable[..., Any], started: Start, asgi_call: Callable[..., Any], registry: CollectorRegistry
) -> None:
    transport = HangingTransport()
    app = gateway(transport_factory=lambda name, config: transport)
    await started(app)
    disconnect = asyncio.Event()
    call = asyncio.create_task(asgi_call(app, "POST", CHAT, list(AUTH.items()), [_chat()], disconnect=disconnect))
    await asyncio.wait_for(transport.started.wait(), 2)
    assert not transport.cancelled
    disconnect.set()
    response = await asyncio.wait_for(call, 2)
    assert transport.cancelled
    assert not call.cancelled()  # the disconnect is handled, not propagated as a cancellation
    assert response.status is None  # nobody to answer
    assert registry.get_sample_value("gateway_client_disconnects_total", {"endpoint": "chat.completions"}) == 1
    assert _count(registry, "gpt-4o", 499) == 1
    assert registry.get_sample_value("gateway_in_flight_requests") == 0


class _HangingStream:
    status = 200
    headers: Mapping[str, str] = {"content-type": "text/event-stream"}

    def __init__(self) -> None:
        self.first_sent = asyncio.Event()
        self.closed = False

    async def read(self) -> bytes:
        raise AssertionError("a stream is not read whole")

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        self.first_sent.set()
        await asyncio.Event().wait()
        yield b"never"  # pragma: no cover

    async def aclose(self) -> None:
        self.closed = True


class StreamingTransport:
    def __init__(self) -> None:
        self.response = _HangingStream()

    async def send(self, method: str, url: str, headers: Any, body: bytes | None, timeouts: Timeouts) -> Any:
        return self.response

    async def aclose(self) -> None:
        return None


async def test_a_client_disconnect_mid_stream_closes_the_upstream_stream(
    gateway: Callable[..., Any], started: Start, asgi_call: Callable[..., Any], registry: CollectorRegistry
) -> None:
    transport = StreamingTransport()
    app = gateway(transport_factory=lambda name, config: transport)
    await started(app)
    disconnect = asyncio.Event()
    call = asyncio.create_task(
        asgi_call(app, "POST", CHAT, list(AUTH.items()), [_chat(stream=True)], disconnect=disconnect)
    )
    await asyncio.wait_for(transport.response.first_sent.wait(), 2)
    disconnect.set()
    response = await asyncio.wait_for(call, 2)
    assert response.status == 200
    assert response.body == b"data: 1\n\n"
    assert transport.response.closed
    assert registry.get_sample_value("gateway_client_disconnects_total", {"endpoint": "chat.completions"}) == 1
    assert registry.get_sample_value("gateway_in_flight_requests") == 0


async def test_a_disconnect_while_the_body_is_read_sends_nothing(
    gateway: Callable[..., Any], started: Start, registry: CollectorRegistry, upstreams: Upstreams
) -> None:
    app = gateway()
    await started(app)
    sent: list[Any] = []
    messages = [{"type": "http.request", "body": b'{"model"', "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {GATEWAY_KEY}".encode())],
    }
    await app(scope, receive, send)
    assert sent == []
    assert upstreams.requests == {}
    assert registry.get_sample_value("gateway_client_disconnects_total", {"endpoint": "chat.completions"}) == 1


async def test_the_upstream_transports_are_closed_at_shutdown(gateway: Callable[..., Any], lifespan: Any) -> None:
    transports: dict[str, HangingTransport] = {}

    def factory(name: str, config: UpstreamConfig) -> HangingTransport:
        transports[name] = HangingTransport()
        return transports[name]

    app = gateway(transport_factory=factory)
    assert transports == {}  # nothing is built before start-up
    async with lifespan(app):
        assert set(transports) == {"primary", "backup"}
        assert not any(transport.closed for transport in transports.values())
    assert all(transport.closed for transport in transports.values())


# --- metrics ---------------------------------------------------------------------------------


async def test_requests_are_counted_by_model_and_status(
    gateway: Callable[..., Any], started: Start, registry: CollectorRegistry
) -> None:
    client = await started(gateway())
    for _ in range(2):
        assert (await client.post(CHAT, content=_chat(), headers=AUTH)).status_code == 200
    assert (await client.post(CHAT, content=_chat("gpt-4o-mini"), headers=AUTH)).status_code == 200
    assert (await client.post(CHAT, content=_chat("made-up-1"), headers=AUTH)).status_code == 404
    assert (await client.post(CHAT, content=_chat("made-up-2"), headers=AUTH)).status_code == 404
    assert (await client.post(CHAT, content=_chat())).status_code == 401
    assert _count(registry, "gpt-4o", 200) == 2
    assert _count(registry, "gpt-4o-mini", 200) == 1
    assert _count(registry, "unknown", 404) == 2
    assert _count(registry, "unknown", 401) == 1
    assert _count(registry, "made-up-1", 404) == 0
    labels = {
        sample.labels["model"] for metric in registry.collect() for sample in metric.samples if "model" in sample.labels
    }
    assert labels == {"gpt-4o", "gpt-4o-mini", "unknown"}
    assert registry.get_sample_value("gateway_in_flight_requests") == 0
    assert registry.get_sample_value("gateway_request_duration_seconds_count", {"endpoint": "chat.completions"}) == 6
    assert registry.get_sample_value("gateway_upstream_duration_seconds_count", {"upstream": "primary"}) == 2


async def test_the_metrics_endpoint_exports_the_injected_registry(gateway: Callable[..., Any], started: Start) -> None:
    client = await started(gateway())
    await client.post(CHAT, content=_chat(), headers=AUTH)
    text = (await client.get("/metrics")).text
    assert 'gateway_requests_total{model="gpt-4o",status="200"} 1.0' in text


async def test_made_up_model_names_do_not_grow_the_label_cache(asgi_call: Callable[..., Any]) -> None:
    """Clients choose `model` freely: caching a counter per name would leak memory without bound."""

    async def handler(request: ProxyRequest) -> ProxyResponse:
        request.model = request.raw_body.decode()
        raise ModelNotFound(request.model)

    registry = CollectorRegistry()
    endpoint = ProxyEndpoint(CHAT_COMPLETIONS, handler, Metrics(registry), 1024, frozenset({"gpt-4o"}))
    for index in range(50):
        await asgi_call(endpoint, "POST", CHAT, [], [f"model-{index}".encode()])
    assert _count(registry, "unknown", 404) == 50
    assert len(endpoint._requests) == 1


async def test_a_stream_is_closed_even_if_the_client_is_gone_before_the_headers() -> None:
    """The proxy always aclose()s a stream, so every stage's on_close runs, even when sending fails at once."""
    closed: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: {}\n\n"

    async def on_close() -> None:
        closed.append("on_close")

    async def handler(request: ProxyRequest) -> ProxyResponse:
        response = ProxyResponse(200, {}, stream=chunks())
        response.on_close(on_close)
        return response

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            raise OSError("connection reset")

    endpoint = ProxyEndpoint(CHAT_COMPLETIONS, handler, Metrics(CollectorRegistry()), 1024, frozenset())
    scope = {"type": "http", "method": "POST", "path": CHAT, "headers": []}
    with pytest.raises(OSError, match="connection reset"):
        await endpoint(scope, receive, send)
    assert closed == ["on_close"]


# --- the store is down -----------------------------------------------------------------------


class _StoreDown(MemoryStore):
    """Pings and reads work; the limit calls fail as a store that just went away does."""

    async def admit(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("Redis store redis://cache:6379/0: Error 111 connecting to cache:6379. Connection refused.")


async def test_limits_that_cannot_be_checked_refuse_with_503_and_forward_nothing(
    make_config: Callable[..., GatewayConfig],
    upstreams: Upstreams,
    started: Start,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config({"policies": {"default": {"rate_limit": {"requests_per_minute": 100}}}})
    app = create_app(config, transport_factory=upstreams.factory, metrics=Metrics(registry), store=_StoreDown())
    client = await started(app)
    for _ in range(3):
        response = await client.post(CHAT, content=_chat(), headers=AUTH)
        assert response.status_code == 503
        assert _error(response) == {
            "message": "The gateway cannot reach its store right now, so this request was not sent on; try again.",
            "type": "api_error",
            "param": None,
            "code": "store_unavailable",
        }
    assert upstreams.requests["primary"] == []  # fail closed: an unchecked budget is not spent
    assert _count(registry, "gpt-4o", 503) == 3
    warnings = [r.getMessage() for r in caplog.records if "store_unavailable" in r.getMessage()]
    assert len(warnings) == 1  # one line per outage interval, not one per request
    assert "Connection refused" in warnings[0]
