"""Budget alerts to an operator's webhook: fire and forget, off the request path, bounded in time."""

from __future__ import annotations

import asyncio
import logging

import httpx

from gateway.limits.budget import BudgetAlert, format_usd

logger = logging.getLogger("gateway.limits")

TIMEOUT_S = 5.0


class AlertWebhook:
    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, alert: BudgetAlert) -> None:
        """Called once per window and budget (the store decides which replica); POSTs if a URL is set."""
        if alert.webhook_url is None:
            return
        task = asyncio.get_running_loop().create_task(self._post(alert.webhook_url, alert))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, alert: BudgetAlert) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT_S, trust_env=False, follow_redirects=False)
        payload = {
            "type": "budget.alert",
            "who": alert.who,
            "window": alert.window.label,
            "limit_usd": format_usd(alert.limit_nano),
            "spent_usd": format_usd(alert.spent_nano),
            "alert_at": alert.alert_at,
            "message": alert.message,
        }
        try:
            response = await self._client.post(url, json=payload)
            if response.status_code >= 400:
                logger.warning("budget alert webhook answered HTTP %d", response.status_code)
        except httpx.HTTPError as exc:
            logger.warning("budget alert webhook failed: %s", type(exc).__name__)

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=TIMEOUT_S)
        if self._client is not None:
            await self._client.aclose()
