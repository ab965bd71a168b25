"""The offline tokenizer behind usage estimates."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.cost import tokens
from gateway.cost.tokens import EXACT_CHARS, count_input, count_prompt, count_tokens, encoding_name


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("my-azure-deployment", "o200k_base"),
    ],
)
def test_each_model_family_has_its_encoding(model: str, encoding: str) -> None:
    assert encoding_name(model) == encoding


def test_counts_are_openai_s() -> None:
    # Known values: "hello world" is [24912, 2375] in o200k_base and [15339, 1917] in cl100k_base.
    assert count_tokens("hello world", "gpt-4o") == 2
    assert count_tokens("hello world", "gpt-4") == 2
    assert count_tokens("", "gpt-4o") == 0
    assert count_tokens("<|endoftext|>", "gpt-4o") > 1  # special tokens count as text
    assert count_tokens("日本語のテキストです。", "gpt-4o") > 3


def test_the_vocabulary_is_loaded_once_and_counting_is_fast() -> None:
    tokens.preload()
    started = time.perf_counter()
    for _ in range(100):
        count_tokens("The quick brown fox jumps over the lazy dog. " * 10, "gpt-4o-mini")
    assert time.perf_counter() - started < 1.0


def test_a_long_text_is_extrapolated_past_the_exact_limit() -> None:
    text = "word " * (EXACT_CHARS // 5)
    exact = count_tokens(text, "gpt-4o")
    assert count_tokens(text * 4, "gpt-4o") == pytest.approx(4 * exact, rel=0.01)


def test_a_prompt_counts_messages_names_parts_and_tools() -> None:
    model = "gpt-4o"
    hello, role = count_tokens("Hello", model), count_tokens("user", model)
    assert count_prompt({"messages": [{"role": "user", "content": "Hello"}]}, model) == 3 + 3 + role + hello
    named = {"messages": [{"role": "user", "content": "Hello", "name": "bob"}]}
    assert count_prompt(named, model) == 3 + 3 + role + hello + count_tokens("bob", model) + 1
    parts: list[Any] = [
        {"type": "text", "text": "Hello"},
        {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        "junk",
    ]
    assert count_prompt({"messages": [{"role": "user", "content": parts}]}, model) == 3 + 3 + role + hello + 85 + 765
    with_tools = {"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert count_prompt(with_tools, model) > 3
    assert count_prompt({"messages": "junk"}, model) == 3


@pytest.mark.parametrize(("value", "expected"), [(None, 0), ("", 0), ([], 0), (["a", [1, 2]], 3)])
def test_embedding_inputs(value: Any, expected: int) -> None:
    assert count_input(value, "text-embedding-3-small") == expected
