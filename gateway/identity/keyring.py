"""API keys: from the config file (hashes, read-only) and from the admin API (records in the store).

Records are cached per replica; every change publishes an invalidation on the store's `identity`
channel, so a revocation takes effect on every replica as soon as the message arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from gateway.config.schema import GatewayConfig
from gateway.errors import Conflict, NotFound
from gateway.identity.keys import KeyRecord, format_time, hash_key, key_id_of, new_key, now_utc, parse_time
from gateway.identity.tenants import CACHE_TTL_S, CHANNEL
from gateway.store import Store

_MAX_CACHED = 50_000


def _not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key {key_id!r}.", param="key_id", code="key_not_found")


class KeyRing:
    def __init__(self, config: GatewayConfig, store: Store, clock: Callable[[], datetime] = now_utc) -> None:
        self._store = store
        self._clock = clock
        self.configured: dict[str, tuple[str, str]] = {}  # hash -> (tenant, key id)
        for tenant_name, tenant in config.tenants.items():
            for key in tenant.api_keys:
                digest = key.sha256 or hash_key(key.key.get_secret_value() if key.key else "")
                self.configured[digest] = (tenant_name, key.id)
        self._configured_ids = {key_id for _, key_id in self.configured.values()}
        self._cache: dict[str, tuple[KeyRecord, float]] = {}
        self._last_used: dict[str, str] = {}

    async def find(self, key: str) -> KeyRecord | None:
        """The stored record a key of this gateway's format points at, if its hash matches."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        record = await self.get_record(key_id)
        if record is None or not record.matches(key):
            return None
        now = self._clock()
        if record.revoked_at is None and not record.expired(now):  # a refused attempt is not a use
            self._last_used[key_id] = format_time(now) or ""
        return record

    async def get_record(self, key_id: str) -> KeyRecord | None:
        cached = self._cache.get(key_id)
        now = time.monotonic()
        if cached is not None and now - cached[1] < CACHE_TTL_S:
            return cached[0]
        raw = await self._store.get(f"apikey:{key_id}")
        record = None if raw is None else KeyRecord.loads(raw)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        if record is not None:  # unknown ids are not cached: guessing them must not grow memory
            self._cache[key_id] = (record, now)
        return record

    def forget(self, key_id: str) -> None:
        self._cache.pop(key_id, None)

    async def create(
        self,
        tenant: str,
        name: str,
        *,
        expires_at: str | None = None,
        models: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        budget: dict[str, Any] | None = None,
        rate_limit: dict[str, Any] | None = None,
    ) -> tuple[KeyRecord, str]:
        key_id, key = new_key()
        record = KeyRecord(
            key_id,
            tenant,
            name,
            hash_key(key),
            format_time(self._clock()) or "",
            expires_at,
            models=models,
            metadata=metadata or {},
            budget=budget,
            rate_limit=rate_limit,
        )
        await self._store.set(f"apikey:{key_id}", record.dumps())
        await self._store.set(f"tenantkey:{tenant}:{key_id}", b"")
        return record, key

    async def list(self, tenant: str) -> list[dict[str, Any]]:
        listed = []
        for index_key, _ in await self._store.scan(f"tenantkey:{tenant}:"):
            key_id = index_key.rsplit(":", 1)[1]
            raw = await self._store.get(f"apikey:{key_id}")
            if raw is not None:
                listed.append(KeyRecord.loads(raw).public(await self.last_used(key_id)))
        return listed

    async def last_used(self, key_id: str) -> str | None:
        """When the key last authenticated, as of the last flush of the batched times."""
        used = await self._store.get(f"apikey-used:{key_id}")
        return None if used is None else used.decode()

    async def get(self, key_id: str, tenant: str | None = None) -> KeyRecord:
        """The record, or 404 also when it belongs to a tenant other than `tenant` (never reveal it)."""
        raw = await self._store.get(f"apikey:{key_id}")
        record = None if raw is None else KeyRecord.loads(raw)
        if record is None or (tenant is not None and record.tenant != tenant):
            raise _not_found(key_id)
        return record

    async def revoke(self, key_id: str, tenant: str | None = None, *, after_s: float = 0.0) -> KeyRecord:
        """Revoke now, or let the key expire `after_s` from now (a rotation's grace period)."""
        record = await self.get(key_id, tenant)
        now = self._clock()
        if after_s > 0:
            deadline = now + timedelta(seconds=after_s)
            current = parse_time(record.expires_at)  # compare times, not strings: "…:01Z" > "…:01.25Z"
            if current is None or current > deadline:
                record.expires_at = format_time(deadline)
        elif record.revoked_at is None:
            record.revoked_at = format_time(now)
        await self._store.set(f"apikey:{key_id}", record.dumps())
        self.forget(key_id)
        await self._store.publish(CHANNEL, f"key:{key_id}".encode())
        return record

    async def rotate(self, key_id: str, tenant: str | None, grace_period_s: float) -> tuple[KeyRecord, str]:
        old = await self.get(key_id, tenant)
        if old.revoked_at is not None or old.expired(self._clock()):
            raise Conflict(
                f"The API key {key_id!r} is revoked or expired; create a new key instead of rotating it.",
                code="key_inactive",
            )
        new_record, key = await self.create(
            old.tenant,
            old.name,
            expires_at=old.expires_at,
            models=old.models,
            metadata={**old.metadata, "rotated_from": old.id},
            budget=old.budget,
            rate_limit=old.rate_limit,
        )
        await self.revoke(key_id, tenant, after_s=grace_period_s)
        return new_record, key

    async def revoke_all(self, tenant: str) -> None:
        """Revoke every key of a deleted tenant, and drop it from the tenant's listing."""
        for index_key, _ in await self._store.scan(f"tenantkey:{tenant}:"):
            await self.revoke(index_key.rsplit(":", 1)[1])
            await self._store.delete(index_key)

    async def flush_last_used(self) -> None:
        """Write the batched `last_used_at` times: one write per key per flush, off the request path."""
        pending, self._last_used = self._last_used, {}
        for key_id, moment in pending.items():
            await self._store.set(f"apikey-used:{key_id}", moment.encode())
