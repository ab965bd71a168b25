from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import httpx

from gateway.limits.budget import BudgetAlert, Window
from gateway.limits.webhook import AlertWebhook


def _alert(url: str | None) -> BudgetAlert:
    window = Window("day", "2030-01-31", datetime(2030, 1, 31, tzinfo=UTC), datetime(2030, 2, 1, tzinfo=UTC))
    return BudgetAlert("tenant acme", window, 5_000_000_000, 4_100_000_000, 0.8, url)


async def test_an_alert_is_posted_to_the_webhook_once() -> None:
    received: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(204)

    webhook = AlertWebhook(httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    webhook.notify(_alert("https://hooks.example/budget"))
    await webhook.aclose()
    assert len(received) == 1
    assert str(received[0].url) == "https://hooks.example/budget"
    payload = json.loads(received[0].content)
    assert payload["type"] == "budget.alert"
    assert payload["who"] == "tenant acme"
    assert payload["limit_usd"] == "$5.00"
    assert payload["spent_usd"] == "$4.10"
    assert payload["window"] == "2030-01-31"


async def test_no_url_means_no_call_and_a_failing_hook_does_not_raise() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused", request=request)

    webhook = AlertWebhook(httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    webhook.notify(_alert(None))
    webhook.notify(_alert("https://hooks.example/down"))
    await asyncio.sleep(0)
    await webhook.aclose()
    assert calls == 1
