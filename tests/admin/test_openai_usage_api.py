"""OpenAI's /v1/organization/usage/completions and /v1/organization/costs over the ledger.

The expected shapes are written out from OpenAI's spec (UsageResponse, UsageTimeBucket,
UsageCompletionsResult, CostsResult) so a FinOps tool pointed at OpenAI reads the gateway unchanged.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from typing import Any

from gateway.cost.ledger import UsageRecord

from .conftest import ADMIN_KEY, CONFIG_KEY, Gateway, error_of, mint

JAN1 = 1893456000  # 2030-01-01T00:00:00Z
D = 86400
PAGE_FIELDS = {"object", "data", "has_more", "next_page"}
BUCKET_FIELDS = {"object", "start_time", "end_time", "results"}
USAGE_RESULT_FIELDS = {
    "object",
    "input_tokens",
    "output_tokens",
    "input_cached_tokens",
    "input_uncached_tokens",
    "num_model_requests",
    "project_id",
    "user_id",
    "api_key_id",
    "model",
    "batch",
    "service_tier",
}
COST_RESULT_FIELDS = {"object", "amount", "line_item", "project_id", "api_key_id", "quantity", "quantity_unit"}
USAGE = "/v1/organization/usage/completions"
COSTS = "/v1/organization/costs"


def day(n: int) -> date:
    return date(2030, 1, n)


def rec(**fields: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "tenant": "acme",
        "key_id": "k1",
        "user": None,
        "model": "gpt-4o-mini",
        "day": day(1),
        "prompt_tokens": 100,
        "cached_tokens": 30,
        "completion_tokens": 50,
        "reasoning_tokens": 10,
        "cost_nano": 1_250_000,
        "estimated": False,
    }
    return UsageRecord(**{**base, **fields})


async def feed(gw: Gateway, *records: UsageRecord) -> None:
    for record in records:
        gw.services.ledger.record(record)
    await gw.services.ledger.flush()


async def page(gw: Gateway, path: str, query: str, auth: str = ADMIN_KEY) -> dict[str, Any]:
    response = await gw.admin("GET", f"{path}?{query}", auth=auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == PAGE_FIELDS
    assert body["object"] == "page"
    assert isinstance(body["has_more"], bool)
    assert body["next_page"] is None or isinstance(body["next_page"], str)
    for bucket in body["data"]:
        assert set(bucket) == BUCKET_FIELDS
        assert bucket["object"] == "bucket"
        assert bucket["end_time"] - bucket["start_time"] == D
        assert bucket["start_time"] % D == 0  # UTC days
        for result in bucket["results"]:
            if path == USAGE:
                assert set(result) == USAGE_RESULT_FIELDS
                assert result["object"] == "organization.usage.completions.result"
                for name in ("input_tokens", "output_tokens", "input_cached_tokens", "num_model_requests"):
                    assert type(result[name]) is int
            else:
                assert set(result) == COST_RESULT_FIELDS
                assert result["object"] == "organization.costs.result"
                assert set(result["amount"]) == {"value", "currency"}
                assert isinstance(result["amount"]["value"], int | float)
                assert result["amount"]["currency"] == "usd"
    return body


async def test_completions_usage_per_day(gw: Gateway) -> None:
    await feed(gw, rec(), rec(model="gpt-4o", user="alice"), rec(day=day(3), cost_nano=None))
    body = await page(gw, USAGE, f"start_time={JAN1}&end_time={JAN1 + 3 * D}")
    assert (body["has_more"], body["next_page"]) == (False, None)
    assert [(b["start_time"], b["end_time"]) for b in body["data"]] == [
        (JAN1, JAN1 + D),
        (JAN1 + D, JAN1 + 2 * D),
        (JAN1 + 2 * D, JAN1 + 3 * D),
    ]
    first, empty, third = (bucket["results"] for bucket in body["data"])
    assert first == [
        {
            "object": "organization.usage.completions.result",
            "input_tokens": 200,
            "output_tokens": 100,
            "input_cached_tokens": 60,
            "input_uncached_tokens": 140,
            "num_model_requests": 2,
            "project_id": None,
            "user_id": None,
            "api_key_id": None,
            "model": None,
            "batch": None,
            "service_tier": None,
        }
    ]
    assert empty == []
    assert third[0]["num_model_requests"] == 1  # usage counts unpriced requests too


async def test_completions_group_by_and_filters(gw: Gateway) -> None:
    await feed(
        gw,
        rec(),
        rec(model="gpt-4o", user="alice", key_id="k2"),
        rec(tenant="beta", model="gpt-4o", user="alice"),
    )
    span = f"start_time={JAN1}&end_time={JAN1 + D}"
    for grouping in (
        "group_by=model&group_by=project_id",
        "group_by[]=model&group_by[]=project_id",
        "group_by=model,project_id",
    ):
        results = (await page(gw, USAGE, f"{span}&{grouping}"))["data"][0]["results"]
        assert [(r["model"], r["project_id"], r["num_model_requests"]) for r in results] == [
            ("gpt-4o", "acme", 1),
            ("gpt-4o", "beta", 1),
            ("gpt-4o-mini", "acme", 1),
        ]
        assert all(r["user_id"] is None and r["api_key_id"] is None for r in results)
    results = (await page(gw, USAGE, f"{span}&group_by=user_id&group_by=api_key_id&group_by=batch"))["data"][0][
        "results"
    ]
    assert [(r["user_id"], r["api_key_id"], r["batch"], r["num_model_requests"]) for r in results] == [
        (None, "k1", False, 1),
        ("alice", "k1", False, 1),
        ("alice", "k2", False, 1),
    ]
    one = await page(gw, USAGE, f"{span}&project_ids=beta")
    assert one["data"][0]["results"][0]["num_model_requests"] == 1
    filtered = await page(gw, USAGE, f"{span}&models=gpt-4o&user_ids=alice&api_key_ids=k1,k2&group_by=project_id")
    assert [(r["project_id"], r["num_model_requests"]) for r in filtered["data"][0]["results"]] == [
        ("acme", 1),
        ("beta", 1),
    ]
    assert (await page(gw, USAGE, f"{span}&batch=true"))["data"][0]["results"] == []
    assert (await page(gw, USAGE, f"{span}&batch=false"))["data"][0]["results"][0]["num_model_requests"] == 3


async def test_pages_follow_next_page(gw: Gateway) -> None:
    await feed(gw, *(rec(day=day(n), prompt_tokens=n) for n in range(1, 11)))
    query = f"start_time={JAN1 + 3600}&end_time={JAN1 + 10 * D}&limit=4"  # rounded down to 00:00 UTC
    seen: list[int] = []
    pages = 0
    while True:
        body = await page(gw, USAGE, query)
        pages += 1
        seen += [bucket["results"][0]["input_tokens"] for bucket in body["data"]]
        if not body["has_more"]:
            assert body["next_page"] is None
            break
        query = f"start_time={JAN1 + 3600}&end_time={JAN1 + 10 * D}&limit=4&page={body['next_page']}"
    assert (pages, seen) == (3, list(range(1, 11)))
    default = await page(gw, USAGE, f"start_time={JAN1}&end_time={JAN1 + 10 * D}")
    assert (len(default["data"]), default["has_more"]) == (7, True)  # OpenAI's default limit


async def test_end_time_defaults_to_now(gw: Gateway) -> None:
    today = datetime.now(UTC).date()
    await feed(gw, rec(day=today))
    midnight = int(datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp())
    body = await page(gw, USAGE, f"start_time={midnight}")
    assert [b["start_time"] for b in body["data"]] == [midnight]
    assert body["data"][0]["results"][0]["num_model_requests"] == 1
    assert midnight <= time.time() < body["data"][0]["end_time"]


async def test_costs_per_day_and_line_item(gw: Gateway) -> None:
    await feed(
        gw,
        rec(cost_nano=1_250_000),
        rec(cost_nano=1),
        rec(model="gpt-4o", cost_nano=2_000_000_000, key_id="k2"),
        rec(model="unpriced", cost_nano=None),
    )
    span = f"start_time={JAN1}&end_time={JAN1 + 2 * D}"
    body = await page(gw, COSTS, span)
    first, second = body["data"]
    assert first["results"] == [
        {
            "object": "organization.costs.result",
            "amount": {"value": 2.001250001, "currency": "usd"},
            "line_item": None,
            "project_id": None,
            "api_key_id": None,
            "quantity": None,
            "quantity_unit": None,
        }
    ]
    assert second["results"] == []
    by_item = (await page(gw, COSTS, f"{span}&group_by=line_item&group_by=project_id"))["data"][0]["results"]
    assert [(r["line_item"], r["project_id"], r["amount"]["value"]) for r in by_item] == [
        ("gpt-4o", "acme", 2.0),
        ("gpt-4o-mini", "acme", 0.001250001),
    ]  # a model without a price has no cost line: never a silent 0
    by_key = (await page(gw, COSTS, f"{span}&group_by=api_key_id&api_key_ids=k2"))["data"][0]["results"]
    assert [(r["api_key_id"], r["amount"]["value"]) for r in by_key] == [("k2", 2.0)]
    assert len((await page(gw, COSTS, f"start_time={JAN1}&end_time={JAN1 + 200 * D}&limit=180"))["data"]) == 180


async def test_a_tenant_admin_sees_its_own_project_only(gw: Gateway) -> None:
    await feed(gw, rec(), rec(tenant="beta"))
    token = mint("acme")
    span = f"start_time={JAN1}&end_time={JAN1 + D}"
    for path in (USAGE, COSTS):
        body = await page(gw, path, f"{span}&group_by=project_id", auth=token)
        assert [r["project_id"] for r in body["data"][0]["results"]] == ["acme"]
        assert (await page(gw, path, f"{span}&project_ids=acme", auth=token))["data"][0]["results"]
        response = await gw.admin("GET", f"{path}?{span}&project_ids=acme&project_ids=beta", auth=token)
        assert response.status_code == 404
        assert error_of(response)["param"] == "project_ids"
    all_projects = await page(gw, USAGE, f"{span}&group_by=project_id")
    assert [r["project_id"] for r in all_projects["data"][0]["results"]] == ["acme", "beta"]


async def test_only_admins(gw: Gateway) -> None:
    for path in (USAGE, COSTS):
        assert (await gw.admin("GET", f"{path}?start_time={JAN1}", auth=None)).status_code == 401
        assert (await gw.admin("GET", f"{path}?start_time={JAN1}", auth=CONFIG_KEY)).status_code == 403


async def test_bad_parameters_are_named(gw: Gateway) -> None:
    span = f"start_time={JAN1}&end_time={JAN1 + D}"
    cases = [
        (USAGE, "end_time=5", "start_time"),
        (USAGE, "start_time=abc", "start_time"),
        (USAGE, "start_time=-1", "start_time"),
        (USAGE, f"start_time={JAN1}&end_time={JAN1}", "end_time"),
        (USAGE, f"{span}&bucket_width=1h", "bucket_width"),
        (USAGE, f"{span}&bucket_width=1m", "bucket_width"),
        (COSTS, f"{span}&bucket_width=1w", "bucket_width"),
        (USAGE, f"{span}&limit=0", "limit"),
        (USAGE, f"{span}&limit=32", "limit"),
        (COSTS, f"{span}&limit=181", "limit"),
        (USAGE, f"{span}&group_by=line_item", "group_by"),
        (COSTS, f"{span}&group_by=model", "group_by"),
        (USAGE, f"{span}&page=nonsense", "page"),
        (USAGE, f"{span}&page=page_MjAyOS0wMS0wMQ==", "page"),  # 2029-01-01: another range
        (USAGE, f"{span}&batch=maybe", "batch"),
    ]
    for path, query, param in cases:
        response = await gw.admin("GET", f"{path}?{query}")
        assert response.status_code == 400, (path, query)
        assert error_of(response)["param"] == param, (path, query)
    assert "per UTC day" in error_of(await gw.admin("GET", f"{USAGE}?{span}&bucket_width=1h"))["message"]
