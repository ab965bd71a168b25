"""A stream stops at the output tokens its budget hold covers, through real `gateway serve` and mock processes.

A tenant's budget has `reserve_max_tokens: 20`; the mock streams a long answer (`x-mock-reply-words`). The
official SDK gets the answer up to the cap and then raises `openai.APIError` with the gateway's
`budget_reserve_exhausted` code; the ledger records no more completion tokens than the hold covers, and the
mock sees its request cancelled. Every test uses a tenant of its own, so the ledger rows it reads are its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.cost.tokens import count_tokens

from .support import Proc, gateway_config, serve

PRICES_FILE = Path(__file__).resolve().parents[2] / "config" / "prices.yaml"
ADMIN_KEY = "sk-admin-stream-cap-0123456789"
INPUT, OUTPUT = Decimal("0.15"), Decimal("0.60")  # gpt-4o-mini in config/prices.yaml, USD per 1M tokens
RESERVE = 20
MODEL = "gpt-4o-mini"
MESSAGES: list[Any] = [{"role": "user", "content": "tell me a very long story"}]
LONG = {"x-mock-reply-words": "2000"}  # far more than the reserve
SLOW_LONG = {**LONG, "x-mock-chunk-delay-ms": "5"}  # ~10 s to stream whole: only a cut ends it sooner
TENANTS = ("sdk", "raw", "limit", "above", "choices")
WAIT_S = 5.0


def key_of(tenant: str) -> str:
    return f"sk-gw-cap-{tenant}-0123456789abcdef"


@pytest.fixture(scope="module")
def cap_gateway(mock_upstream: Proc, dead_port: int, workdir: Path) -> Iterator[Proc]:
    config = gateway_config(mock_upstream.port, dead_port, f"sqlite:///{workdir / 'cap-store' / 'gateway.db'}")
    config["pricing"] = {"file": str(PRICES_FILE)}
    config["admin"] = {"api_keys": [ADMIN_KEY]}
    config["ledger"] = {"durable": True}
    config["policies"] = {"capped": {"budget": {"usd_per_day": 1.0, "reserve_max_tokens": RESERVE}}}
    config["tenants"] = {
        f"cap-{name}": {"policy": "capped", "api_keys": [{"id": f"{name}-key", "key": key_of(name)}]}
        for name in TENANTS
    }
    proc = serve("cap-gateway", config, workdir)
    try:
        yield proc
    finally:
        proc.stop()


def sdk(proc: Proc, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proc.url}/v1", api_key=key_of(tenant), max_retries=0, timeout=15.0)


def wait_until(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_S}s waiting for {what}")
        time.sleep(0.02)
    return result


def ledger_row(proc: Proc, tenant: str) -> dict[str, Any]:
    """The tenant's one ledger row, once its request is recorded."""

    def row() -> dict[str, Any] | None:
        with httpx.Client(base_url=proc.url, timeout=10.0, trust_env=False) as http:
            response = http.get(
                "/admin/usage",
                params={"tenant": f"cap-{tenant}", "group_by": "model"},
                headers={"authorization": f"Bearer {ADMIN_KEY}"},
            )
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["data"]
        return rows[0] if len(rows) == 1 and rows[0]["requests"] == 1 else None

    found: dict[str, Any] = wait_until(row, f"the ledger row of cap-{tenant}")
    return found


def mock_stats(mock_http: httpx.Client) -> dict[str, int]:
    response = mock_http.get("/mock/stats")
    assert response.status_code == 200
    return dict(response.json())


def read_all(stream: Any, pieces: list[tuple[int, str]]) -> None:
    """Iterate an SDK stream to its end (or its error), keeping each choice's content deltas."""
    for chunk in stream:
        pieces.extend((c.index, c.delta.content) for c in chunk.choices if c.delta.content)


def worst_case(prompt_tokens: int, output_tokens: int) -> Decimal:
    return (prompt_tokens * INPUT + output_tokens * OUTPUT) / Decimal(1_000_000)


def test_the_mock_makes_a_reply_as_long_as_asked(mock_http: httpx.Client) -> None:
    headers = {"authorization": "Bearer sk-upstream-secret", "x-mock-reply-words": "50"}
    answer = mock_http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}, headers=headers)
    assert answer.status_code == 200, answer.text
    content = answer.json()["choices"][0]["message"]["content"]
    assert len(content.split()) == 50
    assert content.startswith("Mock reply to: tell me a very long story Mock reply to: tell")
    assert answer.json()["usage"]["completion_tokens"] == 50


def test_the_sdk_gets_the_answer_up_to_the_cap_then_raises_and_the_ledger_stays_within_the_hold(
    cap_gateway: Proc, mock_http: httpx.Client
) -> None:
    wait_until(lambda: mock_stats(mock_http)["in_flight"] == 0, "the mock to be idle")
    cancelled = mock_stats(mock_http)["cancelled"]
    got: list[tuple[int, str]] = []
    with sdk(cap_gateway, "sdk") as client:
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, extra_headers=SLOW_LONG)
        with pytest.raises(openai.APIError) as caught:
            read_all(stream, got)
    pieces = [piece for _, piece in got]
    error = caught.value
    assert type(error) is openai.APIError  # not an APIStatusError: the status was 200, the error came mid-stream
    assert error.code == "budget_reserve_exhausted"
    assert error.type == "insufficient_quota"
    assert error.param is None
    assert error.message.startswith(f"The answer was stopped at its limit of {RESERVE} completion tokens,")
    assert "max_completion_tokens or max_tokens" in error.message
    assert "reserve_max_tokens" in error.message
    assert "story" not in error.message  # never the prompt's text

    # The answer up to the cap: each delta counted as the gateway counts it, all within the reserve, and the
    # next piece of the mock's reply (3 tokens at most) would have gone past it.
    counted = sum(count_tokens(piece, MODEL) for piece in pieces)
    assert RESERVE - 3 < counted <= RESERVE
    assert "".join(pieces).startswith("Mock reply to: tell me a very long story Mock reply")

    row = ledger_row(cap_gateway, "sdk")
    assert row["completion_tokens"] == counted <= RESERVE
    assert row["estimated_requests"] == 1  # the upstream's usage chunk never came
    assert Decimal(row["cost_usd"]) <= worst_case(row["prompt_tokens"], RESERVE)  # the hold is never overshot

    # The gateway closed the upstream at once: the mock, seconds from its end, saw it go.
    wait_until(lambda: mock_stats(mock_http)["cancelled"] > cancelled, "the mock to see the upstream request cancelled")


def test_the_raw_stream_ends_with_one_error_event_and_no_done(cap_gateway: Proc) -> None:
    payload = {"model": MODEL, "messages": MESSAGES, "stream": True}
    headers = {"authorization": f"Bearer {key_of('raw')}", **LONG}
    with httpx.Client(base_url=cap_gateway.url, timeout=15.0, trust_env=False) as http:
        response = http.post("/v1/chat/completions", json=payload, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.content.split(b"\n\n")
    assert events[-1] == b""
    *chunks, last = events[:-1]
    assert b"[DONE]" not in response.content
    assert all(orjson.loads(c[6:])["object"] == "chat.completion.chunk" for c in chunks)
    assert last.startswith(b'data: {"error":{"message":"The answer was stopped at its limit of 20 completion tokens, ')
    error = orjson.loads(last[6:])["error"]
    assert {k: v for k, v in error.items() if k != "message"} == {
        "type": "insufficient_quota",
        "param": None,
        "code": "budget_reserve_exhausted",
    }
    row = ledger_row(cap_gateway, "raw")
    assert row["completion_tokens"] <= RESERVE


def test_a_client_whose_max_tokens_fits_the_reserve_is_not_cut(cap_gateway: Proc) -> None:
    with sdk(cap_gateway, "limit") as client:
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                stream=True,
                max_tokens=RESERVE // 2,
                stream_options={"include_usage": True},
                extra_headers=LONG,
            )
        )
    finish = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert finish == ["length"]  # the upstream stopped it at max_tokens, as OpenAI does
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == RESERVE // 2
    row = ledger_row(cap_gateway, "limit")
    assert row["completion_tokens"] == RESERVE // 2
    assert row["estimated_requests"] == 0  # the upstream's own usage


def test_max_tokens_above_the_reserve_is_cut_at_the_reserve(cap_gateway: Proc) -> None:
    with sdk(cap_gateway, "above") as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, max_completion_tokens=1000, extra_headers=LONG
        )
        with pytest.raises(openai.APIError) as caught:
            read_all(stream, [])
    assert caught.value.code == "budget_reserve_exhausted"
    assert "its max_completion_tokens (1000) is more than that" in caught.value.message
    assert ledger_row(cap_gateway, "above")["completion_tokens"] <= RESERVE


def test_n_choices_share_n_times_the_reserve(cap_gateway: Proc) -> None:
    got: list[tuple[int, str]] = []
    with sdk(cap_gateway, "choices") as client:
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, n=2, extra_headers=LONG)
        with pytest.raises(openai.APIError) as caught:
            read_all(stream, got)
    assert caught.value.code == "budget_reserve_exhausted"
    assert f"stopped at its limit of {2 * RESERVE} completion tokens (2 choices together)" in caught.value.message
    counted = sum(count_tokens(piece, MODEL) for _, piece in got)
    assert 2 * RESERVE - 3 < counted <= 2 * RESERVE
    assert {index for index, _ in got} == {0, 1}
    assert ledger_row(cap_gateway, "choices")["completion_tokens"] == counted
