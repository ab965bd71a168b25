"""Value objects that travel through the pipeline: who is calling, what they asked, what came back."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config.schema import PolicyConfig


@dataclass(slots=True, frozen=True)
class Endpoint:
    """An OpenAI operation the gateway proxies."""

    name: str  # "chat.completions": used in logs and metrics
    path: str  # upstream path below the base URL: "/chat/completions"
    can_stream: bool


CHAT_COMPLETIONS = Endpoint("chat.completions", "/chat/completions", can_stream=True)
EMBEDDINGS = Endpoint("embeddings", "/embeddings", can_stream=False)


@dataclass(slots=True, frozen=True)
class Principal:
    """The authenticated caller: a tenant, through an API key or a JWT, maybe an end user."""

    tenant: str
    key_id: str  # an API key's id, or "jwt:<issuer>" for a token
    policy_name: str
    policy: PolicyConfig  # the tenant's policy with its overrides applied
    user: str | None = None  # from a JWT's user claim
    roles: frozenset[str] = frozenset()
    key_models: frozenset[str] | None = None  # the key's own model allow-list, if it has one
    key_policy: PolicyConfig | None = None  # the key's own budget and rate limit, if any

    def allows_model(self, model: str) -> bool:
        if self.key_models is not None and model not in self.key_models and "*" not in self.key_models:
            return False
        return self.policy.allows_model(model)


@dataclass(slots=True)
class ProxyRequest:
    request_id: str
    endpoint: Endpoint
    raw_body: bytes
    headers: dict[str, str]  # the client's headers, names lowercased
    started_at: float  # time.perf_counter() when the request arrived
    body: dict[str, Any] = field(default_factory=dict)
    body_changed: bool = False  # forward raw_body untouched unless a stage changed body
    principal: Principal | None = None
    model: str = ""
    stream: bool = False
    user: str | None = None
    # Completion tokens (all choices together) that the budget hold covers, set by the limits stage when
    # the client's own max_tokens does not keep the answer within it: a stream that reaches it is ended
    # with an error event rather than spend past its hold. None: no such cap.
    output_cap: int | None = None

    def set_body_field(self, name: str, value: Any) -> None:
        self.body[name] = value
        self.body_changed = True


@dataclass(slots=True, kw_only=True)  # not frozen: a frozen init costs ~1 µs more
class Usage:
    """The tokens of one answer, as OpenAI's `usage` reports them, or as the gateway counted them.

    `prompt_tokens` includes `cached_tokens` and `completion_tokens` includes `reasoning_tokens`, as in
    OpenAI's object. `estimated` is true when the gateway counted the tokens itself: the upstream
    reported none, or the stream ended before its usage chunk (client disconnect, upstream failure).
    """

    prompt_tokens: int
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class ProxyResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    # For `stream: true`: the SSE bytes to send. Whoever sends it must `aclose()` it, so that every
    # stage's clean-up runs exactly once: normal end, upstream error or client disconnect.
    stream: AsyncIterator[bytes] | None = None
    model: str = ""  # the gateway model that answered (after fallbacks)
    upstream: str = ""  # the upstream that answered
    upstream_seconds: float = 0.0
    usage: Usage | None = None  # set by the Usage stage; for a stream, when the stream closes
    cost_nano: int | None = None  # set by the accounting stage: the answer's price in 1e-9 USD, None if unpriced

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` once, after this response's stream has closed, however it ended.

        Only for streams (a stage does a plain body's after-work inline). Callbacks added by inner
        stages, which see the response first, run before those of outer stages.
        """
        assert self.stream is not None, "on_close is for streaming responses"
        self.stream = ClosingStream(self.stream, callback)


async def aclose(stream: AsyncIterator[bytes]) -> None:
    """Close a stream if it can be closed (async generators and ClosingStream can)."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


class ClosingStream:
    """A stream that runs `on_close` exactly once, after the stream it wraps is closed.

    A class rather than an async generator: a generator closed before its first iteration skips its
    `finally`, and this must run its callback whatever happened. Iterating it costs no extra frame.
    A failing callback is logged, never raised: the answer has been sent by then.
    """

    __slots__ = ("_on_close", "_stream")

    def __init__(self, stream: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        self._stream = stream
        self._on_close: Callable[[], Awaitable[None]] | None = on_close

    def __aiter__(self) -> ClosingStream:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._stream.__anext__()

    async def aclose(self) -> None:
        # Dropping the callback also breaks the usual cycle response -> stream -> callback -> response.
        on_close, self._on_close = self._on_close, None
        if on_close is None:
            return
        try:
            await aclose(self._stream)
        finally:
            try:
                await on_close()
            except Exception:
                logging.getLogger("gateway.context").exception("a stream's on_close callback failed")


Handler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]
