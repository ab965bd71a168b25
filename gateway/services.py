"""Everything the app builds from its config, and the start-up and shutdown of what needs it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config.schema import GatewayConfig, UpstreamConfig
from gateway.cost.ledger import Ledger
from gateway.cost.prices import PriceBook
from gateway.identity.authenticator import Authenticator
from gateway.identity.jwt import JWTVerifier
from gateway.identity.keyring import KeyRing
from gateway.identity.tenants import TenantDirectory
from gateway.limits import Limiter
from gateway.limits.webhook import AlertWebhook
from gateway.metrics import Metrics
from gateway.routing import Router
from gateway.store import Store, open_store
from gateway.upstream.aiohttp_transport import AiohttpTransport
from gateway.upstream.client import UpstreamClient
from gateway.upstream.providers import provider_for
from gateway.upstream.transport import Transport

logger = logging.getLogger("gateway")

TransportFactory = Callable[[str, UpstreamConfig], Transport]


def default_transport(name: str, config: UpstreamConfig) -> Transport:
    return AiohttpTransport(max_connections=config.max_connections)


@dataclass(slots=True)
class Services:
    config: GatewayConfig
    router: Router
    metrics: Metrics
    store: Store
    tenants: TenantDirectory
    keys: KeyRing
    authenticator: Authenticator
    ledger: Ledger  # the spend ledger: batched writes, flushed on stop
    prices: PriceBook
    limiter: Limiter
    alerts: AlertWebhook
    transport_factory: TransportFactory
    clients: dict[str, UpstreamClient] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        config: GatewayConfig,
        *,
        transport_factory: TransportFactory = default_transport,
        metrics: Metrics | None = None,
        store: Store | None = None,
        metrics_dir: str | None = None,
    ) -> Services:
        store = store or open_store(config.store.url)
        tenants = TenantDirectory(config, store)
        keys = KeyRing(config, store)
        jwt = JWTVerifier(config.auth.jwt) if config.auth.jwt is not None and config.auth.jwt.issuers else None
        return cls(
            config=config,
            router=Router(config),
            metrics=metrics or Metrics(config=config.metrics, multiprocess_dir=metrics_dir),
            store=store,
            tenants=tenants,
            keys=keys,
            authenticator=Authenticator(store, tenants, keys, jwt),
            ledger=Ledger(
                store,
                flush_interval_s=config.ledger.flush_interval_s,
                commit_delay_s=config.ledger.commit_delay_s,
            ),
            prices=PriceBook.from_config(config),
            limiter=Limiter(store),
            alerts=AlertWebhook(),
            transport_factory=transport_factory,
        )

    async def start(self) -> None:
        _warn_about_config(self.config)
        for name, upstream in self.config.upstreams.items():
            transport = self.transport_factory(name, upstream)
            self.clients[name] = UpstreamClient(name, upstream, provider_for(upstream), transport)
        self._tasks.append(asyncio.create_task(self.authenticator.watch(), name="identity-watch"))
        self._tasks.append(asyncio.create_task(self.authenticator.flush_periodically(), name="last-used-flush"))
        self.ledger.start()

    async def stop(self) -> None:
        self.metrics.close()  # with several workers: this one's in-flight gauge leaves the sum
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.limiter.drain()  # settlements still running: before the store closes
        with contextlib.suppress(Exception):
            await self.keys.flush_last_used()
        await self.ledger.aclose()  # writes what is left; logs what cannot be written
        await self.alerts.aclose()
        for client in self.clients.values():
            await client.transport.aclose()
        if self.authenticator.jwt is not None:
            await self.authenticator.jwt.aclose()
        await self.store.aclose()


def _warn_about_config(config: GatewayConfig) -> None:
    for name, upstream in config.upstreams.items():
        if not upstream.api_key.get_secret_value() and "://127.0.0.1" not in upstream.base_url:
            hint = "OPENAI_API_KEY" if upstream.kind == "openai" else "AZURE_OPENAI_API_KEY"
            logger.warning(
                "upstream %r has no api_key: its requests will fail with upstream_auth_failed. "
                "Set it (for example `export %s=sk-...`) or try `make demo`, which uses the built-in mock.",
                name,
                hint,
            )
    if not config.tenants and not config.admin.api_keys:
        logger.warning("no tenants and no admin key are configured: every API request will get 401")
