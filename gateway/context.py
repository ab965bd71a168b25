"""Value objects that travel through the pipeline: who is calling, what they asked, what came back."""

from __future__ import annotations

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

    def set_body_field(self, name: str, value: Any) -> None:
        self.body[name] = value
        self.body_changed = True


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


Handler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]
