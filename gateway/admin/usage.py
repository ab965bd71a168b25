"""GET /admin/usage: the spend ledger summed by day, tenant, model, key or user, as JSON or CSV.

`from` and `to` are UTC days (YYYY-MM-DD), both included; `to` defaults to today and `from` to the
first day of `to`'s month; at most 366 days. `group_by` is one or more of day, tenant, model, key,
user, comma-separated (default `day`). A tenant admin reads its own tenant (`tenant` absent or its
own; another is a 404); a gateway admin reads one tenant, or every tenant without `tenant`.

`cost_usd` is a string with exactly 9 decimals (nano-dollars: exact, the same text in JSON and CSV),
the cost of the priced requests; it is null when none of the row's requests had a price.
`unpriced_requests` says how many requests the cost leaves out.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin.auth import AdminAuthenticator
from gateway.admin.openai_usage import OpenAIUsageAPI
from gateway.cost.ledger import GroupKey, Ledger, Totals, aggregate, usd_text
from gateway.errors import InvalidRequest

MAX_DAYS = 366
GROUPS = {"day": "day", "tenant": "tenant", "model": "model", "key": "key_id", "user": "user"}
COLUMNS = (
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced_requests",
    "estimated_requests",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def usage_routes(auth: AdminAuthenticator, ledger: Ledger, clock: Callable[[], float] = time.time) -> list[Route]:
    """GET /admin/usage, and OpenAI's /v1/organization/usage/completions and /v1/organization/costs."""
    return [*UsageAPI(auth, ledger, clock).routes(), *OpenAIUsageAPI(auth, ledger, clock).routes()]


def _day(request: Request, name: str) -> date | None:
    text = request.query_params.get(name)
    if not text:
        return None
    try:
        if len(text) != 10:
            raise ValueError("not YYYY-MM-DD")
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"Invalid '{name}': expected a UTC day as YYYY-MM-DD, got {text!r}.", param=name) from None


def _group_by(request: Request) -> list[str]:
    names = [name.strip() for name in request.query_params.get("group_by", "day").split(",") if name.strip()]
    for name in names:
        if name not in GROUPS:
            choices = ", ".join(GROUPS)
            raise InvalidRequest(f"Invalid 'group_by': {name!r}; use one or more of {choices}.", param="group_by")
    return [GROUPS[name] for name in dict.fromkeys(names or ["day"])]


def _row(by: list[str], key: GroupKey, totals: Totals) -> dict[str, Any]:
    row: dict[str, Any] = {
        name: value.isoformat() if isinstance(value, date) else value for name, value in zip(by, key, strict=True)
    }
    row.update(
        requests=totals.requests,
        prompt_tokens=totals.prompt_tokens,
        cached_tokens=totals.cached_tokens,
        completion_tokens=totals.completion_tokens,
        reasoning_tokens=totals.reasoning_tokens,
        cost_usd=usd_text(totals.cost_nano) if totals.priced_requests else None,
        unpriced_requests=totals.unpriced_requests,
        estimated_requests=totals.estimated_requests,
    )
    return row


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value  # a user or model name must not run as a spreadsheet formula
    return value


def _csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    writer.writerows([_cell(row[name]) for name in columns] for row in rows)
    return out.getvalue()


class UsageAPI:
    def __init__(self, auth: AdminAuthenticator, ledger: Ledger, clock: Callable[[], float] = time.time) -> None:
        self._auth = auth
        self._ledger = ledger
        self._clock = clock

    def routes(self) -> list[Route]:
        return [Route("/admin/usage", self.usage, methods=["GET"])]

    async def usage(self, request: Request) -> Response:
        scope = await self._auth.authenticate(request.headers.get("authorization"))
        tenant = request.query_params.get("tenant")
        tenants = scope.tenants([tenant] if tenant else [], "tenant")
        by = _group_by(request)
        last = _day(request, "to") or datetime.fromtimestamp(self._clock(), UTC).date()
        first = _day(request, "from") or last.replace(day=1)
        if first > last:
            raise InvalidRequest("'from' is after 'to'.", param="from")
        if last - first >= timedelta(days=MAX_DAYS):
            raise InvalidRequest(f"Ask for at most {MAX_DAYS} days at a time.", param="from")
        rows = [_row(by, key, totals) for key, totals in aggregate(await self._ledger.read(tenants, first, last), by)]
        if "text/csv" in request.headers.get("accept", ""):
            filename = f"usage-{first.isoformat()}-{last.isoformat()}.csv"
            return Response(
                _csv([*by, *COLUMNS], rows),
                media_type="text/csv; charset=utf-8",
                headers={"content-disposition": f'attachment; filename="{filename}"'},
            )
        return JSONResponse({"object": "list", "data": rows})
