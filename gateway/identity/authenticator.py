"""Who is calling: an `Authorization: Bearer` API key or JWT, resolved to a Principal."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable
from datetime import datetime

from gateway.config.schema import PolicyConfig
from gateway.context import Principal
from gateway.errors import AuthenticationFailed
from gateway.identity.jwt import JWTVerifier, looks_like_jwt
from gateway.identity.keyring import KeyRing
from gateway.identity.keys import KeyRecord, hash_key, now_utc
from gateway.identity.tenants import CHANNEL, TenantDirectory
from gateway.store import Store

logger = logging.getLogger("gateway.identity")


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed("You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY`.")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("The Authorization header must be `Bearer YOUR_KEY`.")
    return token


class Authenticator:
    def __init__(
        self,
        store: Store,
        tenants: TenantDirectory,
        keys: KeyRing,
        jwt: JWTVerifier | None = None,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.store = store
        self.tenants = tenants
        self.keys = keys
        self.jwt = jwt
        self._clock = clock
        self._principals: dict[str, Principal] = {}  # config keys, by hash: the hot path's cache
        self._stored: dict[str, tuple[KeyRecord, Principal]] = {}  # stored keys, by id
        self._tenants_generation = tenants.generation

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if self._tenants_generation != self.tenants.generation:  # a tenant changed in this process
            self._tenants_generation = self.tenants.generation
            self._principals.clear()
            self._stored.clear()
        digest = hash_key(token)
        principal = self._principals.get(digest)
        if principal is not None:
            return principal
        configured = self.keys.configured.get(digest)
        if configured is not None and hmac.compare_digest(digest, hash_key(token)):
            tenant, key_id = configured
            principal = self._principals[digest] = await self._principal(tenant, key_id)
            return principal
        if self.jwt is not None and looks_like_jwt(token):
            identity = await self.jwt.verify(token)
            principal = await self._principal(identity.tenant, f"jwt:{identity.issuer}")
            return Principal(
                principal.tenant,
                principal.key_id,
                principal.policy_name,
                principal.policy,
                user=identity.user,
                roles=identity.roles,
            )
        return await self._stored_key(token)

    async def _stored_key(self, token: str) -> Principal:
        record = await self.keys.find(token)
        if record is None:
            raise AuthenticationFailed("Incorrect API key provided. Check the key the gateway gave you.")
        if record.revoked_at is not None:
            raise AuthenticationFailed(f"This API key was revoked at {record.revoked_at}.", code="key_revoked")
        if record.expired(self._clock()):
            raise AuthenticationFailed(f"This API key expired at {record.expires_at}.", code="key_expired")
        cached = self._stored.get(record.id)
        # The same cached record and tenant policy: the same principal. The tenant is checked too, so a
        # change made on this replica applies at once, not only when its invalidation message loops back.
        resolved = await self.tenants.resolve(record.tenant)
        if cached is not None and cached[0] is record and resolved is not None and cached[1].policy is resolved[1]:
            return cached[1]
        principal = await self._principal(record.tenant, record.id)
        key_policy = None
        if record.budget or record.rate_limit:
            key_policy = PolicyConfig.model_validate({"budget": record.budget, "rate_limit": record.rate_limit})
        principal = Principal(
            principal.tenant,
            record.id,
            principal.policy_name,
            principal.policy,
            key_models=None if record.models is None else frozenset(record.models),
            key_policy=key_policy,
        )
        if len(self._stored) >= 50_000:
            self._stored.clear()
        self._stored[record.id] = (record, principal)
        return principal

    async def _principal(self, tenant: str, key_id: str) -> Principal:
        resolved = await self.tenants.resolve(tenant)
        if resolved is None:
            raise AuthenticationFailed(f"The tenant {tenant!r} does not exist.", code="unknown_tenant")
        record, policy = resolved
        return Principal(tenant, key_id, record.policy, policy)

    def forget(self, message: bytes) -> None:
        kind, _, ident = message.decode().partition(":")
        self._principals.clear()  # rare: any tenant change may touch a cached principal
        self._stored.clear()
        if kind == "key":
            self.keys.forget(ident)
        elif kind == "tenant":
            self.tenants.forget(ident)

    async def watch(self) -> None:
        """Apply other replicas' changes as they are published; runs for the app's lifetime."""
        while True:
            try:
                subscription = self.store.subscribe(CHANNEL)
                try:
                    async for message in subscription:
                        self.forget(message)
                finally:
                    with contextlib.suppress(Exception):
                        await subscription.aclose()
            except asyncio.CancelledError:
                raise
            except Exception:  # the store went away: keep serving from the cache, resubscribe
                logger.warning("identity invalidation feed failed; retrying in 1s", exc_info=True)
                await asyncio.sleep(1.0)

    async def flush_periodically(self, every_s: float = 30.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.keys.flush_last_used()
            except Exception:
                logger.warning("could not record last_used_at for API keys", exc_info=True)
