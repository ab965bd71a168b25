"""Stage: apply the tenant's policy. For now, which models it may use."""

from __future__ import annotations

from gateway.context import Handler, ProxyRequest, ProxyResponse
from gateway.errors import ModelNotFound
from gateway.routing import Router


class ModelAccess:
    def __init__(self, router: Router) -> None:
        self._router = router

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        principal = request.principal
        assert principal is not None, "Authenticate must run before ModelAccess"
        # An unknown model and a forbidden one look the same, as on OpenAI: never confirm it exists.
        if request.model not in self._router or not principal.allows_model(request.model):  # key and policy
            raise ModelNotFound(request.model)
        return await call_next(request)
