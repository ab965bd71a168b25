"""Stage: authenticate the caller (API key or JWT) and attach the Principal to the request."""

from __future__ import annotations

from gateway.context import Handler, ProxyRequest, ProxyResponse
from gateway.identity.authenticator import Authenticator


class Authenticate:
    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        request.principal = await self._authenticator.authenticate(request.headers.get("authorization"))
        return await call_next(request)
