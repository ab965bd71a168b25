"""Rate-limit headers and errors, as OpenAI shapes them."""

from __future__ import annotations

import pytest

from gateway.limits.ratelimit import (
    REQUESTS,
    TOKENS,
    RateLimit,
    format_reset,
    rate_limited,
    rate_limits,
    ratelimit_headers,
    retry_after_headers,
)
from gateway.store.limits import RateCheck, RateResult


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (1, "1ms"),
        (20, "20ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (1020, "1.02s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (90_500, "1m30.5s"),
        (360_000, "6m0s"),
        (3_600_000, "1h0m0s"),
        (3_723_400, "1h2m3.4s"),
    ],
)
def test_reset_durations_read_like_openais(ms: int, text: str) -> None:
    assert format_reset(ms) == text


def test_a_scope_has_a_bucket_per_limited_dimension() -> None:
    limits = rate_limits("tenant acme", "tenant:acme", 60, 10_000, tokens=250)
    assert [(limit.dimension, limit.check) for limit in limits] == [
        (REQUESTS, RateCheck("rl:tenant:acme:req", 60, 1, 60.0)),
        (TOKENS, RateCheck("rl:tenant:acme:tok", 10_000, 250, 60.0)),
    ]
    assert rate_limits("t", "tenant:t", None, 5, tokens=-3)[0].check.cost == 0
    assert rate_limits("t", "tenant:t", None, None, tokens=1) == []


def outcome(who: str, dimension: str, limit: int, result: RateResult, cost: int = 1) -> tuple[RateLimit, RateResult]:
    return RateLimit(who, dimension, RateCheck(f"rl:{who}:{dimension}", limit, cost)), result


def test_headers_show_the_binding_bucket_of_each_dimension() -> None:
    outcomes = [
        outcome("tenant", REQUESTS, 100, RateResult(True, 99, 600, None)),
        outcome("key", REQUESTS, 10, RateResult(True, 9, 6000, None)),  # fewer left: binding
        outcome("tenant", TOKENS, 40_000, RateResult(True, 39_000, 1500, None), cost=1000),
    ]
    assert ratelimit_headers(outcomes) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "40000",
        "x-ratelimit-remaining-tokens": "39000",
        "x-ratelimit-reset-tokens": "1.5s",
    }
    tie = [
        outcome("a", REQUESTS, 5, RateResult(True, 0, 100, None)),
        outcome("b", REQUESTS, 7, RateResult(True, 0, 900, None)),
    ]
    assert ratelimit_headers(tie)["x-ratelimit-reset-requests"] == "900ms"  # the later reset
    assert ratelimit_headers([]) == {}


def test_retry_after_is_whole_seconds_rounded_up_and_exact_in_ms() -> None:
    assert retry_after_headers(20) == {"retry-after": "1", "retry-after-ms": "20"}
    assert retry_after_headers(30_000) == {"retry-after": "30", "retry-after-ms": "30000"}
    assert retry_after_headers(30_001) == {"retry-after": "31", "retry-after-ms": "30001"}


def test_a_refusal_is_a_429_that_says_when_to_retry() -> None:
    outcomes = [
        outcome("tenant acme", REQUESTS, 100, RateResult(True, 50, 600, None)),
        outcome("API key k1", TOKENS, 1000, RateResult(False, 100, 54_000, 1_500), cost=250),
        outcome("tenant acme", TOKENS, 5000, RateResult(False, 0, 60_000, 700), cost=250),
    ]
    error = rate_limited(outcomes, {"x-ratelimit-limit-requests": "100"})
    assert error is not None
    assert (error.status, error.code, error.type) == (429, "rate_limit_exceeded", "rate_limit_error")
    assert error.message == (
        "Rate limit reached for tokens per minute (TPM) (API key k1): Limit 1000, Used 900, Requested 250. "
        "Please try again in 1.5s."
    )
    assert error.response_headers() == {
        "x-ratelimit-limit-requests": "100",
        "retry-after": "2",
        "retry-after-ms": "1500",
    }  # the longest wait: every bucket must have room
    assert rate_limited(outcomes[:1], {}) is None


def test_a_request_larger_than_the_bucket_is_refused_for_good() -> None:
    outcomes = [outcome("tenant acme", TOKENS, 1000, RateResult(False, 1000, 0, None), cost=5000)]
    error = rate_limited(outcomes, {})
    assert error is not None
    assert error.message == (
        "Request too large for tokens per minute (tenant acme): Limit 1000, Requested 5000. "
        "Send fewer tokens in one request."
    )
    assert error.response_headers() == {"x-should-retry": "false"}
