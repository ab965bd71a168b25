"""create_app(config) -> a Starlette app: routes, lifespan, error rendering. No business logic here."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.admin.api import AdminAPI
from gateway.admin.auth import AdminAuthenticator
from gateway.admin.usage import usage_routes
from gateway.config.schema import GatewayConfig
from gateway.context import CHAT_COMPLETIONS, EMBEDDINGS, Endpoint
from gateway.cost import tokens
from gateway.errors import GatewayError, MethodNotAllowed, ModelNotFound, NotFound
from gateway.metrics import Metrics
from gateway.pipeline import Stage, build_pipeline
from gateway.pipeline.accounting import Account
from gateway.pipeline.auth import Authenticate
from gateway.pipeline.forward import Forward
from gateway.pipeline.limits import EnforceLimits
from gateway.pipeline.parse import ParseBody
from gateway.pipeline.policy import ModelAccess
from gateway.pipeline.usage import MeasureUsage
from gateway.proxy import ProxyEndpoint
from gateway.request_id import request_id_from
from gateway.services import Services, TransportFactory, default_transport
from gateway.store import Store, StoreError

logger = logging.getLogger("gateway")


class RequestIdMiddleware:
    """Give every response an `x-request-id`: the caller's if it is sane, else a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"x-request-id"), None)
        request_id = request_id_from(given)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


class GatewayApp:
    """The ASGI app: proxied endpoints go straight to their handler, the rest through Starlette.

    The proxied endpoints render their own errors and request ids, so skipping Starlette's three
    middleware layers (and their wrapped `send`) on the hot path changes nothing a client sees.
    """

    def __init__(self, starlette: Starlette, fast_routes: dict[str, ProxyEndpoint]) -> None:
        self.starlette = starlette
        self.state = starlette.state
        self._fast_routes = fast_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self._fast_routes.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.starlette(scope, receive, send)


def _error_response(error: GatewayError) -> Response:
    return Response(error.body(), error.status, error.response_headers(), media_type="application/json")


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
        return _error_response(MethodNotAllowed(message, headers=dict(exc.headers or {})))  # keeps `Allow`
    if exc.status_code == 404:
        return _error_response(NotFound(f"Unknown request URL: {request.method} {request.url.path}."))
    return _error_response(GatewayError(str(exc.detail), status=exc.status_code, code="http_error"))


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return _error_response(exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    request_id = request.scope.get("state", {}).get("request_id")
    logger.exception("request_id=%s unhandled error", request_id)
    return _error_response(
        GatewayError(f"The gateway failed unexpectedly; quote request id {request_id} when reporting it.")
    )


def create_app(
    config: GatewayConfig,
    *,
    transport_factory: TransportFactory = default_transport,
    metrics: Metrics | None = None,
    store: Store | None = None,
    metrics_dir: str | None = None,
) -> GatewayApp:
    """The app for `config`.

    `metrics`: built from `config.metrics` unless given. `metrics_dir`: the directory of the workers'
    shared metrics files (`gateway serve --workers N`); None keeps them in this app's registry.
    """
    services = Services.build(
        config, transport_factory=transport_factory, metrics=metrics, store=store, metrics_dir=metrics_dir
    )
    router = services.router
    authenticator = services.authenticator
    models = frozenset(router.models)

    def proxy(endpoint: Endpoint) -> ProxyEndpoint:
        stages: list[Stage] = [
            Authenticate(authenticator),
            ParseBody(),
            ModelAccess(router),
            EnforceLimits(services.limiter, services.prices, services.metrics, notify=services.alerts.notify),
            Account(
                services.prices,
                services.ledger,
                services.metrics,
                reject_unpriced=config.pricing.unpriced == "reject",
                durable=config.ledger.durable,
            ),
            MeasureUsage(),
        ]
        handler = build_pipeline(stages, Forward(router, services.clients))
        return ProxyEndpoint(
            endpoint,
            handler,
            services.metrics,
            config.server.max_body_bytes,
            models,
            access_log=config.server.access_log,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.start()
        tokens.preload()  # the tokenizer for usage estimates: ~0.3 s, once per process
        try:
            yield
        finally:
            await services.stop()

    def model_object(name: str) -> dict[str, object]:
        return {"id": name, "object": "model", "created": 0, "owned_by": config.models[name].upstream}

    async def list_models(request: Request) -> Response:
        principal = await authenticator.authenticate(request.headers.get("authorization"))
        data = [model_object(name) for name in router.models if principal.allows_model(name)]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        principal = await authenticator.authenticate(request.headers.get("authorization"))
        name = request.path_params["model"]
        if name not in router or not principal.allows_model(name):
            raise ModelNotFound(name)
        return JSONResponse(model_object(name))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await services.store.ping()
        except StoreError as exc:
            return JSONResponse({"status": "unavailable", "store": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready", "store": services.store.url, "models": len(router.models)})

    async def metrics_endpoint(request: Request) -> Response:
        metrics = services.metrics
        if metrics.multiprocess_dir is None:
            body = metrics.exposition()
        else:  # reads every worker's files: off the event loop
            body = await run_in_threadpool(metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    admin = AdminAPI(
        config,
        AdminAuthenticator(config.admin.api_keys, authenticator),
        services.tenants,
        services.keys,
    )
    fast_routes = {"/v1/chat/completions": proxy(CHAT_COMPLETIONS), "/v1/embeddings": proxy(EMBEDDINGS)}
    app = Starlette(
        routes=[
            *(Route(path, endpoint, methods=["POST"]) for path, endpoint in fast_routes.items()),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            *admin.routes(),
            *usage_routes(AdminAuthenticator(config.admin.api_keys, authenticator), services.ledger),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        exception_handlers={
            HTTPException: _http_exception,
            GatewayError: _gateway_error,
            Exception: _unexpected,
        },
        middleware=[Middleware(RequestIdMiddleware)],
        lifespan=lifespan,
    )
    app.state.services = services
    return GatewayApp(app, fast_routes)
