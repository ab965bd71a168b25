"""The happy paths, through the real `openai` SDK (sync and async) against real processes."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Callable
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from .support import (
    ACME_KEY,
    ALL_MODELS,
    AZURE_API_VERSION,
    AZURE_DEPLOYMENT,
    LIMITED_KEY,
    UPSTREAM_KEY,
)

Finder = Callable[[str], list[dict[str, Any]]]


def _tagged(tag: str) -> dict[str, str]:
    return {"x-mock-tag": tag}


def test_chat_completion_sync(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Hello   there, gateway"}],
        extra_headers=_tagged(tag),
    )
    completion = raw.parse()
    assert raw.status_code == 200
    assert raw.headers["x-request-id"]
    assert raw.headers["content-type"].startswith("application/json")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Mock reply to: Hello there, gateway"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    # 3 + (3 + 3 words) prompt tokens; "Mock reply to: Hello there, gateway" is 6 pieces.
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (9, 6)
    [seen] = upstream_requests(tag)
    assert seen["path"] == "/v1/chat/completions"
    assert seen["body"]["model"] == "gpt-4o-mini"


async def test_chat_completion_async(async_client: openai.AsyncOpenAI) -> None:
    completion = await async_client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "async hello"}]
    )
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == "Mock reply to: async hello"


def test_upstream_gets_upstream_key_never_gateway_key(
    client: openai.OpenAI, tag: str, upstream_requests: Finder
) -> None:
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "who am I"}], extra_headers=_tagged(tag)
    )
    [seen] = upstream_requests(tag)
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    dumped = json.dumps(seen)
    assert ACME_KEY not in dumped
    # Client headers outside `forward_headers` stay behind.
    assert "x-stainless-lang" not in seen["headers"]


def test_unknown_fields_reach_upstream_untouched(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "pass it on"}],
        seed=42,
        n=2,
        logprobs=True,
        top_logprobs=2,
        extra_body={"some_future_field": {"x": 1, "nested": [1.5, None, "s"]}},
        extra_headers=_tagged(tag),
    )
    assert len(completion.choices) == 2
    assert completion.choices[1].logprobs is not None
    assert completion.choices[1].logprobs.content is not None
    assert len(completion.choices[1].logprobs.content[0].top_logprobs) == 2
    [seen] = upstream_requests(tag)
    body = seen["body"]
    assert body["some_future_field"] == {"x": 1, "nested": [1.5, None, "s"]}
    assert (body["seed"], body["n"], body["logprobs"], body["top_logprobs"]) == (42, 2, True, 2)


def test_upstream_model_rewrite(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    completion = client.chat.completions.create(
        model="renamed-model",
        messages=[{"role": "user", "content": "rename"}],
        # The rewrite re-serialises the body: unknown fields, and integers beyond 64 bits, must survive it.
        extra_body={"future": {"deep": [True, None]}, "big": 2**70},
        extra_headers=_tagged(tag),
    )
    assert completion.choices[0].message.content == "Mock reply to: rename"
    [seen] = upstream_requests(tag)
    assert seen["body"]["model"] == "gpt-4.1-mini"
    assert seen["body"]["messages"] == [{"role": "user", "content": "rename"}]
    assert seen["body"]["future"] == {"deep": [True, None]}
    assert seen["body"]["big"] == float(2**70)  # the mock's JSON parser reads it as a double


def test_azure_upstream(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    completion = client.chat.completions.create(
        model="azure-gpt", messages=[{"role": "user", "content": "hi azure"}], extra_headers=_tagged(tag)
    )
    assert completion.model == AZURE_DEPLOYMENT  # the mock reports the deployment, as Azure does
    assert completion.choices[0].message.content == "Mock reply to: hi azure"
    [seen] = upstream_requests(tag)
    assert seen["path"] == f"/openai/deployments/{AZURE_DEPLOYMENT}/chat/completions"
    assert seen["query"] == f"api-version={AZURE_API_VERSION}"
    assert seen["headers"]["api-key"] == UPSTREAM_KEY
    assert "authorization" not in seen["headers"]


def _collect(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_streaming_sync_without_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream this please"}], stream=True
    )
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    assert stream.response.headers["x-request-id"]
    chunks = list(stream)
    assert len(chunks) >= 3
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert _collect(chunks) == "Mock reply to: stream this please"


def test_streaming_sync_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "count my tokens"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    final = chunks[-1]
    assert final.choices == []
    assert final.usage is not None
    assert final.usage.prompt_tokens == 3 + 3 + 3
    assert final.usage.completion_tokens == 6  # "Mock reply to: count my tokens"
    assert final.usage.total_tokens == 15
    assert all(c.usage is None for c in chunks[:-1])
    assert _collect(chunks) == "Mock reply to: count my tokens"


async def test_streaming_async_with_usage(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model="azure-gpt",
        messages=[{"role": "user", "content": "async stream"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert _collect(chunks) == "Mock reply to: async stream"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


async def test_streaming_async_helper_accumulates(async_client: openai.AsyncOpenAI) -> None:
    async with async_client.chat.completions.stream(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "helper stream"}]
    ) as stream:
        async for _event in stream:
            pass
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "Mock reply to: helper stream"
    assert final.choices[0].finish_reason == "stop"


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city", "days"],
        },
    },
}


def test_tool_calls(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "weather in Paris?"}], tools=[WEATHER_TOOL]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "mock", "days": 1}


async def test_tool_calls_streamed_async(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    name = ""
    arguments = ""
    async for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            assert call.function is not None
            name += call.function.name or ""
            arguments += call.function.arguments or ""
    assert name == "get_weather"
    assert json.loads(arguments) == {"city": "mock", "days": 1}


class Weather(BaseModel):
    city: str
    temperature_c: float
    sunny: bool


def test_structured_output_parse(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    completion = client.chat.completions.parse(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "weather as json"}],
        response_format=Weather,
        extra_headers=_tagged(tag),
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Weather)
    assert parsed == Weather(city="mock", temperature_c=0, sunny=False)
    [seen] = upstream_requests(tag)
    assert seen["body"]["response_format"]["type"] == "json_schema"
    assert seen["body"]["response_format"]["json_schema"]["name"] == "Weather"


async def test_structured_output_json_schema_async(async_client: openai.AsyncOpenAI) -> None:
    completion = await async_client.chat.completions.parse(
        model="gpt-4o", messages=[{"role": "user", "content": "weather"}], response_format=Weather
    )
    assert completion.choices[0].message.parsed == Weather(city="mock", temperature_c=0, sunny=False)


def test_embeddings_float_and_base64(client: openai.OpenAI, tag: str, upstream_requests: Finder) -> None:
    texts = ["first text", "second one here"]
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=texts, encoding_format="float", extra_headers=_tagged(tag)
    )
    assert [d.index for d in floats.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in floats.data)
    assert floats.usage.prompt_tokens == 5
    encoded = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=texts, encoding_format="base64", extra_headers=_tagged(tag)
    )
    raw = json.loads(encoded.text)
    for as_float, as_b64 in zip(floats.data, raw["data"], strict=True):
        assert isinstance(as_b64["embedding"], str)
        decoded = struct.unpack("<8f", base64.b64decode(as_b64["embedding"]))
        assert decoded == pytest.approx(as_float.embedding, rel=1e-6)
    assert [r["body"]["encoding_format"] for r in upstream_requests(tag)] == ["float", "base64"]


async def test_embeddings_async_default_encoding(async_client: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 by default and decodes it to floats itself.
    result = await async_client.embeddings.create(model="text-embedding-3-small", input="hello")
    vector = result.data[0].embedding
    assert len(vector) == 8
    assert sum(v * v for v in vector) == pytest.approx(1.0, rel=1e-4)


def test_models_list_and_retrieve(client: openai.OpenAI, limited_client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ALL_MODELS
    assert [m.id for m in limited_client.models.list()] == ["gpt-4o-mini"]
    model = client.models.retrieve("renamed-model")
    assert (model.id, model.object, model.owned_by) == ("renamed-model", "model", "mock")
    assert limited_client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError) as excinfo:
        limited_client.models.retrieve("gpt-4o")
    assert excinfo.value.code == "model_not_found"


async def test_models_list_async(gateway: Any) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=LIMITED_KEY, max_retries=0) as sdk:
        page = await sdk.models.list()
        assert [m.id for m in page.data] == ["gpt-4o-mini"]


def test_limited_tenant_can_use_allowed_model(limited_client: openai.OpenAI) -> None:
    completion = limited_client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "allowed"}]
    )
    assert completion.choices[0].message.content == "Mock reply to: allowed"


def test_unicode_survives_streaming(client: openai.OpenAI) -> None:
    text = "héllo wörld 世界 🎉 ok"
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], stream=True
    )
    assert _collect(list(stream)) == f"Mock reply to: {text}"


async def test_concurrent_requests_do_not_mix(async_client: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> str:
        messages: Any = [{"role": "user", "content": f"request number {i}"}]
        if i % 2:
            stream = await async_client.chat.completions.create(
                model="gpt-4o-mini", messages=messages, stream=True, extra_headers={"x-mock-chunk-delay-ms": "5"}
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        completion = await async_client.chat.completions.create(
            model="azure-gpt" if i % 4 == 0 else "gpt-4o", messages=messages, extra_headers={"x-mock-latency-ms": "20"}
        )
        return completion.choices[0].message.content or ""

    replies = await asyncio.gather(*(one(i) for i in range(24)))
    assert replies == [f"Mock reply to: request number {i}" for i in range(24)]
