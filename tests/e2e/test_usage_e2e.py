"""Usage through real processes: the gateway always asks the upstream for a stream's usage, and a client
that did not ask sees exactly the stream it would have got without asking."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from .support import ACME_KEY, UPSTREAM_KEY, Proc

Finder = Callable[[str], list[dict[str, Any]]]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "count these tokens please"}]


@pytest.fixture(scope="module")
def direct(mock_upstream: Proc) -> Iterator[openai.OpenAI]:
    """The SDK talking to the mock itself: what the client would get without the gateway."""
    with openai.OpenAI(base_url=f"{mock_upstream.url}/v1", api_key=UPSTREAM_KEY, max_retries=0, timeout=15.0) as sdk:
        yield sdk


def _normalised(body: bytes) -> bytes:
    """Erase what differs between two answers to the same request: the mock's ids and timestamps."""
    body = re.sub(rb'"chatcmpl-mock-\d+"', b'"ID"', body)
    return re.sub(rb'"created":\d+', b'"created":0', body)


def _raw(http: httpx.Client, url: str, key: str, payload: dict[str, Any]) -> bytes:
    with http.stream("POST", url, json=payload, headers={"authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200, response.read()
        return b"".join(response.iter_raw())


def test_a_stream_without_stream_options_has_no_usage_but_the_upstream_was_asked(
    client: openai.OpenAI, tag: str, upstream_requests: Finder
) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"x-mock-tag": tag}
    )
    chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks)
    assert all("usage" not in (chunk.model_extra or {}) and "usage" not in chunk.model_fields_set for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)  # no empty-choices usage chunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Mock reply to: count these tokens please"
    [seen] = upstream_requests(tag)
    assert seen["body"]["stream_options"] == {"include_usage": True}
    assert seen["body"]["messages"] == MESSAGES


def test_the_stream_bytes_match_the_upstream_s_without_usage(gateway: Proc, mock_upstream: Proc) -> None:
    payload = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        through = _raw(http, f"{gateway.url}/v1/chat/completions", ACME_KEY, payload)
        direct = _raw(http, f"{mock_upstream.url}/v1/chat/completions", UPSTREAM_KEY, payload)
    assert b"usage" not in through
    assert _normalised(through) == _normalised(direct)


def test_a_stream_with_include_usage_ends_with_the_upstream_s_usage(
    client: openai.OpenAI, direct: openai.OpenAI, tag: str, upstream_requests: Finder
) -> None:
    request: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = list(client.chat.completions.create(**request, extra_headers={"x-mock-tag": tag}))
    expected = list(direct.chat.completions.create(**request))[-1].usage
    final = chunks[-1]
    assert final.choices == []
    assert final.usage is not None
    assert final.usage == expected
    assert final.usage.prompt_tokens == 3 + (3 + 2) + (3 + 4)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    [seen] = upstream_requests(tag)
    assert seen["body"]["stream_options"] == {"include_usage": True}


def test_a_plain_answer_s_usage_is_the_upstream_s(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    through = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    straight = direct.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert _normalised(through.content) == _normalised(straight.content)
    usage = through.parse().usage
    assert usage is not None
    assert usage == straight.parse().usage
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0


def test_embeddings_usage_is_the_upstream_s(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    through = client.embeddings.create(model="text-embedding-3-small", input=["one two", "three"])
    assert through.usage == direct.embeddings.create(model="text-embedding-3-small", input=["one two", "three"]).usage
    assert through.usage.prompt_tokens == 3


def test_a_stream_whose_upstream_reports_no_usage_passes_unchanged(client: openai.OpenAI) -> None:
    for options in (None, {"include_usage": True}):
        extra: dict[str, Any] = {} if options is None else {"stream_options": options}
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"x-mock-omit-usage": "1"}, **extra
        )
        chunks = list(stream)
        assert all(chunk.usage is None for chunk in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"
