"""Budget windows, money formatting and the 429 insufficient_quota."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.config.schema import BudgetConfig
from gateway.limits.budget import budget_exceeded, budgets, format_usd, usd_to_nano, windows_at
from gateway.store.limits import BudgetCheck, BudgetResult


@pytest.mark.parametrize(
    ("usd", "nano"),
    [(5, 5_000_000_000), (0.1, 100_000_000), (0.3, 300_000_000), (1e-9, 1), (12.345678912, 12_345_678_912)],
)
def test_dollars_become_exact_nano_dollars(usd: float, nano: int) -> None:
    assert usd_to_nano(usd) == nano


@pytest.mark.parametrize(
    ("nano", "text"),
    [(5_000_000_000, "$5.00"), (100_000_000, "$0.10"), (123_000, "$0.000123"), (1, "$0.000000001"), (0, "$0.00")],
)
def test_money_reads_as_dollars(nano: int, text: str) -> None:
    assert format_usd(nano) == text


def test_windows_are_utc_calendar_days_and_months() -> None:
    day, month = windows_at(datetime(2030, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
    assert (day.label, day.start) == ("2030-12-31", datetime(2030, 12, 31, tzinfo=UTC))
    assert day.end == datetime(2031, 1, 1, tzinfo=UTC)
    assert (month.label, month.end) == ("2030-12", datetime(2031, 1, 1, tzinfo=UTC))
    day, month = windows_at(datetime(2031, 1, 1, tzinfo=UTC))
    assert (day.label, month.label, month.end) == ("2031-01-01", "2031-01", datetime(2031, 2, 1, tzinfo=UTC))
    tokyo = timezone(timedelta(hours=9))
    day, month = windows_at(datetime(2030, 3, 1, 8, 0, tzinfo=tokyo))  # still Feb 28 in UTC
    assert (day.label, month.label) == ("2030-02-28", "2030-02")
    assert windows_at(datetime(2032, 2, 29, 12, tzinfo=UTC))[1].end == datetime(2032, 3, 1, tzinfo=UTC)


def test_a_scope_has_a_check_per_configured_window() -> None:
    moment = datetime(2030, 1, 31, 12, tzinfo=UTC)
    config = BudgetConfig(usd_per_day=5, usd_per_month=100, alert_at=0.8)
    day, month = budgets("tenant acme", "tenant:acme", config, moment, 12_345, grace_s=3600)
    end_and_grace = datetime(2030, 2, 1, 1, tzinfo=UTC).timestamp()
    key = "budget:tenant:acme:day:2030-01-31"
    assert day.check == BudgetCheck(key, 5_000_000_000, 12_345, end_and_grace, 4_000_000_000)
    assert month.check.key == "budget:tenant:acme:month:2030-01"
    assert month.check.expires_at == datetime(2030, 2, 1, 1, tzinfo=UTC).timestamp()
    only_month = budgets("t", "tenant:t", BudgetConfig(usd_per_month=1, alert_at=1), moment, 0, grace_s=0)
    assert [(b.window.period, b.check.alert_at) for b in only_month] == [("month", 1_000_000_000)]


def test_a_spent_budget_is_a_429_insufficient_quota_that_says_so() -> None:
    moment = datetime(2030, 1, 31, 12, tzinfo=UTC)
    (day,) = budgets("tenant acme", "tenant:acme", BudgetConfig(usd_per_day=5), moment, 10**8, grace_s=0)
    error = budget_exceeded([(day, BudgetResult(False, 5_000_000_000, 0))], {"x-ratelimit-limit-requests": "5"})
    assert error is not None
    assert (error.status, error.code, error.type) == (429, "insufficient_quota", "insufficient_quota")
    assert error.message == "tenant acme's daily budget of $5.00 is spent ($5.00); it resets at 2030-02-01T00:00:00Z."
    assert error.response_headers() == {"x-ratelimit-limit-requests": "5", "x-should-retry": "false"}


def test_a_budget_held_by_requests_in_flight_says_what_is_left() -> None:
    moment = datetime(2030, 1, 31, 12, tzinfo=UTC)
    (month,) = budgets("API key k1", "key:acme/k1", BudgetConfig(usd_per_month=1), moment, 300_000_000, grace_s=0)
    error = budget_exceeded([(month, BudgetResult(False, 500_000_000, 250_000_000))], {})
    assert error is not None
    assert error.message == (
        "API key k1's monthly budget of $1.00 cannot cover this request's worst-case cost of $0.30: $0.25 is left, "
        "with $0.25 held by requests in flight. Lower max_tokens, wait for those requests, or wait until "
        "2030-02-01T00:00:00Z."
    )
    error = budget_exceeded([(month, BudgetResult(False, 800_000_000, 0))], {})
    assert error is not None
    assert error.message.endswith("$0.20 is left. Lower max_tokens, or wait until 2030-02-01T00:00:00Z.")
    assert budget_exceeded([(month, BudgetResult(True, 0, 0))], {}) is None
