"""/metrics of `gateway serve --workers 2`: every worker's numbers, whichever worker answers the scrape.

Runs its own gateway (two workers, key and user labels on) so that no other test's requests count, with
TMPDIR pointed at a folder of its own so the test can see the metrics directory come and go.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .support import ACME_KEY, Proc, free_port, gateway_config, start, wait_ready

REQUESTS = 40
USERS = ["u0", "u1", "u2", "u3", "u4"]  # more than max_users (3) per worker
DEADLINE_S = 20.0


def _serve_two_workers(name: str, mock_port: int, dead_port: int, workdir: Path) -> tuple[Proc, Path]:
    tmp = workdir / f"{name}-tmp"
    tmp.mkdir(parents=True)
    config = gateway_config(mock_port, dead_port, "memory://")
    config["metrics"] = {"labels": {"key": True, "user": True}, "max_users": 3}
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    args = ["serve", "--config", str(config_path), "--port", str(port), "--workers", "2"]
    proc = start(name, args, port, workdir, env={"TMPDIR": str(tmp)})
    proc.config_path = config_path
    wait_ready(proc, "/healthz")
    return proc, tmp


@pytest.fixture(scope="module")
def two_workers(mock_upstream: Proc, dead_port: int, workdir: Path) -> Iterator[tuple[Proc, Path]]:
    proc, tmp = _serve_two_workers("metrics-gateway", mock_upstream.port, dead_port, workdir)
    try:
        yield proc, tmp
    finally:
        proc.stop()


def _scrape(proc: Proc) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET /metrics over a fresh connection: samples by name."""
    with httpx.Client(base_url=proc.url, timeout=10.0, trust_env=False) as http:
        response = http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(value for got, value in samples.get(name, []) if all(got.get(k) == v for k, v in labels.items()))


def _worker_pids(proc: Proc) -> list[int]:
    return [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", proc.log_path.read_text())]


def _metrics_dir(tmp: Path) -> Path:
    (found,) = [path for path in tmp.iterdir() if path.name.startswith("gateway-metrics-")]
    return found


def _wait_for(what: str, check: Callable[[], bool], proc: Proc) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"{what} within {DEADLINE_S}s; gateway output:\n{proc.output()}")


def _send(proc: Proc, count: int, start_at: int = 0) -> tuple[int, int]:
    """`count` chat completions, each over a fresh connection; returns their prompt and completion tokens."""
    prompt = completion = 0
    for i in range(start_at, start_at + count):
        user = USERS[i % len(USERS)] if i % 4 else None  # every fourth request names no user
        with openai.OpenAI(base_url=f"{proc.url}/v1", api_key=ACME_KEY, max_retries=0, timeout=15.0) as sdk:
            extra = {"user": user} if user else {}
            reply = sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"n{i}"}], **extra
            )
        assert reply.choices[0].message.content == f"Mock reply to: n{i}"
        assert reply.usage is not None
        prompt += reply.usage.prompt_tokens
        completion += reply.usage.completion_tokens
    return prompt, completion


def test_every_scrape_counts_every_workers_requests(two_workers: tuple[Proc, Path]) -> None:
    proc, tmp = two_workers
    prompt, completion = _send(proc, REQUESTS)
    for _ in range(8):  # fresh connections: either worker may answer each scrape
        samples = _scrape(proc)
        assert _total(samples, "gateway_requests_total") == REQUESTS
        assert _total(samples, "gateway_requests_total", model="gpt-4o-mini", status="200") == REQUESTS
        assert _total(samples, "gateway_request_duration_seconds_count") == REQUESTS
        assert _total(samples, "gateway_tokens_total", type="prompt") == prompt
        assert _total(samples, "gateway_tokens_total", type="completion") == completion
        # One in-flight series, summed over the live workers: no pid label.
        assert samples["gateway_in_flight_requests"] == [({}, 0.0)]
        # The opt-in labels: the key's id (never the key); users bounded per worker.
        tokens = samples["gateway_tokens_total"]
        assert {labels["key"] for labels, _ in tokens} == {"acme-key"}
        assert {labels["tenant"] for labels, _ in tokens} == {"acme"}
        users = {labels.get("user", "") for labels, _ in tokens}
        assert "" in users
        assert users <= {"", *USERS, "__other__"}
        assert len(users - {"", "__other__"}) <= 2 * 3  # max_users per worker, two workers
    files = os.listdir(_metrics_dir(tmp))
    assert {name.split("_")[0] for name in files} == {"counter", "gauge", "histogram"}
    assert ACME_KEY not in proc.log_path.read_text()


def test_a_killed_worker_keeps_its_counts_and_leaves_the_in_flight_sum(two_workers: tuple[Proc, Path]) -> None:
    proc, tmp = two_workers
    before = _total(_scrape(proc), "gateway_requests_total")
    pids = _worker_pids(proc)
    assert len(pids) == 2, proc.output()
    victim = pids[0]
    metrics_dir = _metrics_dir(tmp)
    assert (metrics_dir / f"gauge_livesum_{victim}.db").exists()
    os.kill(victim, signal.SIGKILL)
    _wait_for("uvicorn did not replace the killed worker", lambda: len(_worker_pids(proc)) == 3, proc)
    # The parent drops the dead worker's live gauge; its counters stay in the sums.
    gauge = metrics_dir / f"gauge_livesum_{victim}.db"
    _wait_for("the dead worker's gauge file was not removed", lambda: not gauge.exists(), proc)
    assert (metrics_dir / f"counter_{victim}.db").exists()
    _send(proc, 10, start_at=100)
    for _ in range(6):
        samples = _scrape(proc)
        assert _total(samples, "gateway_requests_total") == before + 10
        assert samples["gateway_in_flight_requests"] == [({}, 0.0)]


def test_the_metrics_directory_is_removed_at_shutdown(mock_upstream: Proc, dead_port: int, workdir: Path) -> None:
    proc, tmp = _serve_two_workers("metrics-shutdown", mock_upstream.port, dead_port, workdir)
    try:
        metrics_dir = _metrics_dir(tmp)
        assert metrics_dir.stat().st_mode & 0o777 == 0o700
        _send(proc, 2)
        assert _total(_scrape(proc), "gateway_requests_total") == 2
    finally:
        proc.stop()
    assert proc.popen.returncode == 0, proc.output()
    assert list(tmp.iterdir()) == []
