"""Admin API fixtures: the real app in-process (ASGI), an echoing fake upstream, admin keys and HS256 tokens."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import orjson
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig, UpstreamConfig
from gateway.services import Services
from gateway.upstream.httpx_transport import HttpxTransport

ADMIN_KEY = "admin-key-0123456789abcdef"
SECOND_ADMIN_KEY = "admin-key-second-9876543210"
CONFIG_KEY = "sk-gw-test-key"  # tenant acme's key in tests/conftest.py BASE_CONFIG
JWT_SECRET = "tenant-admin-hs256-secret-0123456789abcdef"
ISSUER = "https://idp.example.test"
TENANT_ADMIN = "tenant-admin"

ADMIN_CONFIG: dict[str, Any] = {
    "admin": {"api_keys": [ADMIN_KEY, SECOND_ADMIN_KEY]},
    "auth": {
        "jwt": {
            "issuers": [
                {
                    "issuer": ISSUER,
                    "audience": "gateway",
                    "secret": JWT_SECRET,
                    "algorithms": ["HS256"],
                    "tenant_claim": "tenant",
                    "roles_claim": "roles",
                }
            ]
        }
    },
    "policies": {"default": {}, "mini-only": {"models": ["gpt-4o-mini"]}},
}


def mint(tenant: str, roles: Any = (TENANT_ADMIN,), secret: str = JWT_SECRET, **claims: Any) -> str:
    """An HS256 token from the configured issuer; `roles=None` leaves the claim out."""
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "gateway",
        "sub": f"admin@{tenant}",
        "tenant": tenant,
        "exp": int(time.time()) + 300,
        "roles": list(roles) if isinstance(roles, tuple) else roles,
        **claims,
    }
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm="HS256")


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI error object of a response, after checking its shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


@dataclass
class Gateway:
    client: httpx.AsyncClient
    services: Services
    upstream_requests: list[httpx.Request] = field(default_factory=list)

    async def admin(
        self, method: str, path: str, body: Any = None, *, auth: str | None = ADMIN_KEY, raw: bytes | None = None
    ) -> httpx.Response:
        headers = bearer(auth) if auth is not None else {}
        content = raw if raw is not None else (None if body is None else orjson.dumps(body))
        return await self.client.request(method, path, content=content, headers=headers)

    async def chat(self, key: str, model: str = "gpt-4o-mini", **fields: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
        return await self.client.post("/v1/chat/completions", content=orjson.dumps(body), headers=bearer(key))

    async def models(self, key: str) -> list[str]:
        response = await self.client.get("/v1/models", headers=bearer(key))
        assert response.status_code == 200, response.text
        return [model["id"] for model in response.json()["data"]]

    async def new_tenant(self, tenant_id: str, **fields: Any) -> dict[str, Any]:
        response = await self.admin("POST", "/admin/tenants", {"id": tenant_id, **fields})
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def new_key(
        self, tenant_id: str, name: str = "ci", *, auth: str = ADMIN_KEY, **fields: Any
    ) -> dict[str, Any]:
        response = await self.admin("POST", f"/admin/tenants/{tenant_id}/keys", {"name": name, **fields}, auth=auth)
        assert response.status_code == 201, response.text
        return dict(response.json())


@pytest.fixture
def admin_config(make_config: Callable[..., GatewayConfig]) -> Callable[..., GatewayConfig]:
    def build(overrides: dict[str, Any] | None = None) -> GatewayConfig:
        return make_config({**ADMIN_CONFIG, **(overrides or {})})

    return build


@pytest.fixture
def make_gw(
    admin_config: Callable[..., GatewayConfig], started: Callable[[Any], Awaitable[httpx.AsyncClient]]
) -> Callable[..., Awaitable[Gateway]]:
    """`await make_gw(overrides)`: a started app on the admin config, with an echoing upstream."""

    async def build(overrides: dict[str, Any] | None = None) -> Gateway:
        requests: list[httpx.Request] = []

        async def echo(request: httpx.Request) -> httpx.Response:
            requests.append(request)
            sent = orjson.loads(request.content)
            return httpx.Response(200, json={"object": "chat.completion", "model": sent["model"], "choices": []})

        def transport(name: str, config: UpstreamConfig) -> HttpxTransport:
            return HttpxTransport(httpx.AsyncClient(transport=httpx.MockTransport(echo)))

        app = create_app(admin_config(overrides), transport_factory=transport)
        client = await started(app)
        return Gateway(client, app.state.services, requests)

    return build


@pytest.fixture
async def gw(make_gw: Callable[..., Awaitable[Gateway]]) -> Gateway:
    return await make_gw()
