"""Rate limits and budgets on top of the store's atomic `admit` and `settle` (see limiter.py)."""

from gateway.limits.budget import BudgetAlert, Window, format_usd, usd_to_nano, windows_at
from gateway.limits.limiter import Grant, Limiter, Scope, scopes_of
from gateway.limits.ratelimit import format_reset, ratelimit_headers, retry_after_headers

__all__ = [
    "BudgetAlert",
    "Grant",
    "Limiter",
    "Scope",
    "Window",
    "format_reset",
    "format_usd",
    "ratelimit_headers",
    "retry_after_headers",
    "scopes_of",
    "usd_to_nano",
    "windows_at",
]
