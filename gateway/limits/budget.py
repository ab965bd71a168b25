"""Budgets: UTC day and month windows per scope, their 429 `insufficient_quota`, and the alert of `alert_at`.

Each scope with a `budget` has a window per configured period: `budget:{scope}:{id}:day:YYYY-MM-DD`
and `budget:{scope}:{id}:month:YYYY-MM`, each holding the request's worst-case cost until it is
settled at the real cost. Money is integer nano-USD; configured dollars are converted exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal

from gateway.config.schema import BudgetConfig
from gateway.errors import BudgetExceeded
from gateway.store.limits import BudgetCheck, BudgetResult

NANO_PER_USD = 10**9


def usd_to_nano(usd: float | Decimal) -> int:
    """Dollars as nano-USD, rounded down (a limit never grows), from the decimal text of a float."""
    return int((Decimal(str(usd)) * NANO_PER_USD).to_integral_value(ROUND_FLOOR))


def format_usd(nano: int) -> str:
    """`$5.00`, `$0.10`, `$0.000123`: cents always, more digits only when there are any."""
    dollars = Decimal(nano) / NANO_PER_USD
    text = f"{dollars:.9f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


@dataclass(frozen=True, slots=True)
class Window:
    period: str  # "day" or "month"
    label: str  # "2030-01-31" or "2030-01"
    start: datetime
    end: datetime

    @property
    def adjective(self) -> str:
        return "daily" if self.period == "day" else "monthly"


def windows_at(moment: datetime) -> tuple[Window, Window]:
    """The UTC calendar day and month that `moment` falls in."""
    moment = moment.astimezone(UTC)
    day = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    month = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    next_month = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
    return (
        Window("day", day.date().isoformat(), day, day + timedelta(days=1)),
        Window("month", f"{month.year:04d}-{month.month:02d}", month, next_month),
    )


@dataclass(frozen=True, slots=True)
class Budget:
    """One window of one scope's budget, and its check."""

    who: str  # "tenant acme", "API key 0123abcd"
    window: Window
    config: BudgetConfig
    check: BudgetCheck


def budgets(
    who: str, scope_key: str, config: BudgetConfig, moment: datetime, amount: int, grace_s: float
) -> list[Budget]:
    """The windows `config` limits at `moment`, each holding `amount` nano-USD, kept `grace_s` past their end."""
    found = []
    for window, usd in zip(windows_at(moment), (config.usd_per_day, config.usd_per_month), strict=True):
        if usd is None:
            continue
        limit = max(1, usd_to_nano(usd))
        alert_at = math.ceil(Decimal(limit) * Decimal(str(config.alert_at)))
        key = f"budget:{scope_key}:{window.period}:{window.label}"
        check = BudgetCheck(key, limit, amount, window.end.timestamp() + grace_s, alert_at)
        found.append(Budget(who, window, config, check))
    return found


def with_amount(budget: Budget, amount: int) -> Budget:
    """The same window holding `amount` nano-USD (a request's worst case) instead."""
    check = budget.check
    return Budget(
        budget.who,
        budget.window,
        budget.config,
        BudgetCheck(check.key, check.limit, amount, check.expires_at, check.alert_at),
    )


def budget_exceeded(outcomes: Sequence[tuple[Budget, BudgetResult]], headers: dict[str, str]) -> BudgetExceeded | None:
    """The 429 `insufficient_quota` for the first refused window, or None if none refused."""
    for budget, result in outcomes:
        if result.allowed:
            continue
        check, window = budget.check, budget.window
        resets = window.end.isoformat().replace("+00:00", "Z")
        what = f"{budget.who}'s {window.adjective} budget of {format_usd(check.limit)}"
        if result.spent >= check.limit:
            message = f"{what} is spent ({format_usd(result.spent)}); it resets at {resets}."
        else:
            left = max(0, check.limit - result.spent - result.held)
            held = f", with {format_usd(result.held)} held by requests in flight" if result.held else ""
            wait = ", wait for those requests," if result.held else ","
            message = (
                f"{what} cannot cover this request's worst-case cost of {format_usd(check.amount)}: "
                f"{format_usd(left)} is left{held}. Lower max_tokens{wait} or wait until {resets}."
            )
        return BudgetExceeded(message, headers=headers)
    return None


@dataclass(frozen=True, slots=True)
class BudgetAlert:
    """A window's spend reached its `alert_at` for the first time: log it, count it, call the webhook."""

    who: str
    window: Window
    limit_nano: int
    spent_nano: int
    alert_at: float  # the configured fraction
    webhook_url: str | None

    @property
    def message(self) -> str:
        share = self.spent_nano / self.limit_nano
        return (
            f"{self.who} has spent {format_usd(self.spent_nano)} of its {self.window.adjective} budget of "
            f"{format_usd(self.limit_nano)} ({share:.0%}, alert at {self.alert_at:.0%}) in {self.window.label}"
        )
