"""The admin API under /admin/: tenants and their API keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin.auth import AdminAuthenticator, AdminScope
from gateway.config.schema import BudgetConfig, GatewayConfig, RateLimitConfig
from gateway.errors import InvalidRequest
from gateway.identity.keyring import KeyRing
from gateway.identity.keys import KeyRecord, format_time, now_utc, parse_time
from gateway.identity.tenants import TenantDirectory
from gateway.jsonbody import expect, parse_object

Endpoint = Callable[[Request], Awaitable[Response]]
_MAX_ADMIN_BODY = 64 * 1024
_MAX_GRACE_PERIOD_S = 365 * 24 * 3600  # a bound also keeps the expiry time representable


def _listing(data: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"object": "list", "data": data})


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > _MAX_ADMIN_BODY:
        raise InvalidRequest(f"An admin request body may be at most {_MAX_ADMIN_BODY} bytes.")
    return parse_object(raw) if raw.strip() else {}


def _shape(body: dict[str, Any], name: str, model: type[BaseModel]) -> dict[str, Any] | None:
    value = expect(body, name, dict, "an object")
    if value is None:
        return None
    try:
        return model.model_validate(value).model_dump(exclude_unset=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in (name, *first["loc"]))
        raise InvalidRequest(f"Invalid {where}: {first['msg']}.", param=where) from None


def _expiry(body: dict[str, Any]) -> str | None:
    text = expect(body, "expires_at", str, "an RFC 3339 timestamp")
    if text is None:
        return None
    try:
        moment = parse_time(text)
    except ValueError as exc:
        raise InvalidRequest(f"Invalid 'expires_at': {exc}.", param="expires_at") from None
    assert moment is not None
    if moment <= now_utc():
        raise InvalidRequest("'expires_at' is in the past.", param="expires_at")
    return format_time(moment.astimezone(UTC))


class AdminAPI:
    def __init__(
        self, config: GatewayConfig, auth: AdminAuthenticator, tenants: TenantDirectory, keys: KeyRing
    ) -> None:
        self._config = config
        self._auth = auth
        self._tenants = tenants
        self._keys = keys

    async def _scope(self, request: Request) -> AdminScope:
        return await self._auth.authenticate(request.headers.get("authorization"))

    def routes(self) -> list[Route]:
        return [
            Route("/admin/tenants", self.create_tenant, methods=["POST"]),
            Route("/admin/tenants", self.list_tenants, methods=["GET"]),
            Route("/admin/tenants/{tenant}", self.get_tenant, methods=["GET"]),
            Route("/admin/tenants/{tenant}", self.update_tenant, methods=["PATCH"]),
            Route("/admin/tenants/{tenant}", self.delete_tenant, methods=["DELETE"]),
            Route("/admin/tenants/{tenant}/keys", self.create_key, methods=["POST"]),
            Route("/admin/tenants/{tenant}/keys", self.list_keys, methods=["GET"]),
            Route("/admin/keys/{key_id}", self.get_key, methods=["GET"]),
            Route("/admin/keys/{key_id}", self.revoke_key, methods=["DELETE"]),
            Route("/admin/keys/{key_id}/rotate", self.rotate_key, methods=["POST"]),
        ]

    async def create_tenant(self, request: Request) -> Response:
        (await self._scope(request)).require_global("create tenants")
        body = await _body(request)
        record = await self._tenants.create(
            expect(body, "id", str, "a string", required=True),
            expect(body, "policy", str, "a string") or "default",
            expect(body, "overrides", dict, "an object") or {},
        )
        return JSONResponse(record.public(), status_code=201)

    async def list_tenants(self, request: Request) -> Response:
        scope = await self._scope(request)
        tenants = await self._tenants.list()
        return _listing([t.public() for t in tenants if scope.tenant is None or t.id == scope.tenant])

    async def get_tenant(self, request: Request) -> Response:
        scope = await self._scope(request)
        tenant = request.path_params["tenant"]
        scope.check_tenant(tenant)
        return JSONResponse((await self._tenants.get(tenant)).public())

    async def update_tenant(self, request: Request) -> Response:
        scope = await self._scope(request)
        tenant = request.path_params["tenant"]
        scope.check_tenant(tenant)
        scope.require_global("change a tenant's policy")
        body = await _body(request)
        record = await self._tenants.update(
            tenant, expect(body, "policy", str, "a string"), expect(body, "overrides", dict, "an object")
        )
        return JSONResponse(record.public())

    async def delete_tenant(self, request: Request) -> Response:
        scope = await self._scope(request)
        tenant = request.path_params["tenant"]
        scope.check_tenant(tenant)
        scope.require_global("delete tenants")
        await self._tenants.delete(tenant)
        await self._keys.revoke_all(tenant)
        return Response(status_code=204)

    async def create_key(self, request: Request) -> Response:
        scope = await self._scope(request)
        tenant = request.path_params["tenant"]
        scope.check_tenant(tenant)
        await self._tenants.get(tenant)
        body = await _body(request)
        models = expect(body, "models", list, "an array of model names")
        for model in models or []:
            if not isinstance(model, str) or (model != "*" and model not in self._config.models):
                raise InvalidRequest(f"Unknown model {model!r} in 'models'.", param="models")
        metadata = expect(body, "metadata", dict, "an object")
        record, key = await self._keys.create(
            tenant,
            expect(body, "name", str, "a string", required=True),
            expires_at=_expiry(body),
            models=models,
            metadata=metadata,
            budget=_shape(body, "budget", BudgetConfig),
            rate_limit=_shape(body, "rate_limit", RateLimitConfig),
        )
        return JSONResponse({**record.public(), "key": key}, status_code=201)

    async def list_keys(self, request: Request) -> Response:
        scope = await self._scope(request)
        tenant = request.path_params["tenant"]
        scope.check_tenant(tenant)
        await self._tenants.get(tenant)
        return _listing(await self._keys.list(tenant))

    async def _key(self, request: Request) -> tuple[AdminScope, KeyRecord]:
        scope = await self._scope(request)
        return scope, await self._keys.get(request.path_params["key_id"], scope.tenant)

    async def get_key(self, request: Request) -> Response:
        _, record = await self._key(request)
        return JSONResponse(record.public(await self._keys.last_used(record.id)))

    async def revoke_key(self, request: Request) -> Response:
        scope, record = await self._key(request)
        await self._keys.revoke(record.id, scope.tenant)
        return Response(status_code=204)

    async def rotate_key(self, request: Request) -> Response:
        scope, record = await self._key(request)
        body = await _body(request)
        grace = expect(body, "grace_period_s", (int, float), "a number of seconds") or 0
        if not 0 <= grace <= _MAX_GRACE_PERIOD_S:
            raise InvalidRequest(
                f"'grace_period_s' must be between 0 and {_MAX_GRACE_PERIOD_S} seconds (a year).",
                param="grace_period_s",
            )
        new_record, key = await self._keys.rotate(record.id, scope.tenant, float(grace))
        return JSONResponse({**new_record.public(), "key": key}, status_code=201)
