"""The Usage stage with a fake next stage: usage read, streams metered and stripped, estimates, on_close."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.context import CHAT_COMPLETIONS, EMBEDDINGS, Endpoint, ProxyRequest, ProxyResponse, Usage
from gateway.cost import usage as usage_module
from gateway.cost.tokens import count_prompt, count_tokens
from gateway.cost.usage import StreamMeter, usage_in_body
from gateway.jsonbody import dumps
from gateway.metrics import Metrics
from gateway.pipeline.usage import MeasureUsage

GATEWAY_KEY = "sk-gw-test-key"  # tests/conftest.py BASE_CONFIG

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
UPSTREAM_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0},
}
EXPECTED = Usage(prompt_tokens=1200, cached_tokens=1024, completion_tokens=300, reasoning_tokens=256)
HEAD = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini",'
    b'"service_tier":"default","system_fingerprint":"fp_1","choices":'
)
DELTAS: list[dict[str, Any]] = [{"role": "assistant", "content": ""}, {"content": "Hello"}, {"content": " world"}, {}]


def events(include_usage: bool, *, usage: Any = UPSTREAM_USAGE, tail: bytes = b"") -> list[bytes]:
    """A stream as OpenAI writes it: `"usage":null` in every chunk and a final usage chunk only with
    include_usage; `tail` is appended to every object (OpenAI's `"obfuscation"` comes after `usage`)."""
    out = []
    for index, delta in enumerate(DELTAS):
        finish = "stop" if index == len(DELTAS) - 1 else None
        choice = orjson.dumps([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        out.append(b"data: " + HEAD + choice + (b',"usage":null' if include_usage else b"") + tail + b"}\n\n")
    if include_usage:
        out.append(b"data: " + HEAD + b'[],"usage":' + orjson.dumps(usage) + tail + b"}\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


class Upstream:
    """The fake next stage: records the request it got and answers with a body or a stream."""

    def __init__(self, status: int = 200, body: bytes = b"", chunks: Iterable[bytes | Exception] | None = None):
        self.status, self.body, self.chunks = status, body, chunks
        self.request: ProxyRequest | None = None
        self.closed = 0

    async def _stream(self, chunks: Iterable[bytes | Exception]) -> AsyncIterator[bytes]:
        try:
            for chunk in chunks:
                if isinstance(chunk, Exception):
                    raise chunk
                yield chunk
        finally:
            self.closed += 1

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        self.request = request
        stream = None if self.chunks is None else self._stream(self.chunks)
        return ProxyResponse(self.status, {}, self.body, stream, model=request.model, upstream="mock")


def make_request(endpoint: Endpoint = CHAT_COMPLETIONS, **fields: Any) -> ProxyRequest:
    body = {"model": "gpt-4o-mini", **fields}
    if endpoint is CHAT_COMPLETIONS:
        body.setdefault("messages", MESSAGES)
    request = ProxyRequest("req-1", endpoint, dumps(body), {}, 0.0, body=body)
    request.model, request.stream = body["model"], body.get("stream") is True
    return request


async def run(request: ProxyRequest, upstream: Upstream) -> ProxyResponse:
    return await MeasureUsage()(request, upstream)


async def drain(response: ProxyResponse, stop_after: int | None = None) -> list[bytes]:
    """Send the stream as the proxy does (maybe stopping early, as a disconnect does), then aclose it."""
    assert response.stream is not None
    got: list[bytes] = []
    try:
        async for chunk in response.stream:
            got.append(chunk)
            if stop_after is not None and len(got) >= stop_after:
                break
    finally:
        await response.stream.aclose()  # type: ignore[attr-defined]
    return got


async def through(meter: StreamMeter, chunks: list[bytes]) -> list[bytes]:
    return [chunk async for chunk in meter.filter(Upstream()._stream(chunks))]


def estimated_prompt() -> int:
    return count_prompt({"messages": MESSAGES}, "gpt-4o-mini")


# ---------------------------------------------------------------- plain answers


async def test_a_plain_answer_s_usage_is_read_with_its_details_and_the_body_is_untouched() -> None:
    body = orjson.dumps({"id": "chatcmpl-1", "choices": [], "usage": UPSTREAM_USAGE, "service_tier": "default"})
    upstream = Upstream(body=body)
    request = make_request()
    response = await run(request, upstream)
    assert response.usage == EXPECTED
    assert response.usage.total_tokens == 1500
    assert response.body is body
    assert not request.body_changed


async def test_usage_is_logged_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    body = orjson.dumps({"choices": [], "usage": UPSTREAM_USAGE})
    with caplog.at_level(logging.DEBUG, logger="gateway.usage"):
        await run(make_request(), Upstream(body=body))
    assert "request_id=req-1 model=gpt-4o-mini usage" in caplog.text
    assert "prompt_tokens=1200" in caplog.text


@pytest.mark.parametrize("status", [400, 429, 500])
async def test_an_error_answer_has_no_usage(status: int) -> None:
    body = orjson.dumps({"error": {"message": "no", "usage": UPSTREAM_USAGE}})
    response = await run(make_request(), Upstream(status, body))
    assert response.usage is None


async def test_a_plain_answer_without_usage_is_estimated() -> None:
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, friend."}}]}
    response = await run(make_request(), Upstream(body=orjson.dumps(answer)))
    completion = count_tokens("Hello there, friend.", "gpt-4o-mini")
    assert response.usage == Usage(prompt_tokens=estimated_prompt(), completion_tokens=completion, estimated=True)


async def test_an_estimate_counts_tool_calls_and_tools() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]}
    request = make_request(tools=tools)
    response = await run(request, Upstream(body=orjson.dumps(answer)))
    assert response.usage is not None
    assert response.usage.estimated
    assert response.usage.completion_tokens == count_tokens('get_weather{"city":"Paris"}', "gpt-4o-mini")
    assert response.usage.prompt_tokens == estimated_prompt() + count_tokens(dumps(tools).decode(), "gpt-4o-mini")


async def test_a_body_that_is_not_json_gets_an_estimate_of_the_prompt() -> None:
    response = await run(make_request(), Upstream(body=b"<html>oops"))
    assert response.usage == Usage(prompt_tokens=estimated_prompt(), estimated=True)


async def test_embeddings_usage_is_read_from_the_answer() -> None:
    body = orjson.dumps({"object": "list", "data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}})
    response = await run(make_request(EMBEDDINGS, input="some text"), Upstream(body=body))
    assert response.usage == Usage(prompt_tokens=8)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello world", 2),
        (["hello world", "hello"], 3),
        ([1, 2, 3], 3),
        ([[1, 2], [3]], 3),
    ],
)
async def test_embeddings_usage_is_estimated_from_the_input(value: Any, expected: int) -> None:
    body = orjson.dumps({"object": "list", "data": [], "model": "text-embedding-3-small"})
    response = await run(make_request(EMBEDDINGS, model="text-embedding-3-small", input=value), Upstream(body=body))
    assert response.usage == Usage(prompt_tokens=expected, estimated=True)


@pytest.mark.parametrize(
    "body",
    [
        {"usage": UPSTREAM_USAGE, "choices": [{"message": {"content": "usage"}}]},  # usage first, "usage" later
        {"choices": [], "usage": UPSTREAM_USAGE, "meta": {"usage": "other"}},  # a nested "usage" after it
        {"choices": [{"message": {"content": 'the "usage": {"prompt_tokens": 1}'}}], "usage": UPSTREAM_USAGE},
    ],
)
def test_usage_is_found_wherever_it_is_in_the_body(body: dict[str, Any]) -> None:
    assert usage_in_body(orjson.dumps(body)) == EXPECTED


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", b'{"usage":null}', b'{"usage":{"total_tokens":3}}', b'{"usage":{"prompt_tokens":-1}}', b'{"usage"'],
)
def test_missing_or_malformed_usage_is_none(body: bytes) -> None:
    assert usage_in_body(body) is None


# ---------------------------------------------------------------- the request


async def test_a_stream_always_asks_for_usage_and_keeps_the_client_s_other_options() -> None:
    upstream = Upstream(chunks=events(True))
    request = make_request(stream=True, stream_options={"include_obfuscation": False})
    await drain(await run(request, upstream))
    assert request.body_changed
    assert request.body["stream_options"] == {"include_obfuscation": False, "include_usage": True}


async def test_a_stream_that_asks_for_usage_is_forwarded_unchanged() -> None:
    request = make_request(stream=True, stream_options={"include_usage": True})
    await drain(await run(request, Upstream(chunks=events(True))))
    assert not request.body_changed


async def test_plain_requests_are_not_changed() -> None:
    request = make_request()
    await run(request, Upstream(body=b"{}"))
    assert not request.body_changed
    assert "stream_options" not in request.body


# ---------------------------------------------------------------- streams


def _chunkings(stream: list[bytes]) -> list[list[bytes]]:
    """The same events one per chunk, all in one chunk, and with the usage event sharing a chunk."""
    return [stream, [b"".join(stream)], [*stream[:2], b"".join(stream[2:])]]


@pytest.mark.parametrize("chunking", [0, 1, 2])
@pytest.mark.parametrize("tail", [b"", b',"obfuscation":"Zq3"'])
async def test_a_client_that_did_not_ask_gets_exactly_the_stream_without_usage(chunking: int, tail: bytes) -> None:
    upstream = Upstream(chunks=_chunkings(events(True, tail=tail))[chunking])
    response = await run(make_request(stream=True), upstream)
    got = await drain(response)
    assert b"".join(got) == b"".join(events(False, tail=tail))
    assert b"usage" not in b"".join(got)
    assert response.usage == EXPECTED
    assert upstream.closed == 1


@pytest.mark.parametrize("chunking", [0, 1, 2])
async def test_a_client_that_asked_gets_the_upstream_bytes(chunking: int) -> None:
    upstream = Upstream(chunks=_chunkings(events(True))[chunking])
    response = await run(make_request(stream=True, stream_options={"include_usage": True}), upstream)
    got = await drain(response)
    assert b"".join(got) == b"".join(events(True))
    assert response.usage == EXPECTED


@pytest.mark.parametrize(
    ("sent", "seen"),
    [
        (b'data: {"id":"1", "choices":[], "usage": null}\n\n', b'data: {"id":"1", "choices":[]}\n\n'),
        (b'data: {"usage": null, "id":"1","choices":[]}\n\n', b'data: {"id":"1","choices":[]}\n\n'),
        (b'data: {"id":"1","choices":[],"usage":null, "x":1}\n\n', b'data: {"id":"1","choices":[], "x":1}\n\n'),
    ],
)
async def test_usage_null_written_otherwise_is_removed_too(sent: bytes, seen: bytes) -> None:
    response = await run(make_request(stream=True), Upstream(chunks=[sent, b"data: [DONE]\n\n"]))
    assert await drain(response) == [seen, b"data: [DONE]\n\n"]


async def test_usage_in_a_chunk_with_choices_is_read_and_removed_when_not_asked() -> None:
    chunk = {"id": "1", "choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": UPSTREAM_USAGE}
    response = await run(make_request(stream=True), Upstream(chunks=[b"data: " + orjson.dumps(chunk) + b"\n\n"]))
    got = await drain(response)
    del chunk["usage"]
    assert got == [b"data: " + orjson.dumps(chunk) + b"\n\n"]
    assert response.usage == EXPECTED


async def test_events_without_a_usage_object_are_never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real = usage_module._parse

    def counting(data: bytes) -> Any:
        parsed.append(data)
        return real(data)

    monkeypatch.setattr(usage_module, "_parse", counting)
    for asked in (True, False):
        meter = StreamMeter(strip=not asked)
        await through(meter, events(True))
        assert meter.usage == EXPECTED
    assert len(parsed) == 2  # the usage event, once per stream


async def test_a_stream_without_usage_is_estimated() -> None:
    upstream = Upstream(chunks=events(False))  # an upstream that ignores stream_options
    response = await run(make_request(stream=True), upstream)
    assert b"".join(await drain(response)) == b"".join(events(False))
    completion = count_tokens("Hello world", "gpt-4o-mini")
    assert response.usage == Usage(prompt_tokens=estimated_prompt(), completion_tokens=completion, estimated=True)


async def test_a_stream_closed_early_is_estimated_from_what_was_streamed() -> None:
    upstream = Upstream(chunks=events(True))
    response = await run(make_request(stream=True), upstream)
    await drain(response, stop_after=2)  # the client went away after "Hello"
    assert upstream.closed == 1
    completion = count_tokens("Hello", "gpt-4o-mini")
    assert response.usage == Usage(prompt_tokens=estimated_prompt(), completion_tokens=completion, estimated=True)


async def test_a_stream_the_upstream_breaks_is_estimated() -> None:
    upstream = Upstream(chunks=[*events(True)[:3], ConnectionError("reset")])
    response = await run(make_request(stream=True), upstream)
    with pytest.raises(ConnectionError):
        await drain(response)
    completion = count_tokens("Hello world", "gpt-4o-mini")
    assert response.usage == Usage(prompt_tokens=estimated_prompt(), completion_tokens=completion, estimated=True)


async def test_a_stream_closed_before_its_first_chunk_still_gets_usage() -> None:
    response = await run(make_request(stream=True), Upstream(chunks=events(True)))
    assert response.stream is not None
    await response.stream.aclose()  # type: ignore[attr-defined]
    assert response.usage == Usage(prompt_tokens=estimated_prompt(), estimated=True)


async def test_the_count_past_the_kept_bytes_is_extrapolated() -> None:
    stream = events(False)
    meter = StreamMeter(strip=True, keep_bytes=len(stream[0]) + len(stream[1]))  # keeps "", "Hello"
    await through(meter, stream)
    total = sum(map(len, stream))
    hello = count_tokens("Hello", "gpt-4o-mini")
    assert meter.completion_tokens("gpt-4o-mini") == -(-hello * total // (len(stream[0]) + len(stream[1])))


# ---------------------------------------------------------------- on_close


async def test_on_close_runs_exactly_once_inner_stages_first() -> None:
    order: list[str] = []
    upstream = Upstream(chunks=events(True))
    response = await run(make_request(stream=True), upstream)

    async def outer() -> None:  # an accounting stage outside Usage would do this
        order.append(f"outer sees usage={response.usage is not None} upstream closed={upstream.closed}")

    response.on_close(outer)
    await drain(response)
    assert response.stream is not None
    await response.stream.aclose()  # type: ignore[attr-defined]
    assert order == ["outer sees usage=True upstream closed=1"]
    assert upstream.closed == 1


async def test_a_failing_on_close_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    response = await run(make_request(stream=True), Upstream(chunks=events(True)))

    async def broken() -> None:
        raise RuntimeError("store down")

    response.on_close(broken)
    await drain(response)
    assert "on_close callback failed" in caplog.text
    assert response.usage == EXPECTED


# ---------------------------------------------------------------- through the whole app


class _HangingUpstream:
    """A transport whose stream sends some events, then waits forever (until it is closed)."""

    status = 200
    headers: dict[str, str] = {"content-type": "text/event-stream"}  # noqa: RUF012

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.all_sent = asyncio.Event()
        self.closed = False
        self.body: bytes | None = None

    async def send(self, method: str, url: str, headers: Any, body: bytes | None, timeouts: Any) -> Any:
        self.body = body
        return self

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        self.all_sent.set()
        await asyncio.Event().wait()

    async def read(self) -> bytes:
        raise AssertionError("a stream is not read whole")

    async def aclose(self) -> None:
        self.closed = True


async def test_a_client_disconnect_through_the_app_gives_an_estimate(
    make_config: Callable[..., Any],
    started: Callable[[Any], Awaitable[Any]],
    asgi_call: Callable[..., Awaitable[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = _HangingUpstream(events(True)[:3])
    app = create_app(
        make_config(), transport_factory=lambda name, config: upstream, metrics=Metrics(CollectorRegistry())
    )
    await started(app)
    disconnect = asyncio.Event()
    body = dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})
    headers = [("authorization", f"Bearer {GATEWAY_KEY}")]
    with caplog.at_level(logging.DEBUG, logger="gateway.usage"):
        call = asyncio.create_task(asgi_call(app, "POST", "/v1/chat/completions", headers, [body], disconnect))
        await asyncio.wait_for(upstream.all_sent.wait(), 2)
        await asyncio.sleep(0.01)  # let the proxy send what it has
        disconnect.set()
        response = await asyncio.wait_for(call, 2)
    assert response.body == b"".join(events(False)[:3])
    assert upstream.closed
    assert upstream.body is not None
    assert orjson.loads(upstream.body)["stream_options"] == {"include_usage": True}
    completion = count_tokens("Hello world", "gpt-4o-mini")  # the role, "Hello" and " world" were streamed
    assert f"completion_tokens={completion}, reasoning_tokens=0, estimated=True" in caplog.text
