"""Who may use the admin API: an admin key (every tenant) or a tenant admin's JWT (its own tenant)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from pydantic import SecretStr

from gateway.errors import NotFound, PermissionDenied
from gateway.identity.authenticator import Authenticator, bearer_token

TENANT_ADMIN_ROLE = "tenant-admin"


@dataclass(slots=True, frozen=True)
class AdminScope:
    tenant: str | None  # None: every tenant

    def check_tenant(self, tenant: str) -> None:
        """404 for another tenant's id: a tenant admin must not learn that it exists."""
        if self.tenant is not None and self.tenant != tenant:
            raise NotFound(f"No tenant {tenant!r}.", param="id", code="tenant_not_found")

    def tenants(self, requested: list[str], param: str) -> list[str] | None:
        """The tenants a query may read: those `requested` (none: every tenant, None), within this scope.

        A tenant admin reads only its own tenant, which is also the default; naming another is a 404.
        """
        if self.tenant is None:
            return requested or None
        for tenant in requested:
            if tenant != self.tenant:
                raise NotFound(f"No tenant {tenant!r}.", param=param, code="tenant_not_found")
        return [self.tenant]

    def require_global(self, action: str) -> None:
        if self.tenant is not None:
            raise PermissionDenied(f"Only a gateway admin key may {action}; a tenant admin manages its own keys.")


class AdminAuthenticator:
    def __init__(self, admin_keys: list[SecretStr], authenticator: Authenticator) -> None:
        self._admin_keys = [key.get_secret_value().encode() for key in admin_keys]
        self._authenticator = authenticator

    async def authenticate(self, authorization: str | None) -> AdminScope:
        token = bearer_token(authorization).encode()
        # Compare with every admin key, without stopping early, so timing says nothing about which matched.
        matched = False
        for key in self._admin_keys:
            matched |= hmac.compare_digest(key, token)
        if matched:
            return AdminScope(None)
        principal = await self._authenticator.authenticate(authorization)  # 401 unless a valid tenant credential
        if TENANT_ADMIN_ROLE in principal.roles:
            return AdminScope(principal.tenant)
        raise PermissionDenied(
            "This credential may call the API but not the admin API: use an admin key, "
            f"or a token with the {TENANT_ADMIN_ROLE!r} role."
        )
