"""GET /admin/usage: the ledger fed directly, read through the ASGI app: grouping, ranges, CSV, scoping."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from typing import Any

from gateway.cost.ledger import UsageRecord

from .conftest import ADMIN_KEY, CONFIG_KEY, Gateway, error_of, mint

DAY, NEXT_DAY, LATER = date(2030, 1, 1), date(2030, 1, 2), date(2030, 1, 5)
METRICS = {
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced_requests",
    "estimated_requests",
}


def rec(**fields: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "tenant": "acme",
        "key_id": "k1",
        "user": None,
        "model": "gpt-4o-mini",
        "day": DAY,
        "prompt_tokens": 100,
        "cached_tokens": 20,
        "completion_tokens": 50,
        "reasoning_tokens": 10,
        "cost_nano": 1_500,
        "estimated": False,
    }
    return UsageRecord(**{**base, **fields})


async def feed(gw: Gateway, *records: UsageRecord) -> None:
    for record in records:
        gw.services.ledger.record(record)
    await gw.services.ledger.flush()


async def usage(gw: Gateway, query: str, auth: str = ADMIN_KEY, status: int = 200) -> list[dict[str, Any]]:
    response = await gw.admin("GET", f"/admin/usage?{query}", auth=auth)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"object", "data"}
    assert body["object"] == "list"
    return list(body["data"])


async def test_rows_by_day_with_every_metric(gw: Gateway) -> None:
    await feed(
        gw,
        rec(),
        rec(user="alice", cost_nano=None, estimated=True),
        rec(day=NEXT_DAY, model="gpt-4o", cost_nano=2_000_000_001),
        rec(day=LATER),
    )
    rows = await usage(gw, "tenant=acme&from=2030-01-01&to=2030-01-02")
    assert rows == [
        {
            "day": "2030-01-01",
            "requests": 2,
            "prompt_tokens": 200,
            "cached_tokens": 40,
            "completion_tokens": 100,
            "reasoning_tokens": 20,
            "cost_usd": "0.000001500",
            "unpriced_requests": 1,
            "estimated_requests": 1,
        },
        {
            "day": "2030-01-02",
            "requests": 1,
            "prompt_tokens": 100,
            "cached_tokens": 20,
            "completion_tokens": 50,
            "reasoning_tokens": 10,
            "cost_usd": "2.000000001",
            "unpriced_requests": 0,
            "estimated_requests": 0,
        },
    ]
    assert [row["day"] for row in await usage(gw, "tenant=acme&from=2030-01-02&to=2030-01-05")] == [
        "2030-01-02",
        "2030-01-05",
    ]
    assert await usage(gw, "tenant=acme&from=2030-01-03&to=2030-01-04") == []


async def test_group_by_model_key_user_and_several(gw: Gateway) -> None:
    await feed(
        gw,
        rec(model="gpt-4o", key_id="k2", user="bob"),
        rec(model="gpt-4o-mini", user="alice"),
        rec(model="gpt-4o-mini", day=NEXT_DAY),
    )
    span = "tenant=acme&from=2030-01-01&to=2030-01-02"
    by_model = await usage(gw, f"{span}&group_by=model")
    assert [(row["model"], row["requests"]) for row in by_model] == [("gpt-4o", 1), ("gpt-4o-mini", 2)]
    assert set(by_model[0]) == {"model"} | METRICS
    by_key = await usage(gw, f"{span}&group_by=key")
    assert [(row["key_id"], row["requests"]) for row in by_key] == [("k1", 2), ("k2", 1)]
    by_user = await usage(gw, f"{span}&group_by=user")
    assert [(row["user"], row["requests"]) for row in by_user] == [(None, 1), ("alice", 1), ("bob", 1)]
    both = await usage(gw, f"{span}&group_by=day,model")
    assert [(row["day"], row["model"], row["requests"]) for row in both] == [
        ("2030-01-01", "gpt-4o", 1),
        ("2030-01-01", "gpt-4o-mini", 1),
        ("2030-01-02", "gpt-4o-mini", 1),
    ]


async def test_cost_is_null_only_when_nothing_was_priced(gw: Gateway) -> None:
    await feed(gw, rec(model="a", cost_nano=None), rec(model="b", cost_nano=None), rec(model="b", cost_nano=7))
    rows = await usage(gw, "from=2030-01-01&to=2030-01-01&group_by=model")
    assert [(r["model"], r["cost_usd"], r["unpriced_requests"]) for r in rows] == [
        ("a", None, 1),
        ("b", "0.000000007", 1),
    ]


async def test_default_range_is_this_month_to_today(gw: Gateway) -> None:
    today = datetime.now(UTC).date()
    await feed(gw, rec(day=today), rec(day=today.replace(day=1) - timedelta(days=1)))
    assert [row["day"] for row in await usage(gw, "")] == [today.isoformat()]


async def test_a_gateway_admin_reads_every_tenant_or_one(gw: Gateway) -> None:
    await feed(gw, rec(), rec(tenant="beta"), rec(tenant="beta", day=NEXT_DAY))
    span = "from=2030-01-01&to=2030-01-02"
    assert [(r["day"], r["requests"]) for r in await usage(gw, span)] == [("2030-01-01", 2), ("2030-01-02", 1)]
    by_tenant = await usage(gw, f"{span}&group_by=tenant")
    assert [(r["tenant"], r["requests"]) for r in by_tenant] == [("acme", 1), ("beta", 2)]
    assert [r["requests"] for r in await usage(gw, f"{span}&tenant=beta")] == [1, 1]
    assert await usage(gw, f"{span}&tenant=nobody") == []


async def test_a_tenant_admin_reads_only_its_own_tenant(gw: Gateway) -> None:
    await feed(gw, rec(), rec(tenant="beta"))
    token = mint("acme")
    span = "from=2030-01-01&to=2030-01-01&group_by=tenant"
    assert [(r["tenant"], r["requests"]) for r in await usage(gw, span, auth=token)] == [("acme", 1)]
    assert [r["requests"] for r in await usage(gw, f"{span}&tenant=acme", auth=token)] == [1]
    response = await gw.admin("GET", f"/admin/usage?{span}&tenant=beta", auth=token)
    assert response.status_code == 404
    assert error_of(response)["param"] == "tenant"
    assert error_of(response)["code"] == "tenant_not_found"
    other = await gw.admin("GET", f"/admin/usage?{span}&tenant=does-not-exist", auth=token)
    assert other.status_code == 404
    assert error_of(other)["message"].replace("does-not-exist", "beta") == error_of(response)["message"]


async def test_only_admins_may_read_usage(gw: Gateway) -> None:
    assert (await gw.admin("GET", "/admin/usage", auth=None)).status_code == 401
    assert (await gw.admin("GET", "/admin/usage", auth=CONFIG_KEY)).status_code == 403
    assert (await gw.admin("GET", "/admin/usage", auth=mint("acme", roles=()))).status_code == 403


async def test_bad_parameters_are_named(gw: Gateway) -> None:
    cases = {
        "from=2030-13-01": "from",
        "from=yesterday": "from",
        "to=2030-1-1": "to",
        "from=2030-01-02&to=2030-01-01": "from",
        "from=2028-12-31&to=2030-01-01": "from",  # 367 days: 366 is the most
        "group_by=week": "group_by",
        "group_by=day,colour": "group_by",
    }
    for query, param in cases.items():
        response = await gw.admin("GET", f"/admin/usage?{query}")
        assert response.status_code == 400, query
        error = error_of(response)
        assert (error["param"], error["type"]) == (param, "invalid_request_error"), query
    assert (await gw.admin("GET", "/admin/usage?from=2029-01-01&to=2030-01-01")).status_code == 200


async def test_csv_has_the_same_columns_and_rows(gw: Gateway) -> None:
    await feed(gw, rec(), rec(model="=HYPERLINK(1)", cost_nano=None), rec(user='bob,"x"', model="m"))
    query = "/admin/usage?tenant=acme&from=2030-01-01&to=2030-01-01&group_by=model,user"
    response = await gw.client.get(query, headers={"authorization": f"Bearer {ADMIN_KEY}", "accept": "text/csv"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert "usage-2030-01-01-2030-01-01.csv" in response.headers["content-disposition"]
    table = list(csv.reader(io.StringIO(response.text)))
    assert response.text.endswith("\r\n")
    as_json = await usage(gw, query.removeprefix("/admin/usage?"))
    assert table[0] == ["model", "user", *list(as_json[0])[2:]]
    assert table[0][2:] == [
        "requests",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "cost_usd",
        "unpriced_requests",
        "estimated_requests",
    ]
    assert len(table) == 1 + len(as_json) == 4
    assert table[1] == ["'=HYPERLINK(1)", "", "1", "100", "20", "50", "10", "", "1", "0"]  # no formula, null empty
    assert table[2][:2] == ["gpt-4o-mini", ""]
    assert table[3][:2] == ["m", 'bob,"x"']
    assert [row[7] for row in table[1:]] == [str(row["cost_usd"] or "") for row in as_json]
