"""OpenAI's usage and costs API over the spend ledger, so FinOps tools pointed at OpenAI work unchanged.

`GET /v1/organization/usage/completions` and `GET /v1/organization/costs` take OpenAI's query
parameters and answer OpenAI's `page` of daily `bucket`s. An admin key plays OpenAI's admin key;
a tenant admin reads its own tenant. OpenAI's `project_id` is the tenant, `api_key_id` the key id,
`user_id` the end user, and a cost's `line_item` the model.

Where the gateway differs, and why:
- `bucket_width` is `1d` only (anything else is a 400): the ledger counts per UTC day.
- Buckets are UTC days: `start_time` is rounded down to 00:00 UTC, and the last bucket is the day of
  `end_time - 1` (`end_time` is exclusive and defaults to now). Each day of a page has a bucket,
  with empty `results` when nothing was used.
- Completions usage covers every model in the ledger, embeddings included (input tokens only).
  Nothing is a batch job: `batch=true` finds nothing, and `group_by=batch` gives `false`;
  `service_tier` is null. Token fields per modality are left out: the ledger does not split them.
- Costs are those of priced requests only; requests without a price are left out (GET /admin/usage
  counts them). `amount.value` is a number rounded to 9 decimals (nano-dollars), and `line_item` is
  the model, not split into input and output; `quantity` is null.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin.auth import AdminAuthenticator
from gateway.cost.ledger import Ledger, LedgerRow, Totals, aggregate
from gateway.errors import InvalidRequest

USAGE_GROUPS: dict[str, str | None] = {
    "project_id": "tenant",
    "user_id": "user",
    "api_key_id": "key_id",
    "model": "model",
    "batch": None,
    "service_tier": None,
}
COST_GROUPS: dict[str, str | None] = {"project_id": "tenant", "line_item": "model", "api_key_id": "key_id"}
_MAX_TIME = 253402300800  # 10000-01-01T00:00:00Z
_PAGE = "page_"


def _list(request: Request, name: str) -> list[str]:
    """`name=a&name=b`, `name[]=a` and `name=a,b` all give ["a", "b"]."""
    values = [*request.query_params.getlist(name), *request.query_params.getlist(f"{name}[]")]
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _int(request: Request, name: str, default: int | None = None) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        if default is None:
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name)
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidRequest(f"Invalid '{name}': expected an integer, got {text!r}.", param=name) from None


def _day(unix_s: int) -> date:
    return datetime.fromtimestamp(unix_s, UTC).date()


def _unix(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def _cursor(day: date) -> str:
    return _PAGE + base64.urlsafe_b64encode(day.isoformat().encode()).decode()


def _days(request: Request, now: float, max_limit: int) -> tuple[list[date], str | None]:
    """The days of the requested page, and the cursor of the next one."""
    width = request.query_params.get("bucket_width") or "1d"
    if width != "1d":
        raise InvalidRequest(
            f"Invalid 'bucket_width': {width!r}. The gateway's ledger counts per UTC day: use 1d.",
            param="bucket_width",
        )
    start = _int(request, "start_time")
    end = _int(request, "end_time", int(now) + 1)
    if not 0 <= start < _MAX_TIME:
        raise InvalidRequest("Invalid 'start_time': expected Unix seconds.", param="start_time")
    if not start < end <= _MAX_TIME:
        raise InvalidRequest("'end_time' must be after 'start_time' (Unix seconds, exclusive).", param="end_time")
    limit = _int(request, "limit", 7)
    if not 1 <= limit <= max_limit:
        raise InvalidRequest(f"Invalid 'limit': {limit}; it must be between 1 and {max_limit}.", param="limit")
    first, last = _day(start), _day(end - 1)
    page = request.query_params.get("page")
    if page:
        try:
            first = date.fromisoformat(base64.urlsafe_b64decode(page.removeprefix(_PAGE)).decode())
        except (ValueError, binascii.Error):
            raise InvalidRequest("Invalid 'page': use the next_page of a previous answer.", param="page") from None
        if not _day(start) <= first <= last:
            raise InvalidRequest("Invalid 'page': it belongs to another time range.", param="page")
    count = min(limit, (last - first).days + 1)
    days = [first + timedelta(days=n) for n in range(count)]
    return days, (_cursor(days[-1] + timedelta(days=1)) if days[-1] < last else None)


def _group_by(request: Request, groups: dict[str, str | None]) -> list[str]:
    names = list(dict.fromkeys(_list(request, "group_by")))
    for name in names:
        if name not in groups:
            choices = ", ".join(groups)
            raise InvalidRequest(f"Invalid 'group_by': {name!r}; use any of {choices}.", param="group_by")
    return names


def _value(name: str, field: str | None, found: dict[str, str | date | None]) -> str | bool | None:
    """A result's value for the OpenAI group `name`: the ledger's `field`, or what the gateway knows."""
    if field is not None:
        value = found[field]
        return value.isoformat() if isinstance(value, date) else value
    return False if name == "batch" else None  # nothing is a batch job; there is no service tier


def _keep(row: LedgerRow, filters: dict[str, set[str]]) -> bool:
    return all(getattr(row, field) in allowed for field, allowed in filters.items())


class OpenAIUsageAPI:
    def __init__(self, auth: AdminAuthenticator, ledger: Ledger, clock: Callable[[], float] = time.time) -> None:
        self._auth = auth
        self._ledger = ledger
        self._clock = clock

    def routes(self) -> list[Route]:
        return [
            Route("/v1/organization/usage/completions", self.completions, methods=["GET"]),
            Route("/v1/organization/costs", self.costs, methods=["GET"]),
        ]

    async def _buckets(
        self, request: Request, groups: dict[str, str | None], max_limit: int, filters: dict[str, str]
    ) -> tuple[list[tuple[date, list[tuple[dict[str, Any], Totals]]]], str | None]:
        scope = await self._auth.authenticate(request.headers.get("authorization"))
        tenants = scope.tenants(_list(request, "project_ids"), "project_ids")
        days, next_page = _days(request, self._clock(), max_limit)
        names = _group_by(request, groups)
        wanted = {field: set(values) for param, field in filters.items() if (values := _list(request, param))}
        batch = request.query_params.get("batch")
        if batch not in (None, "", "true", "false"):
            raise InvalidRequest(f"Invalid 'batch': expected true or false, got {batch!r}.", param="batch")
        rows = [] if batch == "true" else await self._ledger.read(tenants, days[0], days[-1])
        by = ["day", *(field for name in names if (field := groups[name]) is not None)]
        per_day: dict[date, list[tuple[dict[str, Any], Totals]]] = {day: [] for day in days}
        for key, totals in aggregate((row for row in rows if _keep(row, wanted)), by):
            found = dict(zip(by, key, strict=True))
            fields = {name: _value(name, groups[name], found) for name in names}
            day = key[0]
            assert isinstance(day, date)
            per_day[day].append((fields, totals))
        return list(per_day.items()), next_page

    @staticmethod
    def _page(buckets: list[dict[str, Any]], next_page: str | None) -> Response:
        has_more = next_page is not None
        return JSONResponse({"object": "page", "data": buckets, "has_more": has_more, "next_page": next_page})

    @staticmethod
    def _bucket(day: date, results: list[dict[str, Any]]) -> dict[str, Any]:
        start = _unix(day)
        return {"object": "bucket", "start_time": start, "end_time": start + 86400, "results": results}

    async def completions(self, request: Request) -> Response:
        filters = {"api_key_ids": "key_id", "user_ids": "user", "models": "model"}
        days, next_page = await self._buckets(request, USAGE_GROUPS, 31, filters)
        empty = dict.fromkeys(USAGE_GROUPS)
        buckets = [
            self._bucket(
                day,
                [
                    {
                        "object": "organization.usage.completions.result",
                        "input_tokens": t.prompt_tokens,
                        "output_tokens": t.completion_tokens,
                        "input_cached_tokens": t.cached_tokens,
                        "input_uncached_tokens": t.prompt_tokens - t.cached_tokens,
                        "num_model_requests": t.requests,
                        **empty,
                        **fields,
                    }
                    for fields, t in results
                ],
            )
            for day, results in days
        ]
        return self._page(buckets, next_page)

    async def costs(self, request: Request) -> Response:
        days, next_page = await self._buckets(request, COST_GROUPS, 180, {"api_key_ids": "key_id"})
        empty = dict.fromkeys(COST_GROUPS)
        buckets = [
            self._bucket(
                day,
                [
                    {
                        "object": "organization.costs.result",
                        "amount": {"value": round(t.cost_nano / 10**9, 9), "currency": "usd"},
                        **empty,
                        **fields,
                        "quantity": None,
                        "quantity_unit": None,
                    }
                    for fields, t in results
                    if t.priced_requests
                ],
            )
            for day, results in days
        ]
        return self._page(buckets, next_page)
