"""Tenants: those of the config file (read-only) and those created through the admin API (in the store)."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from gateway.config.schema import GatewayConfig, PolicyConfig
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.identity.keys import format_time, now_utc
from gateway.store import Store

TENANT_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Invalidation messages make changes visible at once; the TTL bounds the damage of a lost one.
CACHE_TTL_S = 30.0
CHANNEL = "identity"  # invalidation messages: b"tenant:<id>" and b"key:<id>"


@dataclass(slots=True)
class TenantRecord:
    id: str
    policy: str
    overrides: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    source: str = "api"  # or "config": read-only through the API

    def public(self) -> dict[str, Any]:
        return {"object": "tenant", **asdict(self)}


def _not_found(tenant_id: str) -> NotFound:
    return NotFound(f"No tenant {tenant_id!r}.", param="id", code="tenant_not_found")


class TenantDirectory:
    def __init__(self, config: GatewayConfig, store: Store) -> None:
        self._config = config
        self._store = store
        self._configured = {
            name: TenantRecord(name, tenant.policy, source="config") for name, tenant in config.tenants.items()
        }
        self._cache: dict[str, tuple[TenantRecord, PolicyConfig, float]] = {}
        self.generation = 0

    def effective_policy(self, policy_name: str, overrides: dict[str, Any], param: str = "overrides") -> PolicyConfig:
        """The named policy with `overrides` applied on top, validated like the config file."""
        if policy_name not in self._config.policies:
            known = ", ".join(sorted(self._config.policies))
            raise InvalidRequest(f"Unknown policy {policy_name!r} (known: {known}).", param="policy")
        if not overrides:
            return self._config.policies[policy_name]
        merged = {**self._config.policies[policy_name].model_dump(exclude_unset=True), **overrides}
        try:
            policy = PolicyConfig.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in (param, *first["loc"]))
            raise InvalidRequest(f"Invalid {where}: {first['msg']}.", param=where) from None
        for model in policy.models:
            if model != "*" and model not in self._config.models:
                raise InvalidRequest(f"Unknown model {model!r} in {param}.models.", param=f"{param}.models")
        return policy

    async def resolve(self, tenant_id: str) -> tuple[TenantRecord, PolicyConfig] | None:
        """The tenant and its effective policy, or None; cached until an invalidation arrives."""
        cached = self._cache.get(tenant_id)
        now = time.monotonic()
        if cached is not None and now - cached[2] < CACHE_TTL_S:
            return cached[0], cached[1]
        record = self._configured.get(tenant_id)
        if record is None:
            raw = await self._store.get(f"tenant:{tenant_id}")
            record = None if raw is None else TenantRecord(**orjson.loads(raw))
        if record is None:
            return None  # not cached: unknown ids must not grow the cache
        policy = self.effective_policy(record.policy, record.overrides)
        self._cache[tenant_id] = (record, policy, now)
        return record, policy

    def forget(self, tenant_id: str) -> None:
        self._cache.pop(tenant_id, None)
        self.generation += 1  # tells caches built on tenants (the Authenticator's) to drop theirs

    async def get(self, tenant_id: str) -> TenantRecord:
        resolved = await self.resolve(tenant_id)
        if resolved is None:
            raise _not_found(tenant_id)
        return resolved[0]

    async def list(self) -> list[TenantRecord]:
        stored = [TenantRecord(**orjson.loads(raw)) for _, raw in await self._store.scan("tenant:")]
        return sorted([*self._configured.values(), *stored], key=lambda record: record.id)

    async def create(self, tenant_id: str, policy: str, overrides: dict[str, Any]) -> TenantRecord:
        if not TENANT_ID.fullmatch(tenant_id):
            raise InvalidRequest(
                "A tenant id is 1 to 63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit.",
                param="id",
            )
        self.effective_policy(policy, overrides)
        record = TenantRecord(tenant_id, policy, overrides, format_time(now_utc()))
        if tenant_id in self._configured or not await self._store.add(f"tenant:{tenant_id}", _dumps(record)):
            raise Conflict(f"The tenant {tenant_id!r} already exists.", param="id", code="already_exists")
        await self._changed(tenant_id)
        return record

    async def update(self, tenant_id: str, policy: str | None, overrides: dict[str, Any] | None) -> TenantRecord:
        record = await self.get(tenant_id)
        if record.source == "config":
            raise Conflict(
                f"The tenant {tenant_id!r} is defined in the config file; change it there.", code="read_only"
            )
        updated = TenantRecord(
            record.id,
            record.policy if policy is None else policy,
            record.overrides if overrides is None else overrides,
            record.created_at,
        )
        self.effective_policy(updated.policy, updated.overrides)
        await self._store.set(f"tenant:{tenant_id}", _dumps(updated))
        await self._changed(tenant_id)
        return updated

    async def delete(self, tenant_id: str) -> None:
        record = await self.get(tenant_id)
        if record.source == "config":
            raise Conflict(
                f"The tenant {tenant_id!r} is defined in the config file; remove it there.", code="read_only"
            )
        await self._store.delete(f"tenant:{tenant_id}")
        await self._changed(tenant_id)

    async def _changed(self, tenant_id: str) -> None:
        self.forget(tenant_id)
        await self._store.publish(CHANNEL, f"tenant:{tenant_id}".encode())


def _dumps(record: TenantRecord) -> bytes:
    stored = asdict(record)
    del stored["source"]
    return orjson.dumps(stored)
