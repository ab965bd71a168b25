"""Operations: health, readiness, metrics, request ids, the body limit and multi-worker serving."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .support import ACME_KEY, Proc

AUTH = {"authorization": f"Bearer {ACME_KEY}"}
CHAT: Any = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _samples(http: httpx.Client) -> dict[str, list[Any]]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def _requests_total(http: httpx.Client, model: str, status: str) -> float:
    for sample in _samples(http)["gateway_requests"]:
        if sample.name == "gateway_requests_total" and sample.labels == {"model": model, "status": status}:
            return float(sample.value)
    return 0.0


def _eventually(check: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition did not become true in time"
        time.sleep(0.02)


def test_healthz_and_readyz(http: httpx.Client, workdir: Any) -> None:
    health = http.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert health.headers["x-request-id"]
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert ready.json()["store"].startswith("sqlite:///")
    assert (workdir / "store" / "gateway.db").exists()
    assert ready.headers["x-request-id"]


def test_metrics_count_requests_by_model_and_status(http: httpx.Client) -> None:
    ok_before = _requests_total(http, "gpt-4o-mini", "200")
    missing_before = _requests_total(http, "unknown", "404")
    assert http.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    wrong = {**CHAT, "model": "some-model-nobody-configured"}
    assert http.post("/v1/chat/completions", json=wrong, headers=AUTH).status_code == 404
    # The counters move just after the answer is sent: allow the gateway a moment.
    _eventually(lambda: _requests_total(http, "gpt-4o-mini", "200") == ok_before + 1)
    # Client-chosen model names never become label values.
    _eventually(lambda: _requests_total(http, "unknown", "404") == missing_before + 1)
    samples = _samples(http)
    assert "some-model-nobody-configured" not in str(samples)
    for family in (
        "gateway_request_duration_seconds",
        "gateway_upstream_duration_seconds",
        "gateway_overhead_seconds",
    ):
        counts = [s.value for s in samples[family] if s.name == f"{family}_count"]
        assert counts, family
        assert sum(counts) >= 1, family
    upstreams = {s.labels["upstream"] for s in samples["gateway_upstream_duration_seconds"] if "upstream" in s.labels}
    assert "mock" in upstreams
    _eventually(lambda: [s.value for s in _samples(http)["gateway_in_flight_requests"]] == [0.0])


def test_every_response_has_a_request_id(http: httpx.Client) -> None:
    responses = [
        http.post("/v1/chat/completions", json=CHAT, headers=AUTH),
        http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH),
        http.post("/v1/chat/completions", json=CHAT),
        http.post("/v1/chat/completions", content=b"{", headers=AUTH),
        http.post("/v1/chat/completions", json={**CHAT, "model": "dead-model"}, headers=AUTH),
        http.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}, headers=AUTH),
        http.get("/v1/models", headers=AUTH),
        http.get("/v1/models/gpt-4o", headers=AUTH),
        http.get("/v1/models/nope", headers=AUTH),
        http.get("/metrics"),
        http.get("/nowhere"),
        http.delete("/v1/models"),
    ]
    assert [r.status_code for r in responses] == [200, 200, 401, 400, 502, 200, 200, 200, 404, 200, 404, 405]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids), ids
    assert len(set(ids)) == len(ids)


def test_upstream_request_id_is_reported_separately(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.headers["x-upstream-request-id"].startswith("req_mock_")
    assert response.headers["x-request-id"] != response.headers["x-upstream-request-id"]


# ---------------------------------------------------------------- the second gateway: 2 workers, 2 KiB limit


def test_body_over_the_limit_is_413(small_gateway: Proc) -> None:
    with openai.OpenAI(base_url=f"{small_gateway.url}/v1", api_key=ACME_KEY, max_retries=0) as sdk:
        with pytest.raises(openai.APIStatusError) as excinfo:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 4000}])
        assert excinfo.value.status_code == 413
        assert excinfo.value.code == "request_too_large"
        assert excinfo.value.response.headers["x-should-retry"] == "false"
        # Just under the limit is fine.
        small = sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 1500}])
        assert small.choices[0].message.content == "Mock reply to: " + "x" * 60


def test_chunked_body_over_the_limit_is_413(small_gateway: Proc) -> None:
    def chunks() -> Any:
        for _ in range(10):
            yield b" " * 512

    with httpx.Client(base_url=small_gateway.url, timeout=10.0, trust_env=False) as http:
        response = http.post("/v1/chat/completions", content=chunks(), headers=AUTH)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_too_large"


def test_two_workers_serve_requests(small_gateway: Proc) -> None:
    with openai.OpenAI(base_url=f"{small_gateway.url}/v1", api_key=ACME_KEY, max_retries=0) as sdk:
        replies = [
            sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"n{i}"}])
            for i in range(4)
        ]
        assert [r.choices[0].message.content for r in replies] == [f"Mock reply to: n{i}" for i in range(4)]
        assert [m.id for m in sdk.models.list()][:2] == ["gpt-4o-mini", "gpt-4o"]
