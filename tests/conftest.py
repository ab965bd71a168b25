"""Shared unit-test helpers: a config builder, a manual ASGI lifespan driver and a raw ASGI caller.

Helpers are exposed as fixtures (not imports) so that test modules stay independent of each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from gateway.config import GatewayConfig, parse_config

GATEWAY_KEY = "sk-gw-test-key"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"

BASE_CONFIG: dict[str, Any] = {
    "store": {"url": "memory://"},
    "upstreams": {
        "primary": {
            "base_url": "http://primary.test/v1",
            "api_key": UPSTREAM_KEY,
            "max_retries": 2,
            "backoff_initial_s": 0,
            "backoff_max_s": 0,
        },
        "backup": {
            "base_url": "http://backup.test/v1",
            "api_key": "sk-backup-secret-9876543210",
            "max_retries": 0,
        },
    },
    "models": {
        "gpt-4o": {"upstream": "primary", "fallbacks": ["gpt-4o-mini"]},
        "gpt-4o-mini": {"upstream": "backup"},
        "text-embedding-3-small": {"upstream": "primary"},
    },
    "tenants": {"acme": {"policy": "default", "api_keys": [{"id": "acme-1", "key": GATEWAY_KEY}]}},
}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture
def make_config() -> Callable[..., GatewayConfig]:
    """`make_config({"server": {"max_body_bytes": 10}})`: the base config, deep-merged with overrides."""

    def build(overrides: dict[str, Any] | None = None) -> GatewayConfig:
        return parse_config(_merge(copy.deepcopy(BASE_CONFIG), overrides or {}), "test.yaml", env={})

    return build


@contextlib.asynccontextmanager
async def run_lifespan(app: Any) -> AsyncIterator[None]:
    """Drive the ASGI lifespan protocol by hand: startup on enter, shutdown on exit."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    message = await asyncio.wait_for(outbox.get(), 5)
    assert message["type"] == "lifespan.startup.complete", message
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        message = await asyncio.wait_for(outbox.get(), 5)
        assert message["type"] == "lifespan.shutdown.complete", message
        await asyncio.wait_for(task, 5)


@pytest.fixture
def lifespan() -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """`async with lifespan(app):` runs the app's start-up and shutdown around the block."""
    return run_lifespan


@pytest.fixture
async def started() -> AsyncIterator[Callable[[Any], Awaitable[httpx.AsyncClient]]]:
    """`client = await started(app)`: run the app's lifespan and return an httpx client bound to it."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(app: Any) -> httpx.AsyncClient:
            await stack.enter_async_context(run_lifespan(app))
            transport = httpx.ASGITransport(app=app)
            return await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://gateway"))

        yield start


@dataclass
class RawResponse:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


async def call_asgi(
    app: Any,
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]] = (),
    body_chunks: Iterable[bytes] = (b"",),
    disconnect: asyncio.Event | None = None,
) -> RawResponse:
    """Call an ASGI app with exact control over headers and body messages.

    After the body, `receive()` reports `http.disconnect` once `disconnect` is set (or, without it,
    once the response is complete, as a real server does).
    """
    response = RawResponse()
    complete = asyncio.Event()
    pending = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for chunks in [list(body_chunks)]
        for index, chunk in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await (disconnect or complete).wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            response.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                complete.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers],
        "client": ("127.0.0.1", 12345),
        "server": ("gateway", 80),
    }
    await app(scope, receive, send)
    return response


@pytest.fixture
def asgi_call() -> Callable[..., Awaitable[RawResponse]]:
    return call_asgi
