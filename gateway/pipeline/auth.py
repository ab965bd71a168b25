"""Stage: authenticate the caller by `Authorization: Bearer <key>` against the tenants' key hashes."""

from __future__ import annotations

import hashlib
import hmac

from gateway.config.schema import GatewayConfig
from gateway.context import Handler, Principal, ProxyRequest, ProxyResponse
from gateway.errors import AuthenticationFailed


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyIndex:
    """Key hash -> principal, built once from the config."""

    def __init__(self, config: GatewayConfig) -> None:
        self._by_hash: dict[str, tuple[str, Principal]] = {}
        for tenant_name, tenant in config.tenants.items():
            policy = config.policies[tenant.policy]
            for key in tenant.api_keys:
                digest = key.sha256 or hash_key(key.key.get_secret_value() if key.key else "")
                self._by_hash[digest] = (digest, Principal(tenant_name, key.id, tenant.policy, policy))

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed("You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY`.")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("The Authorization header must be `Bearer YOUR_KEY`.")
        digest = hash_key(token)
        # The dict finds the candidate by hash; the comparison that decides is constant-time.
        entry = self._by_hash.get(digest)
        if entry is None or not hmac.compare_digest(entry[0], digest):
            raise AuthenticationFailed("Incorrect API key provided. Check the key the gateway gave you.")
        return entry[1]


class Authenticate:
    def __init__(self, keys: KeyIndex) -> None:
        self._keys = keys

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        request.principal = self._keys.authenticate(request.headers.get("authorization"))
        return await call_next(request)
