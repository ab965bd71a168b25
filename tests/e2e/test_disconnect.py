"""A client that goes away cancels the upstream request: the mock sees the disconnect at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .support import ACME_KEY, Proc

WAIT_S = 3.0  # far less than the mock's injected delays, so only a cancellation can explain the result


def _stats(mock_http: httpx.Client) -> dict[str, int]:
    response = mock_http.get("/mock/stats")
    assert response.status_code == 200
    return dict(response.json())


def _wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def baseline(mock_http: httpx.Client) -> int:
    """The mock's `cancelled` count once earlier tests' requests are done."""
    _wait_until(lambda: _stats(mock_http)["in_flight"] == 0, "the mock to be idle")
    return _stats(mock_http)["cancelled"]


def _assert_cancelled(mock_http: httpx.Client, baseline: int) -> None:
    _wait_until(lambda: _stats(mock_http)["cancelled"] > baseline, "the mock to see the upstream request cancelled")
    _wait_until(lambda: _stats(mock_http)["in_flight"] == 0, "the mock's in_flight to return to 0")
    assert _stats(mock_http)["cancelled"] == baseline + 1


def _metric(gateway_http: httpx.Client, sample_name: str, **labels: str) -> float:
    """The sum of the samples called `sample_name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(gateway_http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == sample_name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def _disconnects(gateway_http: httpx.Client) -> float:
    return _metric(gateway_http, "gateway_client_disconnects_total")


def _chat(stream: bool, **mock_headers: str) -> dict[str, Any]:
    headers = {
        "authorization": f"Bearer {ACME_KEY}",
        **{f"x-mock-{k.replace('_', '-')}": v for k, v in mock_headers.items()},
    }
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b c d e f g h"}], "stream": stream}
    return {"json": body, "headers": headers}


def test_closing_a_stream_cancels_the_upstream(
    gateway: Proc, http: httpx.Client, mock_http: httpx.Client, baseline: int
) -> None:
    before = _disconnects(http)
    with (
        httpx.Client(base_url=gateway.url, timeout=10.0, trust_env=False) as client,
        client.stream("POST", "/v1/chat/completions", **_chat(True, chunk_delay_ms="500")) as response,
    ):
        assert response.status_code == 200
        chunks = response.iter_bytes()  # keep it: dropping the generator would close the connection
        first = next(chunks)
        assert first.startswith(b"data: ")
        assert _stats(mock_http)["in_flight"] == 1  # the upstream is still streaming
    # Leaving the block closed the unfinished response, and with it the connection.
    _assert_cancelled(mock_http, baseline)
    _wait_until(lambda: _disconnects(http) == before + 1, "gateway_client_disconnects_total to count it")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream-before-first-event"])
def test_timing_out_a_request_cancels_the_upstream(
    gateway: Proc, http: httpx.Client, mock_http: httpx.Client, baseline: int, stream: bool
) -> None:
    closed_before = _metric(http, "gateway_requests_total", model="gpt-4o-mini", status="499")
    started = time.monotonic()
    with (
        httpx.Client(base_url=gateway.url, timeout=httpx.Timeout(10.0, read=0.3), trust_env=False) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post("/v1/chat/completions", **_chat(stream, latency_ms="10000"))
    _assert_cancelled(mock_http, baseline)
    assert time.monotonic() - started < 5.0
    # Counted as 499, nginx's "client closed request": no answer was ever sent.
    _wait_until(
        lambda: _metric(http, "gateway_requests_total", model="gpt-4o-mini", status="499") == closed_before + 1,
        "gateway_requests_total{status=499} to count it",
    )


async def test_closing_an_sdk_stream_cancels_the_upstream(
    gateway: Proc, mock_http: httpx.Client, baseline: int
) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=ACME_KEY, max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "long story"}],
            stream=True,
            extra_headers={"x-mock-chunk-delay-ms": "400"},
        )
        first = await stream.__anext__()
        assert first.choices[0].delta.role == "assistant"
        await stream.close()
    _assert_cancelled(mock_http, baseline)
