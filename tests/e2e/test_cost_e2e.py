"""Costs, budgets, rate limits and the spend ledger through real `gateway serve` processes and the real SDK.

Every test uses a tenant of its own, so the ledger rows it reads are its own. Prices are gpt-4o-mini's from
config/prices.yaml (0.15 input, 0.075 cached input, 0.60 output, USD per 1M tokens).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis_server import RedisServer, start_redis_server

from .support import Proc, free_port, gateway_config, serve, start, wait_ready

PRICES_FILE = Path(__file__).resolve().parents[2] / "config" / "prices.yaml"
ADMIN_KEY = "sk-admin-cost-e2e-0123456789"
INPUT, CACHED_INPUT, OUTPUT = Decimal("0.15"), Decimal("0.075"), Decimal("0.60")
MESSAGES: list[Any] = [{"role": "user", "content": "how much does this cost"}]

BUDGET_MAX_TOKENS = 1000
# 10 worst cases (each at least 1000 output tokens x $0.60 / 1M = $0.0006, plus the prompt) fit; 11 do not.
BUDGET_USD = Decimal("0.0063")
BUDGET_ADMITS_AT_MOST = 10

TENANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "rl": {"rate_limit": {"requests_per_minute": 1000, "tokens_per_minute": 1_000_000}},
    "budget": {"budget": {"usd_per_day": float(BUDGET_USD), "reserve_max_tokens": BUDGET_MAX_TOKENS}},
    "stream": {},
    "disc": {},
    "costs": {},
    "six": {"rate_limit": {"requests_per_minute": 6}},
    "broke": {"budget": {"usd_per_day": 0.000001}},  # less than any request's worst case
}


def key_of(tenant: str) -> str:
    return f"sk-gw-cost-{tenant}-0123456789abcdef"


def cost_config(mock_port: int, dead_port: int, store_url: str) -> dict[str, Any]:
    config = gateway_config(mock_port, dead_port, store_url)
    config["pricing"] = {"file": str(PRICES_FILE)}
    config["admin"] = {"api_keys": [ADMIN_KEY]}
    # Durable (opt-in): an answer's last bytes wait for its ledger write, so a test can read the ledger at once.
    config["ledger"] = {"durable": True}
    config["policies"] = {f"p-{name}": policy for name, policy in TENANTS.items()}
    config["tenants"] = {
        f"cost-{name}": {"policy": f"p-{name}", "api_keys": [{"id": f"{name}-key", "key": key_of(name)}]}
        for name in TENANTS
    }
    return config


def nano_of(usage: Any) -> int:
    """The price arithmetic of docs/costs.md, in whole nano-dollars (half-even), as the ledger keeps it."""
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
    cost = ((usage.prompt_tokens - cached) * INPUT + cached * CACHED_INPUT + usage.completion_tokens * OUTPUT) / (
        Decimal(1_000_000)
    )
    return int(cost.quantize(Decimal("1E-9"), rounding=ROUND_HALF_EVEN).scaleb(9))


def usd_text(nano: int) -> str:
    return f"{nano // 10**9}.{nano % 10**9:09d}"


def sdk(proc: Proc, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proc.url}/v1", api_key=key_of(tenant), max_retries=0, timeout=15.0)


def async_sdk(proc: Proc, tenant: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proc.url}/v1", api_key=key_of(tenant), max_retries=0, timeout=15.0)


def admin_get(proc: Proc, path: str, **params: Any) -> Any:
    with httpx.Client(base_url=proc.url, timeout=10.0, trust_env=False) as http:
        response = http.get(path, params=params, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()


def usage_rows(proc: Proc, tenant: str) -> list[dict[str, Any]]:
    body = admin_get(proc, "/admin/usage", tenant=f"cost-{tenant}", group_by="model")
    rows: list[dict[str, Any]] = body["data"]
    return rows


def usage_row(proc: Proc, tenant: str) -> dict[str, Any]:
    rows = usage_rows(proc, tenant)
    assert len(rows) == 1, rows
    return rows[0]


def poll_usage(proc: Proc, tenant: str, done: Any, timeout_s: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = usage_rows(proc, tenant)
        if len(rows) == 1 and done(rows[0]):
            return rows[0]
        assert time.monotonic() < deadline, f"the ledger of cost-{tenant} did not get there: {rows}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cost_gateway(mock_upstream: Proc, dead_port: int, workdir: Path) -> Iterator[Proc]:
    store = f"sqlite:///{workdir / 'cost-store' / 'gateway.db'}"
    proc = serve("cost-gateway", cost_config(mock_upstream.port, dead_port, store), workdir)
    try:
        yield proc
    finally:
        proc.stop()


# --- 1. the cost and rate-limit headers of one answer ------------------------------------------------------


def test_an_answer_carries_its_cost_and_the_rate_limit_headers(cost_gateway: Proc) -> None:
    with sdk(cost_gateway, "rl") as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0
    expected = nano_of(completion.usage)
    assert expected > 0
    assert raw.headers["x-gateway-cost-usd"] == usd_text(expected)
    assert raw.headers["x-ratelimit-limit-requests"] == "1000"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) < 1000
    assert raw.headers["x-ratelimit-reset-requests"]
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 1_000_000
    assert raw.headers["x-ratelimit-reset-tokens"]
    row = poll_usage(cost_gateway, "rl", lambda r: r["requests"] == 1)
    assert row["cost_usd"] == usd_text(expected)


def test_a_policy_without_rate_limit_sends_no_rate_limit_headers(cost_gateway: Proc) -> None:
    with sdk(cost_gateway, "plain") as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    usage = raw.parse().usage
    assert usage is not None
    assert raw.headers["x-gateway-cost-usd"] == usd_text(nano_of(usage))
    assert "x-ratelimit-limit-requests" not in raw.headers


# --- 2. a budget under 50 concurrent requests ----------------------------------------------------------------


async def test_a_budget_admits_only_what_it_can_pay_for_under_concurrency(cost_gateway: Proc) -> None:
    async def one(client: openai.AsyncOpenAI) -> Any:
        try:
            return await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                max_tokens=BUDGET_MAX_TOKENS,
                extra_headers={"x-mock-latency-ms": "1500"},  # every request is admitted before any settles
            )
        except openai.RateLimitError as exc:
            return exc

    async with async_sdk(cost_gateway, "budget") as client:
        outcomes = await asyncio.gather(*(one(client) for _ in range(50)))

    admitted = [o for o in outcomes if isinstance(o, openai.types.chat.ChatCompletion)]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(admitted) + len(refused) == 50
    assert refused, "the budget refused nothing"
    assert 1 <= len(admitted) <= BUDGET_ADMITS_AT_MOST
    for exc in refused:
        assert exc.status_code == 429
        assert exc.code == "insufficient_quota"
        assert exc.response.headers["x-should-retry"] == "false"

    row = usage_row(cost_gateway, "budget")  # durable ledger: every answer a client has is in the store
    usages = [o.usage for o in admitted]
    assert all(u is not None for u in usages)
    assert row["model"] == "gpt-4o-mini"
    assert row["requests"] == len(admitted)
    assert row["prompt_tokens"] == sum(u.prompt_tokens for u in usages if u is not None)
    assert row["completion_tokens"] == sum(u.completion_tokens for u in usages if u is not None)
    assert row["cost_usd"] == usd_text(sum(nano_of(u) for u in usages))
    assert Decimal(row["cost_usd"]) <= BUDGET_USD


# --- 3. streams ------------------------------------------------------------------------------------------------


def test_streams_are_recorded_with_and_without_include_usage(cost_gateway: Proc) -> None:
    with sdk(cost_gateway, "stream") as client:
        asked = list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
        not_asked = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    usage = asked[-1].usage
    assert usage is not None
    assert all(chunk.usage is None for chunk in not_asked)
    # The same request, so the same usage; the gateway asked the upstream for it both times.
    row = usage_row(cost_gateway, "stream")
    assert row["requests"] == 2
    assert row["prompt_tokens"] == 2 * usage.prompt_tokens
    assert row["completion_tokens"] == 2 * usage.completion_tokens
    assert row["cost_usd"] == usd_text(2 * nano_of(usage))
    assert row["estimated_requests"] == 0


def test_a_stream_cut_off_by_its_client_is_recorded_as_estimated(cost_gateway: Proc) -> None:
    payload = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    headers = {"authorization": f"Bearer {key_of('disc')}", "x-mock-chunk-delay-ms": "200"}
    with (
        httpx.Client(base_url=cost_gateway.url, timeout=10.0, trust_env=False) as http,
        http.stream("POST", "/v1/chat/completions", json=payload, headers=headers) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        got = [line for line in (next(lines), next(lines), next(lines)) if line.startswith("data: ")]
        assert got  # midway: the stream has more pieces to come
    row = poll_usage(cost_gateway, "disc", lambda r: r["estimated_requests"] >= 1)
    assert row["requests"] == 1
    assert row["prompt_tokens"] > 0


# --- 6. metrics and 7. OpenAI's costs API ----------------------------------------------------------------------


def test_metrics_after_traffic(cost_gateway: Proc) -> None:
    with sdk(cost_gateway, "broke") as client, pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=100)
    with sdk(cost_gateway, "six") as client:
        for _ in range(6):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with sdk(cost_gateway, "plain") as client:
        list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    with httpx.Client(base_url=cost_gateway.url, timeout=10.0, trust_env=False) as http:
        text = http.get("/metrics").text
    assert 'gateway_tokens_total{model="gpt-4o-mini",tenant="cost-plain",type="prompt"}' in text
    assert 'gateway_tokens_total{model="gpt-4o-mini",tenant="cost-plain",type="completion"}' in text
    assert 'gateway_cost_usd_total{model="gpt-4o-mini",tenant="cost-plain"}' in text
    assert "gateway_time_to_first_token_seconds_count" in text
    assert 'gateway_budget_rejections_total{tenant="cost-broke"} 1.0' in text
    assert 'gateway_rate_limited_total{tenant="cost-six"} 1.0' in text


def test_the_openai_costs_api_matches_the_ledger(cost_gateway: Proc) -> None:
    with sdk(cost_gateway, "costs") as client:
        usages = [client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).usage for _ in range(3)]
    total = sum(nano_of(u) for u in usages)
    row = usage_row(cost_gateway, "costs")
    assert row["cost_usd"] == usd_text(total)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    page = admin_get(
        cost_gateway, "/v1/organization/costs", start_time=int(today.timestamp()), project_ids="cost-costs"
    )
    assert page["object"] == "page"
    buckets = page["data"]
    assert buckets
    assert buckets[-1]["object"] == "bucket"
    results = [r for bucket in buckets for r in bucket["results"]]
    assert len(results) == 1, results
    assert results[0]["amount"]["currency"] == "usd"
    assert Decimal(str(results[0]["amount"]["value"])) == Decimal(row["cost_usd"])


# --- 4. rate limits across two processes sharing redis ---------------------------------------------------------


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis_server(tmp_path_factory.mktemp("cost-redis"))
    try:
        yield server
    finally:
        server.stop()


def test_a_rate_limit_holds_across_two_processes_sharing_redis(
    mock_upstream: Proc, dead_port: int, workdir: Path, redis: RedisServer
) -> None:
    config = cost_config(mock_upstream.port, dead_port, redis.url)
    one = serve("cost-replica-1", config, workdir)
    try:
        two = serve("cost-replica-2", config, workdir)
        try:
            with sdk(one, "six") as first, sdk(two, "six") as second:
                for i in range(6):
                    client = first if i % 2 == 0 else second
                    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                for client in (first, second):
                    with pytest.raises(openai.RateLimitError) as caught:
                        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                    assert caught.value.code == "rate_limit_exceeded"
                    assert int(caught.value.response.headers["retry-after"]) >= 1
        finally:
            two.stop()
    finally:
        one.stop()


# --- 5. the ledger across SIGKILL and restart --------------------------------------------------------------------


async def _waves(proc: Proc) -> tuple[int, int]:
    """30 requests that all finish, then 30 in flight when the gateway is killed: (completed 200s, sent)."""
    payload = {"model": "gpt-4o-mini", "messages": MESSAGES}
    completed = 0

    async def one(http: httpx.AsyncClient, latency_ms: int) -> None:
        nonlocal completed
        headers = {"authorization": f"Bearer {key_of('plain')}", "x-mock-latency-ms": str(latency_ms)}
        try:
            response = await http.post("/v1/chat/completions", json=payload, headers=headers)
            body = response.json()
        except (httpx.TransportError, ValueError):
            return
        if response.status_code == 200 and body.get("usage"):
            completed += 1

    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=proc.url, timeout=10.0, trust_env=False, limits=limits) as http:
        await asyncio.gather(*(one(http, 0) for _ in range(30)))
        assert completed == 30
        second = [asyncio.create_task(one(http, 20 * i)) for i in range(30)]  # 0 to 580 ms
        await asyncio.sleep(0.3)
        os.kill(proc.popen.pid, signal.SIGKILL)
        await asyncio.gather(*second)
    return completed, 60


async def test_the_durable_ledger_survives_sigkill_and_counts_nothing_twice(
    mock_upstream: Proc, dead_port: int, workdir: Path
) -> None:
    store = f"sqlite:///{workdir / 'kill-store' / 'gateway.db'}"
    proc = serve("kill-gateway", cost_config(mock_upstream.port, dead_port, store), workdir)
    try:
        completed, sent = await _waves(proc)
        assert proc.popen.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.stop()
    assert 30 < completed < sent, f"the kill did not land mid-wave ({completed} of {sent} completed)"

    assert proc.config_path is not None
    port = free_port()
    restarted = start(
        "kill-gateway-2", ["serve", "--config", str(proc.config_path), "--port", str(port)], port, workdir
    )
    try:
        wait_ready(restarted, "/healthz")
        row = usage_row(restarted, "plain")
    finally:
        restarted.stop()
    # Every answer a client received in full is in the ledger; beyond that only answers cut off by the kill.
    assert completed <= row["requests"] <= sent
    per_request = row["prompt_tokens"] // row["requests"]
    assert row["prompt_tokens"] == per_request * row["requests"]  # identical requests: none partial or doubled
    assert row["estimated_requests"] == 0
