"""Rate limits: the GCRA checks of a scope, OpenAI's `x-ratelimit-*` headers and the 429 with `Retry-After`.

Each scope (the tenant, for its policy's `rate_limit`; the key, for its own) has a bucket per
dimension, `rl:{scope}:{id}:req` and `rl:{scope}:{id}:tok`, holding `requests_per_minute` or
`tokens_per_minute` at once and refilling at that rate. A request takes 1 request and its estimated
tokens; settlement charges the difference to the real token count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.errors import RateLimited
from gateway.store.limits import RateCheck, RateResult

PERIOD_S = 60.0
REQUESTS, TOKENS = "requests", "tokens"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One bucket of one scope: what it is called in messages and headers, and its check."""

    who: str  # "tenant acme", "API key 0123abcd"
    dimension: str  # REQUESTS or TOKENS
    check: RateCheck


def rate_limits(
    who: str, scope_key: str, requests_per_minute: int | None, tokens_per_minute: int | None, tokens: int
) -> list[RateLimit]:
    """The buckets of one scope (`scope_key` like "tenant:acme"), for a request of `tokens` estimated tokens."""
    limits = []
    if requests_per_minute is not None:
        check = RateCheck(f"rl:{scope_key}:req", requests_per_minute, 1, PERIOD_S)
        limits.append(RateLimit(who, REQUESTS, check))
    if tokens_per_minute is not None:
        check = RateCheck(f"rl:{scope_key}:tok", tokens_per_minute, max(0, tokens), PERIOD_S)
        limits.append(RateLimit(who, TOKENS, check))
    return limits


def format_reset(ms: int) -> str:
    """A duration as OpenAI writes `x-ratelimit-reset-*` (Go's format): `20ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    return f"{minutes}m{seconds}" if minutes else seconds


def ratelimit_headers(outcomes: Sequence[tuple[RateLimit, RateResult]]) -> dict[str, str]:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` of the binding bucket of each dimension.

    With a tenant and a key limit, the binding one is the one with fewer units left (on a tie, the one
    that takes longer to reset): the stricter of the two at this moment. A dimension no scope limits
    gets no headers.
    """
    headers: dict[str, str] = {}
    for dimension in (REQUESTS, TOKENS):
        found = [
            (result.remaining, -result.reset_ms, limit.check.limit, result)
            for limit, result in outcomes
            if limit.dimension == dimension
        ]
        if found:
            remaining, _, most, result = min(found, key=lambda item: (item[0], item[1]))
            headers[f"x-ratelimit-limit-{dimension}"] = str(most)
            headers[f"x-ratelimit-remaining-{dimension}"] = str(remaining)
            headers[f"x-ratelimit-reset-{dimension}"] = format_reset(result.reset_ms)
    return headers


def retry_after_headers(retry_after_ms: int) -> dict[str, str]:
    """`Retry-After` in whole seconds (rounded up) and the `retry-after-ms` the openai SDKs prefer."""
    return {"retry-after": str(max(1, math.ceil(retry_after_ms / 1000))), "retry-after-ms": str(retry_after_ms)}


def rate_limited(outcomes: Sequence[tuple[RateLimit, RateResult]], headers: dict[str, str]) -> RateLimited | None:
    """The 429 for the refused buckets among `outcomes`, or None if none refused."""
    refused = [(limit, result) for limit, result in outcomes if not result.allowed]
    if not refused:
        return None
    never = [(limit, result) for limit, result in refused if result.retry_after_ms is None]
    if never:
        limit = never[0][0]
        what = "tokens" if limit.dimension == TOKENS else "requests"
        return RateLimited(
            f"Request too large for {what} per minute ({limit.who}): Limit {limit.check.limit}, "
            f"Requested {limit.check.cost}. Send fewer {what} in one request.",
            headers=headers,
            should_retry=False,
        )
    wait = max(result.retry_after_ms or 0 for _, result in refused)
    limit, result = next((limit, result) for limit, result in refused if result.retry_after_ms == wait)
    per = "tokens per minute (TPM)" if limit.dimension == TOKENS else "requests per minute (RPM)"
    used = limit.check.limit - result.remaining
    return RateLimited(
        f"Rate limit reached for {per} ({limit.who}): Limit {limit.check.limit}, Used {used}, "
        f"Requested {limit.check.cost}. Please try again in {format_reset(wait)}.",
        headers={**headers, **retry_after_headers(wait)},
    )
