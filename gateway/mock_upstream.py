"""A cheap, deterministic, OpenAI-compatible fake model server.

Used for demos, end-to-end tests and benchmarks.  It is a raw ASGI callable
(no framework, no pydantic, JSON via orjson) so that it is never the
bottleneck of a benchmark.

Endpoints
---------
* ``POST /v1/chat/completions`` and Azure style
  ``POST /openai/deployments/{deployment}/chat/completions?api-version=...``
  (the reported model is then the deployment name).
* ``POST /v1/embeddings`` and ``POST /openai/deployments/{d}/embeddings``.
* ``GET /v1/models`` and ``GET /v1/models/{id}`` (ids listed in ``MODELS``).
* Introspection (never authenticated, recorded or counted):
  ``GET /mock/requests`` (last 100 API requests), ``DELETE /mock/requests``,
  ``GET /mock/stats`` (``in_flight``, ``total``, ``cancelled``).

Deterministic output
--------------------
* Reply text: ``"Mock reply to: <first 60 chars of the last user message>"``
  (whitespace of the message collapsed first; ``"Mock reply."`` when there
  is no user text).  ``response_format`` ``json_object`` wraps it as
  ``{"reply": "<text>"}``; ``json_schema`` yields a value generated from the
  schema (see ``example_for_schema``).
* With ``tools`` (unless ``tool_choice`` is ``"none"``) every choice calls the
  first function, or the one named by ``tool_choice``, with arguments
  generated from its ``parameters`` schema.
* Token accounting:

  - ``prompt_tokens = 3 + sum(3 + words(message text) + (1 if name))`` over
    the messages, where ``words`` counts whitespace-separated words and the
    text of a list content is the concatenation of its ``text`` parts.
  - A reply is cut into *pieces*: for text, each word with its leading
    whitespace; for tool calls, 4-character fragments of the arguments.
    ``completion_tokens`` is the number of pieces summed over the ``n``
    choices, and a stream carries exactly one piece per content delta.
  - ``max_completion_tokens`` (or ``max_tokens``) truncates a text reply to
    that many pieces and sets ``finish_reason`` to ``"length"``.
  - Embeddings: ``prompt_tokens`` = words of each string input, or length of
    each token array.

* Embeddings are unit-length float32 vectors (8 dimensions unless
  ``dimensions`` is given) derived from SHAKE-128 of the input, so the float
  and base64 encodings decode to identical values.

Control headers (a gateway forwards ``x-mock-*`` headers in tests)
------------------------------------------------------------------
* ``x-mock-status: N`` answer with HTTP N (>= 400) and an OpenAI error body;
  ``x-mock-retry-after: S`` adds ``Retry-After: S`` to such errors.
* ``x-mock-fail-times: N`` + ``x-mock-fail-key: K`` only the first N requests
  carrying key K fail (with ``x-mock-status``, default 500).
* ``x-mock-latency-ms: N`` extra delay before the response headers (added to
  the constructor's ``latency_ms``, which applies to every API request).
* ``x-mock-chunk-delay-ms: N`` delay between stream events.
* ``x-mock-omit-usage: 1`` never report usage.
* ``x-mock-disconnect-after: N`` stream N events, then drop the connection
  without ``[DONE]``.
* ``x-mock-stream-error: 1`` send an OpenAI error event mid-stream and end.
* ``x-mock-reply-words: N`` make a text reply N words (pieces) long, by repeating
  the usual reply's words (at most ``MAX_REPLY_WORDS``); ``max_tokens`` still
  truncates it.  With ``x-mock-chunk-delay-ms`` it makes a long-running stream.

A client disconnect noticed while the mock is waiting (latency or chunk
delay) abandons the response and increments ``cancelled``.

Speed: the serialization of a chat completion (all but ``id`` and
``created``) is reused for a byte-identical request body, so a benchmark's
repeated request costs little more than a "hello world" ASGI app.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import logging
import math
import re
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

__all__ = ["MODELS", "APIError", "MockUpstream", "add_arguments", "example_for_schema", "main", "serve"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

MODELS: tuple[str, ...] = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
MODEL_CREATED = 1_700_000_000
MAX_RECORDED = 100
DEFAULT_EMBEDDING_DIMENSIONS = 8
SYSTEM_FINGERPRINT = "fp_mock"
TOOL_FRAGMENT_CHARS = 4
MAX_REPLY_WORDS = 20_000
_CACHE_ENTRIES = 256
_CACHE_MAX_BODY = 16_384
_MAX_SCHEMA_DEPTH = 32
_PREFER_NULL_DEPTH = 8

_PIECE_RE = re.compile(r"\s*\S+")
_JSON_HEADERS = ((b"content-type", b"application/json"),)
_SSE_HEADERS = ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"))
_DONE = b"data: [DONE]\n\n"
_CHUNK_HEAD = (
    b'data: {"id":"chatcmpl-mock-%d","object":"chat.completion.chunk","created":%d,"model":%s,'
    b'"service_tier":"default","system_fingerprint":"' + SYSTEM_FINGERPRINT.encode() + b'","choices":'
)
_INCOMPLETE_RESPONSE_LOG = "ASGI callable returned without completing response."

# status -> (error type, error code)
_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout_error", "timeout"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


class APIError(Exception):
    """An error answered with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(message)
        default_type, default_code = _error_kind(status)
        self.status = status
        self.headers = headers or []
        self.payload = {
            "error": {
                "message": message,
                "type": type_ or default_type,
                "param": param,
                "code": code if code is not None else default_code,
            }
        }


def _error_kind(status: int) -> tuple[str, str | None]:
    default = ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    return _ERROR_KINDS.get(status, default)


# --------------------------------------------------------------------------
# Deterministic content generation
# --------------------------------------------------------------------------


def example_for_schema(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """Build a value valid for a (simple) JSON schema.

    Objects get all their properties, strings ``"mock"``, numbers ``0`` (moved
    inside ``minimum``/``maximum``), booleans ``false``, arrays ``minItems``
    items (usually none), enums their first value; ``$ref`` to ``#/...`` is
    resolved against ``root`` and ``anyOf``/``oneOf`` take the first non-null
    option (the null one when nesting gets deep, to end recursive schemas).
    """
    root = schema if root is None else root
    if depth > _MAX_SCHEMA_DEPTH:
        return None
    if not isinstance(schema, dict):
        return "mock"  # the boolean schema ``true``
    if "$ref" in schema:
        return example_for_schema(_resolve_ref(root, schema["$ref"]), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for keyword in ("anyOf", "oneOf", "allOf"):
        options = schema.get(keyword)
        if isinstance(options, list) and options:
            return example_for_schema(_pick_option(options, depth), root, depth + 1)
    return _example_for_type(schema, _schema_type(schema), root, depth)


def _schema_type(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        return next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return None


def _example_for_type(schema: dict[str, Any], kind: str | None, root: Any, depth: int) -> Any:
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        return {name: example_for_schema(sub, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        count = schema.get("minItems", 0)
        count = count if isinstance(count, int) else 0
        return [example_for_schema(schema.get("items", {}), root, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        return _example_number(schema, integer=kind == "integer")
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    min_length = schema.get("minLength")
    if isinstance(min_length, int) and min_length > 4:
        return "m" * min_length
    return "mock"


def _example_number(schema: dict[str, Any], *, integer: bool) -> float:
    value: float = 0
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    exclusive_min, exclusive_max = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(minimum, (int, float)) and minimum > 0:
        value = minimum
    elif isinstance(exclusive_min, (int, float)) and exclusive_min >= 0:
        value = exclusive_min + 1
    elif isinstance(maximum, (int, float)) and maximum < 0:
        value = maximum
    elif isinstance(exclusive_max, (int, float)) and exclusive_max <= 0:
        value = exclusive_max - 1
    if integer:
        return math.ceil(value) if value >= 0 else math.floor(value)
    return value


def _pick_option(options: list[Any], depth: int) -> Any:
    def is_null(option: Any) -> bool:
        return isinstance(option, dict) and option.get("type") == "null"

    if depth >= _PREFER_NULL_DEPTH:
        for option in options:
            if is_null(option):
                return option
    return next((o for o in options if not is_null(o)), options[0])


def _resolve_ref(root: Any, ref: Any) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#"):
        return {}
    node = root
    for part in ref[1:].split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return {}
        node = node[part]
    return node


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _words(text: str) -> int:
    return len(text.split())


def _prompt_tokens(messages: list[Any]) -> int:
    total = 3
    for message in messages:
        if isinstance(message, dict):
            total += 3 + _words(_message_text(message.get("content"))) + (1 if message.get("name") else 0)
    return total


def _reply_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            snippet = " ".join(_message_text(message.get("content")).split())[:60].rstrip()
            if snippet:
                return f"Mock reply to: {snippet}"
            break
    return "Mock reply."


def _reply_content(payload: dict[str, Any], messages: list[Any]) -> str:
    text = _reply_text(messages)
    response_format = payload.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema", {}) if isinstance(spec, dict) else {}
            return orjson.dumps(example_for_schema(schema)).decode()
        if kind == "json_object":
            return orjson.dumps({"reply": text}).decode()
    return text


def _pick_tool(payload: dict[str, Any]) -> tuple[str, str] | None:
    """Return (function name, arguments JSON) when the reply must be a tool call."""
    tools = payload.get("tools")
    tool_choice = payload.get("tool_choice", "auto")
    if not isinstance(tools, list) or tool_choice == "none":
        return None
    functions = [
        tool["function"]
        for tool in tools
        if isinstance(tool, dict)
        and tool.get("type", "function") == "function"
        and isinstance(tool.get("function"), dict)
    ]
    if not functions:
        return None
    function = functions[0]
    if isinstance(tool_choice, dict):
        wanted = tool_choice.get("function")
        name = wanted.get("name") if isinstance(wanted, dict) else None
        found = next((f for f in functions if f.get("name") == name), None)
        if found is None:
            raise APIError(
                400,
                f"Invalid value for 'tool_choice': no function named '{name}' was specified in the 'tools' parameter.",
                param="tool_choice",
            )
        function = found
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return str(function.get("name", "")), orjson.dumps(example_for_schema(parameters)).decode()


def _int_field(payload: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = payload.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise APIError(400, f"Invalid '{name}': expected an integer between {low} and {high}.", param=name)
    return value


def _logprob_entry(piece: str, position: int, top: int) -> dict[str, Any]:
    logprob = -round(0.01 * (1 + position % 7), 4)
    alternatives = [{"token": piece, "logprob": logprob, "bytes": list(piece.encode())}]
    for rank in range(1, top):
        token = f" alt{rank}"
        alternatives.append({"token": token, "logprob": logprob - rank, "bytes": list(token.encode())})
    return {
        "token": piece,
        "logprob": logprob,
        "bytes": list(piece.encode()),
        "top_logprobs": alternatives[:top],
    }


def _embedding_bytes(item: str | list[int], dimensions: int) -> bytes:
    seed = item.encode() if isinstance(item, str) else orjson.dumps(item)
    raw = struct.unpack(f"<{dimensions}I", hashlib.shake_128(seed).digest(4 * dimensions))
    vector = [value / 2147483647.5 - 1.0 for value in raw]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return struct.pack(f"<{dimensions}f", *(v / norm for v in vector))


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    def is_tokens(item: Any) -> bool:
        return (
            isinstance(item, list) and bool(item) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        )

    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if is_tokens(value):
            return [value]
        if all(isinstance(item, str) for item in value):
            return value
        if all(is_tokens(item) for item in value):
            return value
    raise APIError(400, "'input' must be a string, an array of strings, or an array of token arrays.", param="input")


# --------------------------------------------------------------------------
# The ASGI application
# --------------------------------------------------------------------------


class _Reply:
    """What every choice of one chat completion says."""

    __slots__ = ("content", "finish_reason", "pieces", "tool")

    def __init__(self, payload: dict[str, Any], messages: list[Any], words: int | None = None) -> None:
        self.tool = _pick_tool(payload)
        if self.tool is not None:
            arguments = self.tool[1]
            self.content: str | None = None
            self.pieces = [
                arguments[i : i + TOOL_FRAGMENT_CHARS] for i in range(0, len(arguments), TOOL_FRAGMENT_CHARS)
            ]
            self.finish_reason = "tool_calls"
            return
        content = _reply_content(payload, messages)
        self.pieces = _PIECE_RE.findall(content)
        if words is not None and self.pieces:
            again, first = [" " + piece.lstrip() for piece in self.pieces], len(self.pieces)  # repeats after a space
            self.pieces = [self.pieces[i] if i < first else again[i % first] for i in range(words)]
            content = "".join(self.pieces)
        self.finish_reason = "stop"
        limit = _int_field(payload, "max_completion_tokens", None, 0, 1 << 31)
        if limit is None:
            limit = _int_field(payload, "max_tokens", None, 0, 1 << 31)
        if limit is not None and limit < len(self.pieces):
            self.pieces = self.pieces[:limit]
            content = "".join(self.pieces)
            self.finish_reason = "length"
        self.content = content


class _Plan:
    """A validated chat completion request: model, choices and usage."""

    __slots__ = ("logprobs", "model", "n", "reply", "top_logprobs", "usage")

    def __init__(
        self, payload: dict[str, Any], deployment: str | None, omit_usage: bool, reply_words: int | None = None
    ) -> None:
        model = deployment or payload.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "you must provide a model parameter", param="model")
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty array.", param="messages")
        self.model = model
        self.n = _int_field(payload, "n", 1, 1, 128) or 1
        self.reply = _Reply(payload, messages, reply_words)
        self.usage = None
        if not omit_usage:
            self.usage = _usage(_prompt_tokens(messages), len(self.reply.pieces) * self.n)
        self.top_logprobs = _int_field(payload, "top_logprobs", 0, 0, 20) or 0
        self.logprobs = payload.get("logprobs") is True and self.reply.tool is None


_CacheKey = tuple[bytes, str | None, bool, int | None]  # (request body, Azure deployment, omit usage, reply words)
_T = TypeVar("_T")


def _remember(cache: dict[_CacheKey, _T], key: _CacheKey, value: _T, plan: _Plan, body: bytes) -> None:
    if plan.reply.tool is None and len(body) <= _CACHE_MAX_BODY:  # tool call ids embed the request number
        if len(cache) >= _CACHE_ENTRIES:
            cache.clear()
        cache[key] = value


class MockUpstream:
    """OpenAI-compatible fake upstream as a raw ASGI app (see module docstring).

    All state lives on the instance: ``total``, ``in_flight``, ``cancelled``
    counters, the ``requests`` ring buffer, the fail-key counters and the
    serialization caches.
    """

    def __init__(self, latency_ms: float = 0.0, api_key: str | None = None) -> None:
        self.latency_ms = float(latency_ms)
        self.api_key = api_key
        self._key = api_key.encode() if api_key is not None else None
        self.total = 0
        self.in_flight = 0
        self.cancelled = 0
        self.requests: deque[tuple[str, str, bytes, Headers, Any]] = deque(maxlen=MAX_RECORDED)
        self._failures: dict[bytes, int] = {}
        self._completion_tails: dict[_CacheKey, bytes] = {}
        self._stream_cache: dict[_CacheKey, _StreamParts] = {}
        self._seq = 0

    # ---------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith("/mock/"):
                await self._introspect(scope["method"], path, send)
                return
            self.total += 1
            self.in_flight += 1
            try:
                await self._handle(scope, path, receive, send)
            finally:
                self.in_flight -= 1
        elif kind == "lifespan":
            await _lifespan(receive, send)

    def stats(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "total": self.total, "cancelled": self.cancelled}

    def recorded(self) -> list[dict[str, Any]]:
        """The last requests received, oldest first, as ``GET /mock/requests`` shows them."""
        return [
            {
                "method": method,
                "path": path,
                "query": query.decode("latin-1"),
                "headers": {name.decode("latin-1"): value.decode("latin-1") for name, value in headers},
                "body": body,
            }
            for method, path, query, headers, body in self.requests
        ]

    async def _handle(self, scope: Scope, path: str, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        payload: Any = None
        malformed = False
        if body:
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                malformed = True
        method: str = scope["method"]
        raw_headers: Headers = scope["headers"]
        self.requests.append((method, path, scope["query_string"], raw_headers, payload))
        headers = dict(raw_headers)
        self._seq += 1
        seq = self._seq
        extra = [(b"x-request-id", b"req_mock_%d" % seq)]
        try:
            self._check_auth(headers)
            injected = self._injected_error(headers)
            delay = self.latency_ms + _number_header(headers, b"x-mock-latency-ms")
            if delay > 0 and not await _wait(receive, delay / 1000):
                self.cancelled += 1
                return
            if injected is not None:
                raise injected
            route, model = _route(method, path, scope["query_string"])
            if route == "models":
                await _send_json(send, 200, _models_payload(model), extra)
                return
            if malformed or not isinstance(payload, dict):
                raise APIError(
                    400,
                    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                    "using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
                )
            if route == "embeddings":
                await _send_json(send, 200, _embeddings_payload(payload, model), extra)
            else:
                await self._chat(body, payload, model, seq, headers, extra, receive, send)
        except APIError as error:
            await _send_json(send, error.status, error.payload, extra + error.headers)

    def _check_auth(self, headers: dict[bytes, bytes]) -> None:
        if self._key is None:
            return
        authorization = headers.get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer " and authorization[7:].strip() == self._key:
            return
        if headers.get(b"api-key") == self._key:
            return
        if authorization or b"api-key" in headers:
            message = "Incorrect API key provided."
        else:
            message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        raise APIError(401, message, code="invalid_api_key")

    def _injected_error(self, headers: dict[bytes, bytes]) -> APIError | None:
        """Decide now (before any latency) whether this request gets an injected error."""
        raw_status = headers.get(b"x-mock-status")
        fail_times = headers.get(b"x-mock-fail-times")
        if raw_status is None and fail_times is None:
            return None
        status = _int_or(raw_status, 500)
        if fail_times is not None:
            key = headers.get(b"x-mock-fail-key", b"")
            seen = self._failures.get(key, 0)
            self._failures[key] = seen + 1
            if seen >= _int_or(fail_times, 0):
                return None
        if not 400 <= status <= 599:
            return None
        retry_after = headers.get(b"x-mock-retry-after")
        return APIError(
            status,
            f"Mock upstream injected error (HTTP {status}).",
            headers=[(b"retry-after", retry_after)] if retry_after is not None else None,
        )

    # ---------------------------------------------------------------- chat

    async def _chat(
        self,
        body: bytes,
        payload: dict[str, Any],
        deployment: str | None,
        seq: int,
        headers: dict[bytes, bytes],
        extra: Headers,
        receive: Receive,
        send: Send,
    ) -> None:
        omit_usage = headers.get(b"x-mock-omit-usage") not in (None, b"0", b"false")
        raw_words = headers.get(b"x-mock-reply-words")
        words = None if raw_words is None else min(MAX_REPLY_WORDS, max(1, _int_or(raw_words, 1)))
        created = int(time.time())
        # Everything but "id" and "created" depends only on the request, so repeated identical requests
        # (a benchmark) reuse their serialization: this keeps the mock far cheaper than a gateway in front.
        key = (body, deployment, omit_usage, words)
        if payload.get("stream") is True:
            parts = self._stream_cache.get(key)
            if parts is None:
                plan = _Plan(payload, deployment, omit_usage, words)
                options = payload.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                parts = _stream_parts(plan, seq, include_usage)
                _remember(self._stream_cache, key, parts, plan, body)
            await self._stream(_stream_events(seq, created, parts), headers, extra, receive, send)
            return
        tail = self._completion_tails.get(key)
        if tail is None:
            plan = _Plan(payload, deployment, omit_usage, words)
            tail = orjson.dumps(_completion_rest(plan, seq))[1:]
            _remember(self._completion_tails, key, tail, plan, body)
        prefix = b'{"id":"chatcmpl-mock-%d","object":"chat.completion","created":%d,' % (seq, created)
        await _send_body(send, 200, prefix + tail, extra)

    async def _stream(
        self,
        chunks: list[bytes],
        headers: dict[bytes, bytes],
        extra: Headers,
        receive: Receive,
        send: Send,
    ) -> None:
        delay = _number_header(headers, b"x-mock-chunk-delay-ms") / 1000
        disconnect_after = _int_or(headers.get(b"x-mock-disconnect-after"), -1)
        error_at = max(1, len(chunks) // 2) if headers.get(b"x-mock-stream-error") in (b"1", b"true") else -1
        chunks.append(_DONE)
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *extra]})
        for index, chunk in enumerate(chunks):
            if disconnect_after >= 0 and (index == disconnect_after or chunk is _DONE):
                return  # abort: uvicorn closes the connection, the client sees an incomplete stream
            if index and delay > 0 and not await _wait(receive, delay):
                self.cancelled += 1
                return
            if index == error_at:
                error = APIError(500, "Mock upstream injected a mid-stream error.", code="stream_error")
                chunk = b"data: " + orjson.dumps(error.payload) + b"\n\n"
                await send({"type": "http.response.body", "body": chunk, "more_body": False})
                return
            last = index == len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})

    # ---------------------------------------------------------------- introspection

    async def _introspect(self, method: str, path: str, send: Send) -> None:
        if path == "/mock/requests" and method == "GET":
            await _send_json(send, 200, {"data": self.recorded()})
        elif path == "/mock/requests" and method == "DELETE":
            cleared = len(self.requests)
            self.requests.clear()
            await _send_json(send, 200, {"cleared": cleared})
        elif path == "/mock/stats" and method == "GET":
            await _send_json(send, 200, self.stats())
        else:
            error = APIError(404, f"Invalid URL ({method} {path})")
            await _send_json(send, 404, error.payload)


# --------------------------------------------------------------------------
# Response builders
# --------------------------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _tool_call_id(seq: int, index: int) -> str:
    return f"call_mock_{seq}_{index}"


def _completion_rest(plan: _Plan, seq: int) -> dict[str, Any]:
    """The fields of a ``chat.completion`` that follow ``id``, ``object`` and ``created``."""
    rest: dict[str, Any] = {
        "model": plan.model,
        "choices": [_choice(plan, index, seq) for index in range(plan.n)],
    }
    if plan.usage is not None:
        rest["usage"] = plan.usage
    rest["service_tier"] = "default"
    rest["system_fingerprint"] = SYSTEM_FINGERPRINT
    return rest


def _choice(plan: _Plan, index: int, seq: int) -> dict[str, Any]:
    reply = plan.reply
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None, "annotations": []}
    if reply.tool is not None:
        name, arguments = reply.tool
        function = {"name": name, "arguments": arguments}
        message["tool_calls"] = [{"id": _tool_call_id(seq, index), "type": "function", "function": function}]
    logprobs = None
    if plan.logprobs:
        entries = [_logprob_entry(piece, i, plan.top_logprobs) for i, piece in enumerate(reply.pieces)]
        logprobs = {"content": entries, "refusal": None}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reply.finish_reason}


def _choice_deltas(plan: _Plan, index: int, seq: int) -> list[dict[str, Any]]:
    """The successive ``choices[0]`` objects of one choice's stream chunks."""
    reply = plan.reply

    def delta_choice(delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    if reply.tool is not None:
        function = {"name": reply.tool[0], "arguments": ""}
        call = {"index": 0, "id": _tool_call_id(seq, index), "type": "function", "function": function}
        first = delta_choice({"role": "assistant", "content": None, "tool_calls": [call], "refusal": None})
        pieces = [delta_choice({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in reply.pieces]
    else:
        first = delta_choice({"role": "assistant", "content": "", "refusal": None})
        pieces = [
            delta_choice(
                {"content": p},
                {"content": [_logprob_entry(p, i, plan.top_logprobs)], "refusal": None} if plan.logprobs else None,
            )
            for i, p in enumerate(reply.pieces)
        ]
    return [first, *pieces, delta_choice({}, finish=reply.finish_reason)]


@dataclass(frozen=True, slots=True)
class _StreamParts:
    """The request-dependent bytes of a stream: everything but ``id`` and ``created``."""

    model: bytes  # JSON string
    choices: list[bytes]  # the ``choices`` array of each chunk, in order
    usage: bytes | None  # the final usage object, when the client asked for it


def _stream_parts(plan: _Plan, seq: int, include_usage: bool) -> _StreamParts:
    per_choice = [_choice_deltas(plan, index, seq) for index in range(plan.n)]
    choices = [orjson.dumps([deltas[step]]) for step in range(len(per_choice[0])) for deltas in per_choice]
    usage = orjson.dumps(plan.usage) if include_usage and plan.usage is not None else None
    return _StreamParts(orjson.dumps(plan.model), choices, usage)


def _stream_events(seq: int, created: int, parts: _StreamParts) -> list[bytes]:
    """SSE ``data:`` events of a streamed completion (without ``[DONE]``)."""
    head = _CHUNK_HEAD % (seq, created, parts.model)
    end = b"}\n\n" if parts.usage is None else b',"usage":null}\n\n'
    events = [head + choices + end for choices in parts.choices]
    if parts.usage is not None:
        events.append(head + b'[],"usage":' + parts.usage + b"}\n\n")
    return events


def _embeddings_payload(payload: dict[str, Any], deployment: str | None) -> dict[str, Any]:
    model = deployment or payload.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "you must provide a model parameter", param="model")
    inputs = _embedding_inputs(payload.get("input"))
    dimensions = _int_field(payload, "dimensions", DEFAULT_EMBEDDING_DIMENSIONS, 1, 8192)
    dimensions = dimensions or DEFAULT_EMBEDDING_DIMENSIONS
    encoding = payload.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    data = []
    tokens = 0
    for index, item in enumerate(inputs):
        packed = _embedding_bytes(item, dimensions)
        vector: Any = (
            base64.b64encode(packed).decode()
            if encoding == "base64"
            else list(struct.unpack(f"<{dimensions}f", packed))
        )
        data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens += _words(item) if isinstance(item, str) else len(item)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": MODEL_CREATED, "owned_by": "mock"}


def _models_payload(model: str | None) -> dict[str, Any]:
    if model is None:
        return {"object": "list", "data": [_model_object(m) for m in MODELS]}
    if model not in MODELS:
        raise APIError(
            404,
            f"The model '{model}' does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    return _model_object(model)


# --------------------------------------------------------------------------
# Plumbing
# --------------------------------------------------------------------------


_ROUTES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/embeddings": ("POST", "embeddings"),
    "/v1/models": ("GET", "models"),
}
_AZURE_PREFIX = "/openai/deployments/"
_AZURE_OPERATIONS = {"chat/completions": "chat", "embeddings": "embeddings"}


def _route(method: str, path: str, query: bytes) -> tuple[str, str | None]:
    """Return (route name, model or deployment named by the path)."""
    route: tuple[str, str] | None = _ROUTES.get(path)
    model: str | None = None
    if route is None and path.startswith("/v1/models/") and len(path) > 11:
        route, model = ("GET", "models"), path[11:]
    elif route is None and path.startswith(_AZURE_PREFIX):
        deployment, _, operation = path[len(_AZURE_PREFIX) :].partition("/")
        if deployment and operation in _AZURE_OPERATIONS:
            route, model = ("POST", _AZURE_OPERATIONS[operation]), deployment
            if b"api-version=" not in query:
                raise APIError(400, "Missing required query parameter 'api-version'.", param="api-version")
    if route is None:
        raise APIError(404, f"Invalid URL ({method} {path})", code="unknown_url")
    if route[0] != method:
        raise APIError(405, f"Invalid method for URL ({method} {path})", code="method_not_allowed")
    return route[1], model


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def _wait(receive: Receive, seconds: float) -> bool:
    """Sleep ``seconds``; return False early if the client disconnects meanwhile."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
    except TimeoutError:
        return True


async def _send_json(send: Send, status: int, payload: Any, headers: Headers | None = None) -> None:
    await _send_body(send, status, orjson.dumps(payload), headers)


async def _send_body(send: Send, status: int, body: bytes, headers: Headers | None = None) -> None:
    response_headers = [*_JSON_HEADERS, (b"content-length", b"%d" % len(body)), *(headers or ())]
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _number_header(headers: dict[bytes, bytes], name: bytes) -> float:
    raw = headers.get(name)
    if raw is None:
        return 0.0
    try:
        return max(0.0, float(raw))
    except ValueError:
        return 0.0


def _int_or(raw: bytes | None, default: int) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        return default


# --------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------


class _DeliberateAbortFilter(logging.Filter):
    """Hide uvicorn's complaint about the streams ``x-mock-disconnect-after`` aborts on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _INCOMPLETE_RESPONSE_LOG


def serve(host: str = "127.0.0.1", port: int = 9000, latency_ms: float = 0.0, api_key: str | None = None) -> None:
    """Run a ``MockUpstream`` with uvicorn (uvloop + httptools) until interrupted."""
    import uvicorn

    logging.getLogger("uvicorn.error").addFilter(_DeliberateAbortFilter())
    uvicorn.run(
        MockUpstream(latency_ms=latency_ms, api_key=api_key),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
        # Less per-request work in uvicorn: no proxy-header rewriting, no server/date headers.
        proxy_headers=False,
        server_header=False,
        date_header=False,
        ws="none",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``mock-upstream`` command line options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every response")
    parser.add_argument("--api-key", default=None, help="require this key (Bearer or api-key header)")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m gateway.mock_upstream [--host H] [--port N] [--latency-ms N] [--api-key K]``."""
    parser = argparse.ArgumentParser(prog="gateway mock-upstream", description="Run the OpenAI-compatible mock.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    serve(host=args.host, port=args.port, latency_ms=args.latency_ms, api_key=args.api_key)


if __name__ == "__main__":
    main()
