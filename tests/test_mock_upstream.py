"""The built-in mock upstream: OpenAI wire format, determinism, error injection and introspection.

Plain responses go through httpx's ASGITransport; stream timing and disconnects drive the ASGI app
directly; the SDK checks and real-connection behaviour run it under uvicorn on a free local port.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pydantic
import pytest
import uvicorn

from gateway.mock_upstream import MockUpstream, example_for_schema

ROOT = Path(__file__).resolve().parent.parent
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
}


def chat(text: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=MockUpstream()), base_url="http://mock") as c:
        yield c


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


# --------------------------------------------------------------------------- direct ASGI driving


@dataclass
class Raw:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False

    def events(self) -> list[Any]:
        """The SSE `data:` payloads, JSON-decoded except for the literal `[DONE]`."""
        text = b"".join(self.chunks).decode()
        assert text.endswith("\n\n"), text[-80:]
        out: list[Any] = []
        for block in text.split("\n\n")[:-1]:
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
        return out


async def call(
    app: MockUpstream,
    body: dict[str, Any] | None,
    *,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
    disconnect_after_s: float | None = None,
) -> Raw:
    """Run one request through the app; the client "disconnects" after `disconnect_after_s`."""
    raw = Raw()
    pending = [{"type": "http.request", "body": json.dumps(body).encode() if body else b"", "more_body": False}]
    loop = asyncio.get_running_loop()
    disconnect_at = None if disconnect_after_s is None else loop.time() + disconnect_after_s

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        if disconnect_at is None:
            await asyncio.Future()  # never: only cancelled by the app's own timeouts
        else:
            await asyncio.sleep(max(0.0, disconnect_at - loop.time()))
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            raw.status = message["status"]
            raw.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            raw.chunks.append(message.get("body", b""))
            raw.complete = not message.get("more_body", False)

    scope = {
        "type": "http",
        "method": "POST" if body is not None else "GET",
        "path": path.partition("?")[0],
        "query_string": path.partition("?")[2].encode(),
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    await app(scope, receive, send)
    return raw


# --------------------------------------------------------------------------- chat completions


@pytest.mark.asyncio
async def test_chat_completion_shape_and_deterministic_usage(client: httpx.AsyncClient) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello   there\nworld", "name": "bob"},
        ],
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert data["id"].startswith("chatcmpl-mock-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    assert abs(data["created"] - time.time()) < 60
    assert data["model"] == "gpt-4o-mini"
    assert data["system_fingerprint"] == "fp_mock"
    (choice,) = data["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Mock reply to: Hello there world"
    # prompt: 3 + (3 + 2 words) + (3 + 3 words + 1 for the name) = 15; reply: 6 words.
    usage = data["usage"]
    assert usage["prompt_tokens"] == 15
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == 21
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


@pytest.mark.asyncio
async def test_ids_are_unique_while_content_repeats(client: httpx.AsyncClient) -> None:
    first = (await client.post("/v1/chat/completions", json=chat())).json()
    second = (await client.post("/v1/chat/completions", json=chat())).json()
    assert first["id"] != second["id"]
    assert first["choices"] == second["choices"]
    assert first["usage"] == second["usage"]


@pytest.mark.asyncio
async def test_content_parts_and_sixty_character_snippet(client: httpx.AsyncClient) -> None:
    long_text = "x" * 50 + " " + "y" * 50
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "an earlier question"},
            {"role": "assistant", "content": "an answer"},
            {
                "role": "user",
                "content": [{"type": "text", "text": long_text}, {"type": "image_url", "image_url": {"url": "x"}}],
            },
        ],
    }
    data = (await client.post("/v1/chat/completions", json=body)).json()
    assert data["choices"][0]["message"]["content"] == "Mock reply to: " + long_text[:60]


@pytest.mark.asyncio
async def test_n_choices(client: httpx.AsyncClient) -> None:
    data = (await client.post("/v1/chat/completions", json=chat("one two", n=3))).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in data["choices"]} == {"Mock reply to: one two"}
    assert data["usage"]["completion_tokens"] == 3 * 5


@pytest.mark.asyncio
@pytest.mark.parametrize("field_name", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_truncates_by_words(client: httpx.AsyncClient, field_name: str) -> None:
    data = (await client.post("/v1/chat/completions", json=chat("a b c d", **{field_name: 3}))).json()
    choice = data["choices"][0]
    assert choice["message"]["content"] == "Mock reply to:"
    assert choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3


@pytest.mark.asyncio
async def test_max_tokens_larger_than_reply_changes_nothing(client: httpx.AsyncClient) -> None:
    data = (await client.post("/v1/chat/completions", json=chat("a", max_tokens=100))).json()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["choices"][0]["message"]["content"] == "Mock reply to: a"


@pytest.mark.asyncio
async def test_tool_call_from_parameter_schema(client: httpx.AsyncClient) -> None:
    data = (await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL, TIME_TOOL]))).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "mock", "unit": "celsius", "days": 1}
    arguments = call["function"]["arguments"]
    assert data["usage"]["completion_tokens"] == math.ceil(len(arguments) / 4)


@pytest.mark.asyncio
async def test_tool_choice_names_the_function(client: httpx.AsyncClient) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    body = chat(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice)
    data = (await client.post("/v1/chat/completions", json=body)).json()
    call = data["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_time"
    assert json.loads(call["function"]["arguments"]) == {"zone": "mock"}


@pytest.mark.asyncio
async def test_tool_choice_none_answers_with_text(client: httpx.AsyncClient) -> None:
    data = (await client.post("/v1/chat/completions", json=chat("hi", tools=[WEATHER_TOOL], tool_choice="none"))).json()
    message = data["choices"][0]["message"]
    assert "tool_calls" not in message
    assert message["content"] == "Mock reply to: hi"


@pytest.mark.asyncio
async def test_tool_choice_unknown_function_is_a_400(client: httpx.AsyncClient) -> None:
    choice = {"type": "function", "function": {"name": "nope"}}
    response = await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL], tool_choice=choice))
    assert assert_openai_error(response, 400)["param"] == "tool_choice"


@pytest.mark.asyncio
async def test_json_schema_response_format(client: httpx.AsyncClient) -> None:
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "rating": {"type": "number"},
            "count": {"type": "integer"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "kind": {"enum": ["book", "film"]},
            "author": {"$ref": "#/$defs/Person"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "$defs": {"Person": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "review", "schema": schema, "strict": True}}
    data = (await client.post("/v1/chat/completions", json=chat(response_format=response_format))).json()
    assert json.loads(data["choices"][0]["message"]["content"]) == {
        "title": "mock",
        "rating": 0,
        "count": 0,
        "ok": False,
        "tags": [],
        "kind": "book",
        "author": {"name": "mock"},
        "note": "mock",
    }


@pytest.mark.asyncio
async def test_json_object_response_format(client: httpx.AsyncClient) -> None:
    body = chat("give json", response_format={"type": "json_object"})
    data = (await client.post("/v1/chat/completions", json=body)).json()
    assert json.loads(data["choices"][0]["message"]["content"]) == {"reply": "Mock reply to: give json"}


@pytest.mark.asyncio
async def test_logprobs(client: httpx.AsyncClient) -> None:
    data = (await client.post("/v1/chat/completions", json=chat("a b", logprobs=True, top_logprobs=2))).json()
    choice = data["choices"][0]
    entries = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    for entry in entries:
        assert entry["logprob"] < 0
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]
    plain = (await client.post("/v1/chat/completions", json=chat("a b"))).json()
    assert plain["choices"][0]["logprobs"] is None


def test_schema_examples() -> None:
    assert example_for_schema({"type": "integer", "minimum": 5}) == 5
    assert example_for_schema({"type": "number", "exclusiveMaximum": -2}) == -3
    assert example_for_schema({"type": ["null", "string"]}) == "mock"
    assert example_for_schema({"const": "fixed"}) == "fixed"
    assert example_for_schema({"type": "array", "minItems": 2, "items": {"type": "boolean"}}) == [False, False]
    assert example_for_schema({"type": "string", "minLength": 6}) == "mmmmmm"
    # A recursive schema ends: the optional child turns null once nesting is deep.
    recursive = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {"child": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}},
            }
        },
        "$ref": "#/$defs/Node",
    }
    value = example_for_schema(recursive)
    depth = 0
    while value is not None:
        value = value["child"]
        depth += 1
    assert 1 < depth < 10


# --------------------------------------------------------------------------- Azure, models, embeddings


@pytest.mark.asyncio
async def test_azure_chat_reports_the_deployment(client: httpx.AsyncClient) -> None:
    path = "/openai/deployments/my-dep/chat/completions?api-version=2024-10-21"
    data = (await client.post(path, json={"messages": [{"role": "user", "content": "x"}]})).json()
    assert data["model"] == "my-dep"
    assert data["choices"][0]["message"]["content"] == "Mock reply to: x"


@pytest.mark.asyncio
async def test_azure_requires_api_version(client: httpx.AsyncClient) -> None:
    response = await client.post("/openai/deployments/my-dep/chat/completions", json=chat())
    assert_openai_error(response, 400)


@pytest.mark.asyncio
async def test_models(client: httpx.AsyncClient) -> None:
    listing = (await client.get("/v1/models")).json()
    assert listing["object"] == "list"
    ids = [m["id"] for m in listing["data"]]
    assert "gpt-4o-mini" in ids
    assert all(m["object"] == "model" for m in listing["data"])
    one = (await client.get("/v1/models/gpt-4o-mini")).json()
    assert one["id"] == "gpt-4o-mini"
    assert one["object"] == "model"
    assert_openai_error(await client.get("/v1/models/nope"), 404, "model_not_found")


@pytest.mark.asyncio
async def test_embeddings_float(client: httpx.AsyncClient) -> None:
    body = {"model": "text-embedding-3-small", "input": ["hello world", "bye", "hello world"]}
    data = (await client.post("/v1/embeddings", json=body)).json()
    assert data["object"] == "list"
    assert data["model"] == "text-embedding-3-small"
    assert [d["index"] for d in data["data"]] == [0, 1, 2]
    vectors = [d["embedding"] for d in data["data"]]
    assert all(d["object"] == "embedding" for d in data["data"])
    assert all(len(v) == 8 for v in vectors)
    assert vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
    assert math.isclose(math.sqrt(sum(x * x for x in vectors[0])), 1.0, rel_tol=1e-5)
    assert data["usage"] == {"prompt_tokens": 5, "total_tokens": 5}


@pytest.mark.asyncio
async def test_embeddings_base64_matches_float_and_dimensions(client: httpx.AsyncClient) -> None:
    body: dict[str, Any] = {"model": "e", "input": "some text", "dimensions": 5}
    floats = (await client.post("/v1/embeddings", json=body)).json()["data"][0]["embedding"]
    encoded = (await client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})).json()
    decoded = list(struct.unpack("<5f", base64.b64decode(encoded["data"][0]["embedding"])))
    assert len(floats) == 5
    assert decoded == floats


@pytest.mark.asyncio
async def test_embeddings_token_arrays(client: httpx.AsyncClient) -> None:
    many = (await client.post("/v1/embeddings", json={"model": "e", "input": [[1, 2, 3], [4]]})).json()
    assert len(many["data"]) == 2
    assert many["usage"]["prompt_tokens"] == 4
    single = (await client.post("/v1/embeddings", json={"model": "e", "input": [1, 2, 3]})).json()
    assert len(single["data"]) == 1
    assert single["data"][0]["embedding"] == many["data"][0]["embedding"]


@pytest.mark.asyncio
@pytest.mark.parametrize("bad_input", [None, 5, [], [1, "a"], [{"x": 1}]])
async def test_embeddings_bad_input(client: httpx.AsyncClient, bad_input: Any) -> None:
    response = await client.post("/v1/embeddings", json={"model": "e", "input": bad_input})
    assert assert_openai_error(response, 400)["param"] == "input"


# --------------------------------------------------------------------------- errors and auth


@pytest.mark.asyncio
async def test_auth_required_when_configured() -> None:
    transport = httpx.ASGITransport(app=MockUpstream(api_key="sk-right"))
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as c:
        missing = await c.post("/v1/chat/completions", json=chat())
        error = assert_openai_error(missing, 401, "invalid_api_key")
        assert error["type"] == "invalid_request_error"
        assert error["param"] is None
        wrong = await c.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer sk-wrong"})
        assert_openai_error(wrong, 401, "invalid_api_key")
        bearer = await c.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer sk-right"})
        assert bearer.status_code == 200
        azure_style = await c.get("/v1/models", headers={"api-key": "sk-right"})
        assert azure_style.status_code == 200


@pytest.mark.asyncio
async def test_malformed_json_unknown_path_and_method(client: httpx.AsyncClient) -> None:
    bad = await client.post("/v1/chat/completions", content=b"{not json")
    assert_openai_error(bad, 400)
    not_object = await client.post("/v1/chat/completions", json=[1, 2])
    assert_openai_error(not_object, 400)
    assert_openai_error(await client.post("/v1/nope", json={}), 404)
    assert_openai_error(await client.get("/v1/chat/completions"), 405)
    no_messages = await client.post("/v1/chat/completions", json={"model": "m"})
    assert assert_openai_error(no_messages, 400)["param"] == "messages"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "error_type", "code"),
    [
        (429, "requests", "rate_limit_exceeded"),
        (500, "server_error", None),
        (503, "server_error", "service_unavailable"),
        (400, "invalid_request_error", None),
    ],
)
async def test_injected_status(client: httpx.AsyncClient, status: int, error_type: str, code: str | None) -> None:
    headers = {"x-mock-status": str(status), "x-mock-retry-after": "7"}
    response = await client.post("/v1/chat/completions", json=chat(), headers=headers)
    error = assert_openai_error(response, status)
    assert error["type"] == error_type
    assert error["code"] == code
    assert response.headers["retry-after"] == "7"


@pytest.mark.asyncio
async def test_injected_status_applies_to_embeddings_and_models(client: httpx.AsyncClient) -> None:
    headers = {"x-mock-status": "502"}
    assert_openai_error(await client.post("/v1/embeddings", json={"model": "e", "input": "x"}, headers=headers), 502)
    assert_openai_error(await client.get("/v1/models", headers=headers), 502)
    assert "retry-after" not in (await client.get("/v1/models", headers=headers)).headers


@pytest.mark.asyncio
async def test_fail_times_then_success_per_key() -> None:
    app = MockUpstream()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as c:

        async def status(key: str, **extra: str) -> int:
            headers = {"x-mock-fail-times": "2", "x-mock-fail-key": key, **extra}
            return (await c.post("/v1/chat/completions", json=chat(), headers=headers)).status_code

        assert [await status("a") for _ in range(4)] == [500, 500, 200, 200]
        assert [await status("b", **{"x-mock-status": "429"}) for _ in range(3)] == [429, 429, 200]
    # A fresh instance has fresh counters.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=MockUpstream()), base_url="http://mock") as c:
        headers = {"x-mock-fail-times": "1", "x-mock-fail-key": "a"}
        assert (await c.post("/v1/chat/completions", json=chat(), headers=headers)).status_code == 500


@pytest.mark.asyncio
async def test_omit_usage(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat(), headers={"x-mock-omit-usage": "1"})
    assert response.status_code == 200
    assert "usage" not in response.json()


# --------------------------------------------------------------------------- latency, introspection


@pytest.mark.asyncio
async def test_constructor_and_header_latency() -> None:
    transport = httpx.ASGITransport(app=MockUpstream(latency_ms=80))
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as c:
        start = time.perf_counter()
        assert (await c.get("/v1/models")).status_code == 200
        assert time.perf_counter() - start >= 0.075
        start = time.perf_counter()
        assert (await c.get("/v1/models", headers={"x-mock-latency-ms": "100"})).status_code == 200
        assert time.perf_counter() - start >= 0.175
        start = time.perf_counter()
        assert (await c.get("/mock/stats")).status_code == 200
        assert time.perf_counter() - start < 0.075


@pytest.mark.asyncio
async def test_recorded_requests_and_stats() -> None:
    app = MockUpstream()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as c:
        await c.post(
            "/openai/deployments/d1/chat/completions?api-version=v1",
            json={"messages": [{"role": "user", "content": "x"}]},
            headers={"X-Mock-Tag": "t1", "Authorization": "Bearer abc"},
        )
        await c.post("/v1/chat/completions", content=b"{broken")
        await c.get("/v1/models")
        recorded = (await c.get("/mock/requests")).json()["data"]
        assert [r["path"] for r in recorded] == [
            "/openai/deployments/d1/chat/completions",
            "/v1/chat/completions",
            "/v1/models",
        ]
        first = recorded[0]
        assert first["method"] == "POST"
        assert first["query"] == "api-version=v1"
        assert first["headers"]["x-mock-tag"] == "t1"
        assert first["headers"]["authorization"] == "Bearer abc"
        assert first["body"] == {"messages": [{"role": "user", "content": "x"}]}
        assert recorded[1]["body"] is None
        assert recorded[2]["method"] == "GET"
        assert (await c.get("/mock/stats")).json() == {"in_flight": 0, "total": 3, "cancelled": 0}
        assert (await c.delete("/mock/requests")).status_code == 200
        assert (await c.get("/mock/requests")).json() == {"data": []}
        assert_openai_error(await c.get("/mock/nothing"), 404)


@pytest.mark.asyncio
async def test_only_the_last_hundred_requests_are_kept() -> None:
    app = MockUpstream()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as c:
        for i in range(105):
            await c.get(f"/v1/models/m{i}")
        recorded = (await c.get("/mock/requests")).json()["data"]
    assert len(recorded) == 100
    assert recorded[0]["path"] == "/v1/models/m5"
    assert recorded[-1]["path"] == "/v1/models/m104"


# --------------------------------------------------------------------------- streaming (direct ASGI)


def contents(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e != "[DONE]" and e["choices"])


@pytest.mark.asyncio
async def test_stream_with_usage() -> None:
    raw = await call(MockUpstream(), chat("stream me", stream=True, stream_options={"include_usage": True}))
    assert raw.status == 200
    assert raw.headers["content-type"] == "text/event-stream"
    assert raw.complete
    events = raw.events()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    words = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert words == ["Mock", " reply", " to:", " stream", " me"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["choices"][0]["delta"] == {}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-1]["usage"]["prompt_tokens"] == 3 + 3 + 2


@pytest.mark.asyncio
async def test_repeated_requests_keep_unique_ids_and_respect_headers_and_deployment() -> None:
    # The mock reuses serializations of identical requests; nothing request-specific may leak through.
    app = MockUpstream()
    body = chat("same", stream=True, stream_options={"include_usage": True})
    first, second = (await call(app, body)).events(), (await call(app, body)).events()
    assert first[0]["id"] != second[0]["id"]
    assert [e["choices"] for e in first[:-1]] == [e["choices"] for e in second[:-1]]
    omitted = (await call(app, body, headers={"x-mock-omit-usage": "1"})).events()
    assert all("usage" not in e for e in omitted[:-1])
    plain = chat("same")
    assert "usage" in json.loads(b"".join((await call(app, plain)).chunks))
    assert "usage" not in json.loads(b"".join((await call(app, plain, headers={"x-mock-omit-usage": "1"})).chunks))
    azure = "/openai/deployments/{}/chat/completions?api-version=2024-10-21"
    one = json.loads(b"".join((await call(app, plain, path=azure.format("dep-a"))).chunks))
    two = json.loads(b"".join((await call(app, plain, path=azure.format("dep-b"))).chunks))
    assert (one["model"], two["model"]) == ("dep-a", "dep-b")
    tools = chat(tools=[WEATHER_TOOL])
    call_ids = [
        json.loads(b"".join((await call(app, tools)).chunks))["choices"][0]["message"]["tool_calls"][0]["id"]
        for _ in range(2)
    ]
    assert call_ids[0] != call_ids[1]
    stream_tools = chat(tools=[WEATHER_TOOL], stream=True)
    stream_ids = [
        (await call(app, stream_tools)).events()[0]["choices"][0]["delta"]["tool_calls"][0]["id"] for _ in range(2)
    ]
    assert stream_ids[0] != stream_ids[1]


@pytest.mark.asyncio
async def test_stream_without_include_usage_has_no_usage_key() -> None:
    events = (await call(MockUpstream(), chat("hi", stream=True))).events()
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert contents(events) == "Mock reply to: hi"


@pytest.mark.asyncio
async def test_stream_omit_usage_overrides_include_usage() -> None:
    body = chat("hi", stream=True, stream_options={"include_usage": True})
    events = (await call(MockUpstream(), body, headers={"x-mock-omit-usage": "1"})).events()
    assert all("usage" not in e for e in events[:-1])
    assert all(e["choices"] for e in events[:-1])


@pytest.mark.asyncio
async def test_stream_n_choices_and_max_tokens() -> None:
    events = (await call(MockUpstream(), chat("a b c", stream=True, n=2, max_tokens=2))).events()[:-1]
    for index in (0, 1):
        mine = [e for e in events if e["choices"][0]["index"] == index]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in mine) == "Mock reply"
        assert mine[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.asyncio
async def test_stream_tool_call() -> None:
    app = MockUpstream()
    events = (await call(app, chat(stream=True, tools=[WEATHER_TOOL]))).events()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    assert first["content"] is None
    (head,) = first["tool_calls"]
    assert head["index"] == 0
    assert head["id"].startswith("call_")
    assert head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:-1]]
    assert len(fragments) > 1
    assert all(set(f) == {"index", "function"} for f in fragments)
    arguments = "".join(f["function"]["arguments"] for f in fragments)
    assert json.loads(arguments) == {"city": "mock", "unit": "celsius", "days": 1}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.asyncio
async def test_stream_logprobs_per_chunk() -> None:
    events = (await call(MockUpstream(), chat("x", stream=True, logprobs=True))).events()[:-1]
    for event in events[1:-1]:
        (entry,) = event["choices"][0]["logprobs"]["content"]
        assert entry["token"] == event["choices"][0]["delta"]["content"]


@pytest.mark.asyncio
async def test_stream_error_event_mid_stream() -> None:
    raw = await call(MockUpstream(), chat("one two three four", stream=True), headers={"x-mock-stream-error": "1"})
    assert raw.complete
    events = raw.events()
    assert "[DONE]" not in events
    assert set(events[-1]) == {"error"}
    assert events[-1]["error"]["type"] == "server_error"
    assert 1 <= len(events) - 1 < 7  # some chunks, not all of them
    assert contents(events[:-1]).startswith("Mock")


@pytest.mark.asyncio
async def test_stream_disconnect_after_n_events() -> None:
    raw = await call(MockUpstream(), chat("a b c", stream=True), headers={"x-mock-disconnect-after": "3"})
    assert not raw.complete
    assert len(raw.chunks) == 3
    assert b"[DONE]" not in b"".join(raw.chunks)


@pytest.mark.asyncio
async def test_stream_disconnect_after_more_than_all_events_still_omits_done() -> None:
    raw = await call(MockUpstream(), chat("a", stream=True), headers={"x-mock-disconnect-after": "100"})
    assert not raw.complete
    assert b"[DONE]" not in b"".join(raw.chunks)
    assert b'"finish_reason":"stop"' in b"".join(raw.chunks)


@pytest.mark.asyncio
async def test_chunk_delay_spaces_out_events() -> None:
    start = time.perf_counter()
    raw = await call(MockUpstream(), chat("a", stream=True), headers={"x-mock-chunk-delay-ms": "20"})
    events = raw.events()
    assert time.perf_counter() - start >= 0.02 * (len(events) - 1) * 0.9


@pytest.mark.asyncio
async def test_client_disconnect_during_stream_is_counted_and_stops_sending() -> None:
    app = MockUpstream()
    raw = await call(
        app, chat("a b c d e", stream=True), headers={"x-mock-chunk-delay-ms": "50"}, disconnect_after_s=0.12
    )
    assert not raw.complete
    assert 1 <= len(raw.chunks) <= 4
    assert app.stats() == {"in_flight": 0, "total": 1, "cancelled": 1}


@pytest.mark.asyncio
async def test_client_disconnect_during_latency_is_counted() -> None:
    app = MockUpstream(latency_ms=5000)
    start = time.perf_counter()
    raw = await call(app, chat(), disconnect_after_s=0.05)
    assert time.perf_counter() - start < 2
    assert raw.status == 0  # nothing was sent
    assert app.cancelled == 1
    assert app.in_flight == 0


@pytest.mark.asyncio
async def test_in_flight_counts_requests_being_served() -> None:
    app = MockUpstream(latency_ms=200)
    task = asyncio.create_task(call(app, chat()))
    await asyncio.sleep(0.05)
    assert app.stats()["in_flight"] == 1
    raw = await task
    assert raw.status == 200
    assert app.stats() == {"in_flight": 0, "total": 1, "cancelled": 0}


# --------------------------------------------------------------------------- a real server and the SDK


@dataclass
class Live:
    app: MockUpstream
    url: str


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    app = MockUpstream()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, loop="asyncio", http="httptools", ws="none", lifespan="off", access_log=False, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            assert thread.is_alive(), "uvicorn thread died"
            time.sleep(0.01)
        yield Live(app, f"http://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def sdk(live: Live) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="sk-any", max_retries=0, timeout=10) as client:
        yield client


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_sdk_chat_completion(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi SDK"}])
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == "Mock reply to: Hi SDK"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 8 + 5
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0


def test_sdk_stream_with_usage(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream via sdk"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Mock reply to: stream via sdk"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_sdk_tool_calls(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL],
    )
    calls = completion.choices[0].message.tool_calls
    assert calls is not None
    call = calls[0]
    assert call.type == "function"
    assert isinstance(call, openai.types.chat.ChatCompletionMessageFunctionToolCall)
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "mock"


def test_sdk_stream_tool_calls_accumulate(sdk: openai.OpenAI) -> None:
    with sdk.chat.completions.stream(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL]
    ) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "mock", "unit": "celsius", "days": 1}


class Author(pydantic.BaseModel):
    name: str
    born: int | None


class Book(pydantic.BaseModel):
    title: str
    genre: Literal["novel", "poetry"]
    authors: list[Author]
    main_author: Author
    in_print: bool


def test_sdk_parse_json_schema(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.parse(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a book"}], response_format=Book
    )
    book = completion.choices[0].message.parsed
    assert book == Book(
        title="mock", genre="novel", authors=[], main_author=Author(name="mock", born=0), in_print=False
    )


def test_sdk_embeddings_float_and_base64(sdk: openai.OpenAI) -> None:
    inputs = ["first text", "second"]
    as_float = sdk.embeddings.create(model="text-embedding-3-small", input=inputs, encoding_format="float")
    default = sdk.embeddings.create(model="text-embedding-3-small", input=inputs)  # SDK asks base64, decodes
    as_base64 = sdk.embeddings.create(model="text-embedding-3-small", input=inputs, encoding_format="base64")
    assert [d.embedding for d in default.data] == [d.embedding for d in as_float.data]
    encoded = as_base64.data[1].embedding
    assert isinstance(encoded, str)  # the SDK leaves an explicitly requested base64 string alone
    raw = base64.b64decode(encoded)
    assert list(struct.unpack("<8f", raw)) == as_float.data[1].embedding
    assert as_float.usage.prompt_tokens == 3


def test_sdk_sees_injected_errors(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], extra_headers={"x-mock-status": "429"}
        )
    assert caught.value.code == "rate_limit_exceeded"
    stream = sdk.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "x y z"}],
        stream=True,
        extra_headers={"x-mock-stream-error": "1"},
    )
    with pytest.raises(openai.APIError, match="mid-stream"):
        list(stream)


def test_real_disconnect_after_breaks_the_stream(live: Live) -> None:
    body = chat("a b c d", stream=True)
    with httpx.Client(timeout=5) as http:
        headers = {"x-mock-disconnect-after": "2"}
        with http.stream("POST", f"{live.url}/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                response.read()
        # The server is still fine afterwards.
        assert http.get(f"{live.url}/v1/models").status_code == 200


def test_real_client_disconnect_during_latency_is_cancelled(live: Live) -> None:
    before = live.app.cancelled
    with httpx.Client(timeout=0.2) as http, pytest.raises(httpx.ReadTimeout):
        http.post(f"{live.url}/v1/chat/completions", json=chat(), headers={"x-mock-latency-ms": "3000"})
    wait_for(lambda: live.app.cancelled == before + 1)
    with httpx.Client(timeout=5) as http:
        stats = http.get(f"{live.url}/mock/stats").json()
    assert stats["cancelled"] == before + 1
    assert stats["in_flight"] == 0


def test_real_client_disconnect_mid_stream_is_cancelled(live: Live) -> None:
    before = live.app.cancelled
    body = chat("one two three four five six", stream=True)
    with (
        httpx.Client(timeout=5) as http,
        http.stream(
            "POST", f"{live.url}/v1/chat/completions", json=body, headers={"x-mock-chunk-delay-ms": "100"}
        ) as response,
    ):
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    # Leaving the block closed the connection mid-stream.
    wait_for(lambda: live.app.cancelled == before + 1)
    wait_for(lambda: live.app.in_flight == 0)


def test_serve_runs_a_standalone_server() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = f"from gateway.mock_upstream import serve; serve(port={port}, api_key='sk-k', latency_ms=1)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}/v1/models"
        deadline = time.monotonic() + 15
        with httpx.Client(timeout=2) as http:
            while True:
                assert proc.poll() is None, "mock process exited"
                try:
                    response = http.get(url)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "mock did not start"
                    time.sleep(0.05)
            assert response.status_code == 401
            assert http.get(url, headers={"authorization": "Bearer sk-k"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
