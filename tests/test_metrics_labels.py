"""Opt-in `key` and `user` labels on the token and cost counters; the metrics of several workers merged."""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import generate_latest, values
from prometheus_client.parser import text_string_to_metric_families

import gateway.metrics as metrics_module
from gateway.app import create_app
from gateway.config import GatewayConfig, UpstreamConfig
from gateway.config.schema import MetricsConfig, MetricsLabelsConfig
from gateway.metrics import OTHER_USER, Metrics, multiprocess_dir, reap_dead_workers
from gateway.upstream.httpx_transport import HttpxTransport

GATEWAY_KEY = "sk-gw-test-key"  # tests/conftest.py BASE_CONFIG: tenant acme, key id acme-1
CHAT = "/v1/chat/completions"
# Above the largest pid Linux can hand out (2**22): no process has it, so it counts as dead.
DEAD_PID = 4_200_001

Start = Callable[[Any], Awaitable[httpx.AsyncClient]]


def _config(*, key: bool = False, user: bool = False, max_users: int = 1000) -> MetricsConfig:
    return MetricsConfig(labels=MetricsLabelsConfig(key=key, user=user), max_users=max_users)


def _samples(text: bytes | str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples named `name` in an exposition, by their sorted labels."""
    if isinstance(text, bytes):
        text = text.decode()
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


# --- Metrics: the label sets --------------------------------------------------------------------


def test_without_the_option_the_label_sets_are_unchanged() -> None:
    metrics = Metrics()
    assert metrics.tokens._labelnames == ("tenant", "model", "type")
    assert metrics.cost_usd._labelnames == ("tenant", "model")
    assert metrics.unpriced._labelnames == ("tenant", "model")
    assert not metrics.per_caller
    # The key and user given are ignored.
    prompt, *_, cost, _ = metrics.cost_children("acme", "gpt-4o", "acme-1", "alice")
    prompt.inc(3)
    cost.inc(0.5)
    text = metrics.exposition()
    assert _samples(text, "gateway_tokens_total") == {
        (("model", "gpt-4o"), ("tenant", "acme"), ("type", kind)): 3.0 if kind == "prompt" else 0.0
        for kind in ("prompt", "cached", "completion", "reasoning")
    }
    assert _samples(text, "gateway_cost_usd_total") == {(("model", "gpt-4o"), ("tenant", "acme")): 0.5}


@pytest.mark.parametrize(
    ("key", "user", "extra"),
    [(True, False, ("key",)), (False, True, ("user",)), (True, True, ("key", "user"))],
)
def test_the_enabled_labels_are_added(key: bool, user: bool, extra: tuple[str, ...]) -> None:
    metrics = Metrics(config=_config(key=key, user=user))
    assert metrics.per_caller
    assert metrics.tokens._labelnames == ("tenant", "model", *extra, "type")
    assert metrics.cost_usd._labelnames == ("tenant", "model", *extra)
    assert metrics.unpriced._labelnames == ("tenant", "model", *extra)
    *_, unpriced = metrics.cost_children("acme", "gpt-4o", "acme-1", "alice")
    unpriced.inc()
    given = {"key": "acme-1", "user": "alice"}
    labels = tuple(sorted({"tenant": "acme", "model": "gpt-4o", **{name: given[name] for name in extra}}.items()))
    assert _samples(metrics.exposition(), "gateway_unpriced_requests_total") == {labels: 1.0}


def test_no_user_is_an_empty_label() -> None:
    metrics = Metrics(config=_config(user=True))
    assert metrics.user_label(None) == ""
    assert metrics.user_label("") == ""
    metrics.cost_children("acme", "gpt-4o", "acme-1", None)[4].inc(1)
    # Prometheus treats an empty label value as no label: `{user=""}` matches the requests without a user.
    samples = _samples(metrics.exposition(), "gateway_cost_usd_total")
    assert samples == {(("model", "gpt-4o"), ("tenant", "acme"), ("user", "")): 1.0}


def test_users_beyond_max_users_are_other() -> None:
    metrics = Metrics(config=_config(user=True, max_users=2))
    assert [metrics.user_label(user) for user in ("a", "b", "c", "a", "b", "d", "")] == [
        "a",
        "b",
        OTHER_USER,
        "a",
        "b",
        OTHER_USER,
        "",
    ]
    for user in ("a", "b", "c", "d", "e"):
        metrics.cost_children("acme", "gpt-4o", "k", user)[0].inc(1)
    prompt = {
        dict(labels)["user"]: value
        for labels, value in _samples(metrics.exposition(), "gateway_tokens_total").items()
        if dict(labels)["type"] == "prompt"
    }
    assert prompt == {"a": 1.0, "b": 1.0, OTHER_USER: 3.0}


def test_an_overlong_user_is_other_and_takes_no_place() -> None:
    metrics = Metrics(config=_config(user=True, max_users=1))
    assert metrics.user_label("u" * (metrics_module.MAX_USER_LABEL_CHARS + 1)) == OTHER_USER
    assert metrics.user_label("u" * metrics_module.MAX_USER_LABEL_CHARS) == "u" * metrics_module.MAX_USER_LABEL_CHARS
    assert metrics.user_label("someone-else") == OTHER_USER


def test_the_users_are_bounded_per_metrics_not_globally() -> None:
    first = Metrics(config=_config(user=True, max_users=1))
    second = Metrics(config=_config(user=True, max_users=1))
    assert first.user_label("a") == "a"
    assert second.user_label("b") == "b"
    assert first.user_label("b") == OTHER_USER


def test_the_child_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "_MAX_CACHED_SERIES", 3)
    metrics = Metrics(config=_config(key=True))
    for _ in range(2):
        for index in range(10):
            metrics.cost_children("acme", "gpt-4o", f"k{index}")[0].inc(1)
            assert len(metrics._cost_children) <= 3
    prompt = {
        dict(labels)["key"]: value
        for labels, value in _samples(metrics.exposition(), "gateway_tokens_total").items()
        if dict(labels)["type"] == "prompt"
    }
    assert prompt == {f"k{index}": 2.0 for index in range(10)}  # dropping the cache loses no counts


def test_cached_children_are_reused() -> None:
    metrics = Metrics(config=_config(key=True, user=True))
    assert metrics.cost_children("t", "m", "k", "u") is metrics.cost_children("t", "m", "k", "u")
    assert metrics.cost_children("t", "m", "k", "u") is not metrics.cost_children("t", "m", "k", "v")


# --- through the app ----------------------------------------------------------------------------


def _usage_upstream(name: str, config: UpstreamConfig) -> HttpxTransport:
    async def handle(request: httpx.Request) -> httpx.Response:
        sent = orjson.loads(request.content)
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": sent["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
        }
        return httpx.Response(200, content=orjson.dumps(body), headers={"content-type": "application/json"})

    return HttpxTransport(httpx.AsyncClient(transport=httpx.MockTransport(handle)))


def _app(make_config: Callable[..., GatewayConfig], metrics: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    overrides: dict[str, Any] = {"pricing": {"file": None}, "prices": {"gpt-4o": {"input": 1, "output": 2}}}
    if metrics is not None:
        overrides["metrics"] = metrics
    return create_app(make_config(overrides), transport_factory=_usage_upstream, **kwargs)


async def _chat(
    client: httpx.AsyncClient, model: str = "gpt-4o", headers: dict[str, str] | None = None, **body: Any
) -> None:
    response = await client.post(
        CHAT,
        content=orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **body}),
        headers={"authorization": f"Bearer {GATEWAY_KEY}", **(headers or {})},
    )
    assert response.status_code == 200, response.text


async def test_the_app_keeps_tenant_and_model_only_by_default(make_config: Callable[..., Any], started: Start) -> None:
    client = await started(_app(make_config))
    await _chat(client, user="alice")
    await _chat(client, model="gpt-4o-mini")
    text = (await client.get("/metrics")).text
    assert _samples(text, "gateway_cost_usd_total") == {
        (("model", "gpt-4o"), ("tenant", "acme")): pytest.approx(18e-6),  # 10 tokens at $1/M + 4 at $2/M
        (("model", "gpt-4o-mini"), ("tenant", "acme")): 0.0,
    }
    assert _samples(text, "gateway_unpriced_requests_total")[(("model", "gpt-4o-mini"), ("tenant", "acme"))] == 1.0
    assert all(
        {name for name, _ in labels} == {"tenant", "model", "type"} for labels in _samples(text, "gateway_tokens_total")
    )
    assert "alice" not in text
    assert "acme-1" not in text


async def test_the_app_labels_key_and_user_when_enabled(make_config: Callable[..., Any], started: Start) -> None:
    client = await started(_app(make_config, {"labels": {"key": True, "user": True}, "max_users": 2}))
    await _chat(client, user="alice")
    await _chat(client, user="alice")
    await _chat(client, headers={"x-gateway-user": "bob"})
    await _chat(client)
    await _chat(client, user="carol")  # the third user: beyond max_users
    text = (await client.get("/metrics")).text
    completion = {
        dict(labels).get("user", ""): value
        for labels, value in _samples(text, "gateway_tokens_total").items()
        if dict(labels)["type"] == "completion"
    }
    assert completion == {"alice": 8.0, "bob": 4.0, "": 4.0, OTHER_USER: 4.0}
    assert {dict(labels)["key"] for labels in _samples(text, "gateway_cost_usd_total")} == {"acme-1"}
    assert GATEWAY_KEY not in text  # the key's id is a label, never the key


async def test_a_key_label_alone(make_config: Callable[..., Any], started: Start) -> None:
    client = await started(_app(make_config, {"labels": {"key": True}}))
    await _chat(client, user="alice")
    text = (await client.get("/metrics")).text
    assert _samples(text, "gateway_cost_usd_total") == {
        (("key", "acme-1"), ("model", "gpt-4o"), ("tenant", "acme")): pytest.approx(18e-6)
    }


# --- several workers: prometheus_client's multiprocess mode, in one process ------------------------


@pytest.fixture
def shared_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[int], str]:
    """`use(pid)`: from now on, metrics built write to files in one directory, as the worker `pid` would."""
    path = tmp_path / "metrics"
    path.mkdir()
    monkeypatch.setenv(metrics_module.MULTIPROC_ENV, str(path))
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)  # restored after the test

    def use(pid: int) -> str:
        values.ValueClass = values.MultiProcessValue(lambda: pid)
        return str(path)

    return use


def test_multiprocess_mode_needs_the_environment_before_the_import(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR must be set before"):
        Metrics(multiprocess_dir=str(tmp_path))


def test_the_workers_numbers_are_merged(shared_dir: Callable[[int], str]) -> None:
    workers: list[Metrics] = []
    for pid, count in ((os.getpid(), 3), (DEAD_PID, 4)):
        path = shared_dir(pid)  # label children are made when first used: use each "worker" in turn
        metrics = Metrics(config=_config(key=True), multiprocess_dir=path)
        workers.append(metrics)
        for _ in range(count):
            metrics.requests.labels("gpt-4o", "200").inc()
            metrics.request_duration.labels("chat.completions").observe(0.01)
        metrics.in_flight.inc(count)
        metrics.cost_children("acme", "gpt-4o", "acme-1")[0].inc(10 * count)
    first = workers[0]
    for metrics in workers:  # whichever worker answers the scrape
        text = metrics.exposition()
        assert _samples(text, "gateway_requests_total") == {(("model", "gpt-4o"), ("status", "200")): 7.0}
        assert _samples(text, "gateway_request_duration_seconds_count") == {(("endpoint", "chat.completions"),): 7.0}
        assert _samples(text, "gateway_in_flight_requests") == {(): 7.0}  # livesum: no pid label
        prompt = _samples(text, "gateway_tokens_total")
        assert prompt[(("key", "acme-1"), ("model", "gpt-4o"), ("tenant", "acme"), ("type", "prompt"))] == 70.0
    # The second "worker" is gone: its in-flight requests leave the gauge, its counts stay.
    assert reap_dead_workers(path) == [DEAD_PID]
    text = first.exposition()
    assert _samples(text, "gateway_in_flight_requests") == {(): 3.0}
    assert _samples(text, "gateway_requests_total") == {(("model", "gpt-4o"), ("status", "200")): 7.0}
    assert reap_dead_workers(path) == []  # the live worker's gauge stays
    files = {f"{kind}_{pid}.db" for kind in ("counter", "histogram") for pid in (os.getpid(), DEAD_PID)}
    assert set(os.listdir(path)) == {*files, f"gauge_livesum_{os.getpid()}.db"}


async def test_the_app_serves_the_merged_numbers_and_leaves_the_sum_at_shutdown(
    make_config: Callable[..., Any], shared_dir: Callable[[int], str], lifespan: Any
) -> None:
    path = shared_dir(DEAD_PID)
    other_worker = Metrics(multiprocess_dir=path)
    other_worker.requests.labels("gpt-4o", "200").inc(5)
    shared_dir(os.getpid())
    app = _app(make_config, metrics_dir=path)
    assert app.state.services.metrics.multiprocess_dir == path
    transport = httpx.ASGITransport(app=app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        await _chat(client)
        text = (await client.get("/metrics")).text
        assert _samples(text, "gateway_requests_total") == {(("model", "gpt-4o"), ("status", "200")): 6.0}
        assert _samples(text, "gateway_in_flight_requests") == {(): 0.0}
        assert os.path.exists(os.path.join(path, f"gauge_livesum_{os.getpid()}.db"))
    assert not os.path.exists(os.path.join(path, f"gauge_livesum_{os.getpid()}.db"))  # marked dead at shutdown
    assert os.path.exists(os.path.join(path, f"counter_{os.getpid()}.db"))


async def test_without_a_directory_the_app_serves_its_own_registry(
    make_config: Callable[..., Any], started: Start
) -> None:
    app = _app(make_config)
    metrics = app.state.services.metrics
    assert metrics.multiprocess_dir is None
    client = await started(app)
    await _chat(client)
    assert (await client.get("/metrics")).content == generate_latest(metrics.registry)
    assert _samples(generate_latest(metrics.registry), "gateway_requests_total") == {
        (("model", "gpt-4o"), ("status", "200")): 1.0
    }


def test_the_shared_directory_is_private_and_removed_afterwards() -> None:
    with multiprocess_dir() as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert os.listdir(path) == []
        dead_gauge = os.path.join(path, f"gauge_livesum_{DEAD_PID}.db")
        Path(dead_gauge).write_bytes(b"")
        Path(path, f"counter_{DEAD_PID}.db").write_bytes(b"")
        assert reap_dead_workers(path) == [DEAD_PID]
        assert os.listdir(path) == [f"counter_{DEAD_PID}.db"]
    assert not os.path.exists(path)


def test_reaping_a_missing_directory_is_harmless(tmp_path: Path) -> None:
    assert reap_dead_workers(str(tmp_path / "gone")) == []
