"""A stream ends at the completion tokens its budget hold covers (`request.output_cap`), with an error event.

The Usage stage with a fake next stage (a fake upstream stream), then the whole app with a budget in its config
and a fake transport, so that the limits stage sets the cap the way it does in production.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.context import CHAT_COMPLETIONS, ProxyRequest, ProxyResponse, Usage
from gateway.cost import usage as usage_module
from gateway.cost.tokens import count_prompt, count_tokens
from gateway.cost.usage import StreamMeter
from gateway.jsonbody import dumps
from gateway.metrics import Metrics
from gateway.pipeline.usage import CAP_CODE, MeasureUsage

MODEL = "gpt-4o-mini"
GATEWAY_KEY = "sk-gw-test-key"  # tests/conftest.py BASE_CONFIG
SECRET_PROMPT = "the launch code is 0000"
MESSAGES = [{"role": "user", "content": SECRET_PROMPT}]
WORDS = [" one", " two", " three", " four", " five", " six", " seven", " eight", " nine", " ten"]  # 1 token each
UPSTREAM_USAGE = {"prompt_tokens": 9, "completion_tokens": 10, "total_tokens": 19}
DONE = b"data: [DONE]\n\n"


def tokens(text: str) -> int:
    return count_tokens(text, MODEL)


def chunk(choices: list[dict[str, Any]], usage: bool = True) -> bytes:
    """One chunk as OpenAI writes it with include_usage: `"usage":null` after the choices."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "choices": choices}
    return b"data: " + orjson.dumps(head)[:-1] + (b',"usage":null}' if usage else b"}") + b"\n\n"


def choice(delta: dict[str, Any], index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def text_stream(words: Iterable[str] = WORDS, n: int = 1, *, with_usage: bool = True) -> list[bytes]:
    """A stream of `words` in every one of `n` choices, interleaved as OpenAI sends them; usage; [DONE]."""
    words = list(words)
    events = [chunk([choice({"role": "assistant", "content": ""}, i)], with_usage) for i in range(n)]
    events += [chunk([choice({"content": word}, i)], with_usage) for word in words for i in range(n)]
    events += [chunk([choice({}, i, "stop")], with_usage) for i in range(n)]
    if with_usage:
        events.append(b"data: " + orjson.dumps({"id": "chatcmpl-1", "choices": [], "usage": UPSTREAM_USAGE}) + b"\n\n")
    return [*events, DONE]


def without_usage(events: list[bytes]) -> list[bytes]:
    """What a client that did not ask for usage gets of `events`."""
    return [e.replace(b',"usage":null', b"") for e in events if b'"choices":[]' not in e]


class Upstream:
    """The fake next stage; `closed_at` is how many chunks the client had been sent when the upstream closed."""

    def __init__(self, chunks: Iterable[bytes], sent: list[bytes] | None = None) -> None:
        self.chunks = list(chunks)
        self.request: ProxyRequest | None = None
        self.closed = 0
        self.pulled = 0
        self.sent = sent if sent is not None else []
        self.closed_at: int | None = None

    async def _stream(self) -> AsyncIterator[bytes]:
        try:
            for item in self.chunks:
                self.pulled += 1
                yield item
        finally:
            self.closed += 1
            self.closed_at = len(self.sent)

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        self.request = request
        return ProxyResponse(200, {}, b"", self._stream(), model=request.model, upstream="mock")


def make_request(cap: int | None, **fields: Any) -> ProxyRequest:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, **fields}
    request = ProxyRequest("req-1", CHAT_COMPLETIONS, dumps(body), {}, 0.0, body=body)
    request.model, request.stream = MODEL, body["stream"] is True
    request.output_cap = cap
    return request


async def run(request: ProxyRequest, chunks: Iterable[bytes]) -> tuple[list[bytes], ProxyResponse, Upstream]:
    """Send the stream through the Usage stage as the proxy does, then aclose it (usage is set then)."""
    sent: list[bytes] = []
    upstream = Upstream(chunks, sent)
    response = await MeasureUsage()(request, upstream)
    assert response.stream is not None
    try:
        async for piece in response.stream:
            sent.append(piece)
    finally:
        await response.stream.aclose()  # type: ignore[attr-defined]
    return sent, response, upstream


def error_of(event: bytes) -> dict[str, Any]:
    assert event.startswith(b"data: {"), event
    assert event.endswith(b"}\n\n"), event
    payload = orjson.loads(event[6:])
    assert list(payload) == ["error"]
    error: dict[str, Any] = payload["error"]
    return error


def prompt_tokens(request: ProxyRequest) -> int:
    return count_prompt(request.body, MODEL)


# ---------------------------------------------------------------- where the stream ends


async def test_a_stream_is_cut_exactly_at_the_cap_with_one_error_event_and_no_done() -> None:
    events = text_stream()
    request = make_request(cap=4)
    sent, response, upstream = await run(request, events)
    body = b"".join(sent)
    expected = b"".join(without_usage(events[:5]))  # the role chunk and " one" .. " four"
    assert body.startswith(expected)
    event = body[len(expected) :]
    assert event.count(b"\n\n") == 1  # one event, the last, and no [DONE] after it
    error = error_of(event)
    assert error["type"] == "insufficient_quota"
    assert error["code"] == CAP_CODE == "budget_reserve_exhausted"
    assert error["param"] is None
    assert b" five" not in body
    assert upstream.closed == 1
    assert upstream.pulled == 6  # " five" was read, found past the cap, and not sent
    assert response.usage == Usage(prompt_tokens=prompt_tokens(request), completion_tokens=4, estimated=True)


async def test_the_upstream_is_closed_before_the_error_event_is_sent() -> None:
    _, _, upstream = await run(make_request(cap=2), text_stream())
    assert upstream.closed_at == 3  # role, " one", " two" sent; the error event was not yet out


async def test_the_message_says_why_and_what_to_do_and_never_quotes_the_prompt() -> None:
    sent, _, _ = await run(make_request(cap=3), text_stream())
    message = error_of(sent[-1])["message"]
    assert message == (
        "The answer was stopped at its limit of 3 completion tokens, all that this request's budget hold covers "
        "(the budget's reserve_max_tokens, 3 per choice), as it sets neither max_tokens nor max_completion_tokens. "
        "Set max_completion_tokens or max_tokens to 3 or less to get an answer that ends within the hold, or ask the "
        "gateway's operator to raise the budget's reserve_max_tokens."
    )
    assert SECRET_PROMPT not in message
    assert "launch" not in b"".join(sent).decode()


async def test_a_client_limit_above_the_reserve_is_named_in_the_message() -> None:
    sent, _, _ = await run(make_request(cap=6, n=2, max_tokens=1000), text_stream(n=2))
    message = error_of(sent[-1])["message"]
    assert "stopped at its limit of 6 completion tokens (2 choices together)" in message
    assert "reserve_max_tokens, 3 per choice" in message
    assert "its max_tokens (1000) is more than that" in message


@pytest.mark.parametrize("words", [10, 9])
async def test_a_stream_within_its_cap_is_not_cut_and_keeps_the_upstream_usage(words: int) -> None:
    events = text_stream(WORDS[:words])
    sent, response, upstream = await run(make_request(cap=10), events)
    assert b"".join(sent) == b"".join(without_usage(events))  # exactly at the cap: the answer ends normally
    assert response.usage == Usage(prompt_tokens=9, completion_tokens=10)  # the upstream's
    assert upstream.closed == 1


async def test_a_client_that_asked_for_usage_gets_the_upstream_bytes_when_not_cut() -> None:
    events = text_stream(WORDS[:3])
    request = make_request(cap=3, stream_options={"include_usage": True})
    sent, response, _ = await run(request, events)
    assert b"".join(sent) == b"".join(events)
    assert response.usage == Usage(prompt_tokens=9, completion_tokens=10)


async def test_a_cut_stream_drops_the_usage_chunk_too_even_when_the_client_asked() -> None:
    events = text_stream()
    request = make_request(cap=2, stream_options={"include_usage": True})
    sent, response, _ = await run(request, events)
    body = b"".join(sent)
    assert body.startswith(b"".join(events[:3]))  # as the upstream wrote them, "usage":null included
    assert b'"choices":[]' not in body
    assert error_of(body[len(b"".join(events[:3])) :])["code"] == CAP_CODE
    assert response.usage is not None
    assert response.usage.completion_tokens == 2
    assert response.usage.estimated


@pytest.mark.parametrize("cap", [1, 5, 9])
async def test_a_cut_inside_a_chunk_sends_the_events_before_it_and_drops_the_rest(cap: int) -> None:
    events = text_stream()
    sent, response, _ = await run(make_request(cap=cap), [b"".join(events)])  # everything in one chunk
    assert len(sent) == 1
    expected = b"".join(without_usage(events[: 1 + cap]))
    assert sent[0].startswith(expected)
    assert error_of(sent[0][len(expected) :])["code"] == CAP_CODE
    assert response.usage is not None
    assert response.usage.completion_tokens == cap


async def test_a_delta_that_would_cross_the_cap_is_not_sent_at_all() -> None:
    long_word = " antidisestablishmentarianism"
    events = text_stream([" one", " two", long_word, " four"])
    sent, response, _ = await run(make_request(cap=5), events)
    body = b"".join(sent)
    assert b"antidis" not in body
    assert response.usage is not None
    assert response.usage.completion_tokens == 2 <= 5  # what the client got, never more than the hold


async def test_n_choices_count_together() -> None:
    events = text_stream(n=3)  # role x3, then " one" x3, " two" x3, ...
    sent, response, _ = await run(make_request(cap=3 * 4, n=3), events)
    body = b"".join(sent)
    for i in range(3):
        assert body.count(b'"index":%d,"delta":{"content":" four"}' % i) == 1
    assert b" five" not in body
    assert error_of(sent[-1])["code"] == CAP_CODE
    assert response.usage is not None
    assert response.usage.completion_tokens == 12


async def test_n_choices_are_cut_mid_round_when_the_cap_is_not_a_multiple() -> None:
    sent, response, _ = await run(make_request(cap=7, n=3), text_stream(n=3))
    body = b"".join(sent)
    assert body.count(b'"content":" three"') == 1  # one choice's third word fits, the others' do not
    assert response.usage is not None
    assert response.usage.completion_tokens == 7


async def test_tool_call_arguments_count() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    fragments = ['{"city"', ':"Paris"}', ',"unit":"celsius"}']
    events = [
        chunk([choice({"role": "assistant", "content": None, "tool_calls": [call]})]),
        *(chunk([choice({"tool_calls": [{"index": 0, "function": {"arguments": f}}]})]) for f in fragments),
        chunk([choice({}, finish="tool_calls")]),
        DONE,
    ]
    first = tokens("get_weather")
    cap = first + tokens(fragments[0]) + tokens(fragments[1])
    sent, response, _ = await run(make_request(cap=cap), events)
    body = b"".join(sent)
    assert b"Paris" in body
    assert b"celsius" not in body
    assert error_of(sent[-1])["code"] == CAP_CODE
    assert response.usage is not None
    assert response.usage.completion_tokens == cap


@pytest.mark.parametrize("field", ["refusal", "reasoning_content", "reasoning"])
async def test_refusals_and_reasoning_text_count(field: str) -> None:
    events = [chunk([choice({field: word})]) for word in WORDS] + [DONE]
    sent, response, _ = await run(make_request(cap=3), events)
    assert error_of(sent[-1])["code"] == CAP_CODE
    assert response.usage is not None
    assert response.usage.completion_tokens == 3


async def test_without_a_cap_nothing_is_cut_and_nothing_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[str] = []

    def count(text: str, model: str) -> int:
        counted.append(text)
        return 1

    monkeypatch.setattr(usage_module, "count_tokens", count)
    events = text_stream(WORDS * 10)
    sent, response, _ = await run(make_request(cap=None), events)
    assert b"".join(sent) == b"".join(without_usage(events))
    assert counted == []
    assert response.usage == Usage(prompt_tokens=9, completion_tokens=10)


async def test_each_delta_is_counted_once_never_the_text_so_far(monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[str] = []

    def count(text: str, model: str) -> int:
        counted.append(text)
        return tokens(text)

    monkeypatch.setattr(usage_module, "count_tokens", count)
    await run(make_request(cap=100), text_stream())
    assert counted == WORDS  # the role and finish chunks have no text; the usage chunk is not parsed for it


async def test_a_client_that_set_max_tokens_within_the_reserve_has_no_cap_and_is_never_cut() -> None:
    # The limits stage leaves output_cap None when max_tokens keeps the answer within the hold; an upstream that
    # overshoots max_tokens anyway is settled at its real cost.
    events = text_stream()
    sent, response, _ = await run(make_request(cap=None, max_tokens=3), events)
    assert b"".join(sent) == b"".join(without_usage(events))
    assert response.usage == Usage(prompt_tokens=9, completion_tokens=10)


async def test_a_client_gone_before_the_cap_is_billed_what_it_was_sent() -> None:
    sent: list[bytes] = []
    upstream = Upstream(text_stream(), sent)
    request = make_request(cap=8)
    response = await MeasureUsage()(request, upstream)
    assert response.stream is not None
    async for piece in response.stream:
        sent.append(piece)
        if len(sent) == 4:  # role, " one", " two", " three"
            break
    await response.stream.aclose()  # type: ignore[attr-defined]
    assert upstream.closed == 1
    assert response.usage == Usage(prompt_tokens=prompt_tokens(request), completion_tokens=3, estimated=True)


async def test_an_outer_stage_s_on_close_sees_the_capped_usage() -> None:
    seen: list[Usage | None] = []
    upstream = Upstream(text_stream())
    response = await MeasureUsage()(make_request(cap=2), upstream)

    async def account() -> None:  # the accounting and limits stages settle in their on_close like this
        seen.append(response.usage)

    response.on_close(account)
    assert response.stream is not None
    sent = [piece async for piece in response.stream]
    await response.stream.aclose()  # type: ignore[attr-defined]
    assert error_of(sent[-1])["code"] == CAP_CODE
    assert len(seen) == 1
    assert seen[0] is not None
    assert seen[0].completion_tokens == 2
    assert seen[0].estimated


async def test_a_cut_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.usage"):
        await run(make_request(cap=2), text_stream())
    assert "request_id=req-1 model=gpt-4o-mini stream stopped at its budget hold: 2 completion tokens" in caplog.text


async def test_a_plain_answer_is_unchanged_by_a_cap() -> None:
    body = orjson.dumps({"choices": [{"index": 0, "message": {"content": "".join(WORDS)}}], "usage": UPSTREAM_USAGE})

    async def plain(request: ProxyRequest) -> ProxyResponse:
        return ProxyResponse(200, {}, body, model=MODEL)

    response = await MeasureUsage()(make_request(cap=2, stream=False), plain)
    assert response.body is body
    assert response.usage == Usage(prompt_tokens=9, completion_tokens=10)  # settled at its real cost


async def test_the_meter_alone_counts_and_cuts() -> None:
    meter = StreamMeter(strip=False, cap=3, model=MODEL, cap_event=lambda: b"data: {}\n\n")
    out = [c async for c in meter.filter(Upstream(text_stream(with_usage=False))._stream())]
    assert out[-1] == b"data: {}\n\n"
    assert meter.cut
    assert meter.counted == meter.completion_tokens(MODEL) == 3
    assert meter.usage is None


# ---------------------------------------------------------------- through the whole app


class _Transport:
    """A fake upstream connection: streams `chunks`, whatever the request says (so it ignores max_tokens)."""

    status = 200
    headers: dict[str, str] = {"content-type": "text/event-stream"}  # noqa: RUF012

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.bodies: list[Any] = []
        self.closed = 0

    async def send(self, method: str, url: str, headers: Any, body: bytes | None, timeouts: Any) -> Any:
        self.bodies.append(orjson.loads(body or b"{}"))
        return self

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for item in self.chunks:
            yield item

    async def read(self) -> bytes:
        raise AssertionError("a stream is not read whole")

    async def aclose(self) -> None:
        self.closed += 1


RESERVE = 4
BUDGET = {"usd_per_day": 10, "reserve_max_tokens": RESERVE}


@pytest.fixture
async def app_call(
    make_config: Callable[..., Any],
    started: Callable[[Any], Awaitable[Any]],
    asgi_call: Callable[..., Awaitable[Any]],
) -> Callable[..., Awaitable[Any]]:
    transport = _Transport(text_stream())
    config = make_config(
        {
            "policies": {"default": {"budget": BUDGET}},
            "models": {"gpt-4o-mini": {"upstream": "backup", "price": {"input": 0.15, "output": 0.6}}},
        }
    )
    app = create_app(config, transport_factory=lambda name, cfg: transport, metrics=Metrics(CollectorRegistry()))
    await started(app)

    async def call(**fields: Any) -> Any:
        body = dumps({"model": MODEL, "messages": MESSAGES, "stream": True, **fields})
        headers = [("authorization", f"Bearer {GATEWAY_KEY}")]
        response = await asyncio.wait_for(asgi_call(app, "POST", "/v1/chat/completions", headers, [body]), 5)
        response.transport = transport
        return response

    return call


async def test_through_the_app_a_stream_without_max_tokens_stops_at_the_budget_s_reserve(
    app_call: Callable[..., Awaitable[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="gateway.usage"):
        response = await app_call()
    assert response.status == 200
    body: bytes = response.body
    assert b" four" in body
    assert b" five" not in body
    assert not body.endswith(DONE)
    last = body[body.rindex(b"data: {") :]
    assert error_of(last)["code"] == CAP_CODE
    assert response.transport.closed == 1
    assert f"completion_tokens={RESERVE}, reasoning_tokens=0, estimated=True" in caplog.text


async def test_through_the_app_max_tokens_within_the_reserve_is_never_cut(
    app_call: Callable[..., Awaitable[Any]],
) -> None:
    response = await app_call(max_tokens=RESERVE - 1)  # the fake upstream overshoots it: settled at its real cost
    assert response.status == 200
    assert response.body == b"".join(without_usage(text_stream()))


async def test_through_the_app_max_tokens_above_the_reserve_is_cut_at_the_reserve(
    app_call: Callable[..., Awaitable[Any]],
) -> None:
    response = await app_call(max_completion_tokens=1000)
    body: bytes = response.body
    assert b" four" in body
    assert b" five" not in body
    error = error_of(body[body.rindex(b"data: {") :])
    assert error["code"] == CAP_CODE
    assert "its max_completion_tokens (1000) is more than that" in error["message"]


@pytest.mark.parametrize(
    ("chunk", "text"),
    [
        ({"choices": [{"index": 0, "delta": {"content": "hi"}}]}, "hi"),
        ({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None}}]}, ""),
        ({"choices": [{"delta": {"content": "a"}}, {"delta": {"content": "b", "reasoning_content": "r"}}]}, "abr"),
        ({"choices": [{"delta": {"tool_calls": [{"function": {"name": "f", "arguments": '{"x'}}]}}]}, 'f{"x'),
        ({"choices": [{"delta": {"function_call": {"arguments": "1}"}, "content": None}}]}, "1}"),
        ({"choices": [{"delta": {"refusal": "no", "reasoning": "why"}}, "junk", {"delta": "junk"}]}, "nowhy"),
        ({"choices": []}, ""),
        ({"choices": "junk"}, ""),
        ({"usage": {"prompt_tokens": 1}}, ""),
        (["not", "an", "object"], ""),
        (None, ""),
    ],
)
def test_the_delta_reader_finds_every_generated_text(chunk: Any, text: str) -> None:
    assert "".join(usage_module.completion_text(chunk, "delta")) == text
