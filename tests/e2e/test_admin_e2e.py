"""Tenants and keys end to end: the admin API over HTTP, the real `openai` SDK, the CLI, and two replicas on Redis."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import pytest
import yaml
from redis_server import RedisServer, start_redis_server

from .support import Proc, child_env, free_port, gateway_config, start, wait_ready

ADMIN_KEY = "e2e-admin-key-0123456789abcdef"
JWT_SECRET = "e2e-tenant-admin-hs256-secret-0123456789"
ISSUER = "https://idp.e2e.test"
PROPAGATION_S = 2.0  # a change made on one replica holds on every other within this


def admin_config(mock_port: int, dead_port: int, store_url: str) -> dict[str, Any]:
    config = gateway_config(mock_port, dead_port, store_url)
    config["admin"] = {"api_keys": [ADMIN_KEY]}
    config["auth"] = {
        "jwt": {
            "issuers": [
                {
                    "issuer": ISSUER,
                    "audience": "gateway",
                    "secret": JWT_SECRET,
                    "algorithms": ["HS256"],
                    "tenant_claim": "tenant",
                    "roles_claim": "roles",
                }
            ]
        }
    }
    return config


def launch(names: list[str], config: dict[str, Any], workdir: Path) -> list[Proc]:
    """Start several `gateway serve` processes on one config at once, then wait for all of them."""
    path = workdir / f"{names[0]}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    procs = []
    for name in names:
        port = free_port()
        proc = start(name, ["serve", "--config", str(path), "--port", str(port)], port, workdir)
        proc.config_path = path
        procs.append(proc)
    try:
        for proc in procs:
            wait_ready(proc, "/healthz")
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


@pytest.fixture(scope="module")
def admin_gateway(mock_upstream: Proc, dead_port: int, workdir: Path) -> Iterator[Proc]:
    """A gateway with admin keys and a JWT issuer, on an SQLite file the CLI can share."""
    store = f"sqlite:///{workdir / 'admin-store' / 'gateway.db'}"
    (proc,) = launch(["admin-gateway"], admin_config(mock_upstream.port, dead_port, store), workdir)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis_server(tmp_path_factory.mktemp("e2e-redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def replicas(mock_upstream: Proc, dead_port: int, workdir: Path, redis: RedisServer) -> Iterator[tuple[Proc, Proc]]:
    """Two gateway processes sharing one real redis-server."""
    config = admin_config(mock_upstream.port, dead_port, redis.url)
    one, two = launch(["replica-1", "replica-2"], config, workdir)
    try:
        yield one, two
    finally:
        one.stop()
        two.stop()


def admin(proc: Proc, credential: str = ADMIN_KEY) -> httpx.Client:
    return httpx.Client(
        base_url=proc.url, timeout=10.0, trust_env=False, headers={"authorization": f"Bearer {credential}"}
    )


def sdk(proc: Proc, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proc.url}/v1", api_key=key, max_retries=0, timeout=15.0)


def ask(proc: Proc, key: str, model: str = "gpt-4o-mini") -> str:
    with sdk(proc, key) as client:
        completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "ping"}])
    return completion.choices[0].message.content or ""


def refused(proc: Proc, key: str) -> openai.AuthenticationError:
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(proc, key)
    assert caught.value.status_code == 401
    return caught.value


def refused_within(proc: Proc, key: str, seconds: float = PROPAGATION_S) -> tuple[openai.AuthenticationError, float]:
    """Poll until the SDK gets a 401 for `key`; fail if it still works after `seconds`."""
    started = time.monotonic()
    while True:
        try:
            ask(proc, key)
        except openai.AuthenticationError as exc:
            return exc, time.monotonic() - started
        assert time.monotonic() - started < seconds, f"{proc.name} still accepts the key after {seconds}s"
        time.sleep(0.02)


def tenant_admin_token(tenant: str) -> str:
    claims = {
        "iss": ISSUER,
        "aud": "gateway",
        "sub": f"admin@{tenant}",
        "tenant": tenant,
        "roles": "tenant-admin",  # the claim may be a string
        "exp": int(time.time()) + 600,
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def new_tenant(http: httpx.Client, **fields: Any) -> str:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    response = http.post("/admin/tenants", json={"id": tenant, **fields})
    assert response.status_code == 201, response.text
    return tenant


def new_key(http: httpx.Client, tenant: str, **fields: Any) -> dict[str, Any]:
    response = http.post(f"/admin/tenants/{tenant}/keys", json={"name": "e2e", **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["key"].startswith(f"sk-gw-{body['id']}-")
    return body


# --- one gateway, the SDK ---------------------------------------------------------------------------------


def test_a_key_from_the_admin_api_works_with_the_sdk_until_revoked(admin_gateway: Proc) -> None:
    with admin(admin_gateway) as http:
        tenant = new_tenant(http, overrides={"models": ["gpt-4o-mini"]})
        created = new_key(http, tenant)
        assert ask(admin_gateway, created["key"]) == "Mock reply to: ping"
        with sdk(admin_gateway, created["key"]) as client:
            assert [model.id for model in client.models.list()] == ["gpt-4o-mini"]
            with pytest.raises(openai.NotFoundError) as not_allowed:
                client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
            assert not_allowed.value.code == "model_not_found"
        assert http.delete(f"/admin/keys/{created['id']}").status_code == 204
    error = refused(admin_gateway, created["key"])
    assert error.code == "key_revoked"
    assert "revoked" in error.message


def test_rotation_with_a_grace_period(admin_gateway: Proc) -> None:
    with admin(admin_gateway) as http:
        tenant = new_tenant(http)
        old = new_key(http, tenant)
        response = http.post(f"/admin/keys/{old['id']}/rotate", json={"grace_period_s": 1})
        assert response.status_code == 201, response.text
        new = response.json()
        assert ask(admin_gateway, old["key"]) == "Mock reply to: ping"  # still, for the grace period
        assert ask(admin_gateway, new["key"]) == "Mock reply to: ping"
        error, _ = refused_within(admin_gateway, old["key"], seconds=3.0)
        assert error.code == "key_expired"
        assert ask(admin_gateway, new["key"]) == "Mock reply to: ping"
        # Without a grace period the old key stops at once.
        response = http.post(f"/admin/keys/{new['id']}/rotate")
        assert response.status_code == 201
        assert refused(admin_gateway, new["key"]).code == "key_revoked"
        assert ask(admin_gateway, response.json()["key"]) == "Mock reply to: ping"


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        check=False,
    )


def test_keys_create_on_the_command_line_shares_the_sqlite_store(admin_gateway: Proc) -> None:
    assert admin_gateway.config_path is not None
    config = str(admin_gateway.config_path)
    result = gateway_cli("keys", "create", "--tenant", "acme", "--name", "from-cli", "--config", config)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert result.stdout == key + "\n"  # the key, and only the key, on stdout
    assert key.startswith("sk-gw-")
    assert "shown this once" in result.stderr
    assert key not in result.stderr
    # The running server, on the same SQLite file, accepts it at once.
    assert ask(admin_gateway, key) == "Mock reply to: ping"
    with admin(admin_gateway) as http:
        listed = http.get("/admin/tenants/acme/keys").json()["data"]
        assert [k["name"] for k in listed if key.startswith(k["prefix"] + "-")] == ["from-cli"]
        # A tenant created through the API takes CLI keys too.
        tenant = new_tenant(http)
    result = gateway_cli("keys", "create", "--tenant", tenant, "--name", "n", "--config", config)
    assert result.returncode == 0, result.stderr
    assert ask(admin_gateway, result.stdout.strip()) == "Mock reply to: ping"


def test_keys_create_for_an_unknown_tenant_fails(admin_gateway: Proc) -> None:
    assert admin_gateway.config_path is not None
    result = gateway_cli(
        "keys", "create", "--tenant", "no-such-tenant", "--name", "n", "--config", str(admin_gateway.config_path)
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert "no-such-tenant" in result.stderr


def test_keys_create_refuses_a_process_local_store(tmp_path: Path) -> None:
    path = tmp_path / "memory.yaml"
    path.write_text(yaml.safe_dump({"store": {"url": "memory://"}, "tenants": {"acme": {}}}))
    result = gateway_cli("keys", "create", "--tenant", "acme", "--name", "n", "--config", str(path))
    assert result.returncode != 0
    assert result.stdout == ""
    assert "memory://" in result.stderr


# --- two replicas on one Redis ------------------------------------------------------------------------------


def test_two_replicas_share_keys_and_revocations(replicas: tuple[Proc, Proc]) -> None:
    one, two = replicas
    with admin(one) as http:
        tenant = new_tenant(http)
        created = new_key(http, tenant)
    # Created through replica 1, used on replica 2 (which now holds it in its cache).
    assert ask(two, created["key"]) == "Mock reply to: ping"
    assert ask(two, created["key"]) == "Mock reply to: ping"
    with admin(one) as http:
        assert http.delete(f"/admin/keys/{created['id']}").status_code == 204
    assert refused(one, created["key"]).code == "key_revoked"
    error, _ = refused_within(two, created["key"])
    assert error.code == "key_revoked"


def test_a_policy_change_reaches_the_other_replica(replicas: tuple[Proc, Proc]) -> None:
    one, two = replicas
    with admin(one) as http:
        tenant = new_tenant(http)
        key = new_key(http, tenant)["key"]
        assert ask(two, key, "gpt-4o") == "Mock reply to: ping"
        response = http.patch(f"/admin/tenants/{tenant}", json={"overrides": {"models": ["gpt-4o-mini"]}})
        assert response.status_code == 200, response.text
    started = time.monotonic()
    error: openai.NotFoundError | None = None
    while error is None:
        try:
            ask(two, key, "gpt-4o")
        except openai.NotFoundError as exc:
            error = exc
        else:
            assert time.monotonic() - started < PROPAGATION_S, "replica 2 still serves the old policy"
            time.sleep(0.02)
    assert error.code == "model_not_found"
    assert ask(two, key, "gpt-4o-mini") == "Mock reply to: ping"


def test_a_tenant_admin_token_manages_its_keys_on_either_replica(replicas: tuple[Proc, Proc]) -> None:
    one, two = replicas
    with admin(one) as http:
        tenant = new_tenant(http)
        other_tenant = new_tenant(http)
        other_key = new_key(http, other_tenant)
    token = tenant_admin_token(tenant)
    with admin(two, token) as http:
        created = new_key(http, tenant, models=["gpt-4o-mini"])
        assert created["tenant"] == tenant
        listed = http.get(f"/admin/tenants/{tenant}/keys")
        assert [k["id"] for k in listed.json()["data"]] == [created["id"]]
        assert [t["id"] for t in http.get("/admin/tenants").json()["data"]] == [tenant]
        # Another tenant's tenant and keys do not exist for this token.
        assert http.get(f"/admin/tenants/{other_tenant}").status_code == 404
        assert http.get(f"/admin/tenants/{other_tenant}/keys").status_code == 404
        assert http.delete(f"/admin/keys/{other_key['id']}").status_code == 404
        assert http.post(f"/admin/tenants/{tenant}/keys", json={"name": 1}).status_code == 400
        assert http.post("/admin/tenants", json={"id": "x"}).status_code == 403
    assert ask(two, other_key["key"]) == "Mock reply to: ping"  # untouched
    # The key the token made on replica 2 works on replica 1, and its revocation there reaches replica 1.
    assert ask(one, created["key"]) == "Mock reply to: ping"
    with admin(two, token) as http:
        assert http.delete(f"/admin/keys/{created['id']}").status_code == 204
    error, _ = refused_within(one, created["key"])
    assert error.code == "key_revoked"


def test_a_tenant_key_is_not_an_admin_credential(replicas: tuple[Proc, Proc]) -> None:
    one, two = replicas
    with admin(one) as http:
        key = new_key(http, new_tenant(http))["key"]
    for proc, credential, status in ((two, key, 403), (two, "not-a-key", 401), (one, key + "x", 401)):
        with admin(proc, credential) as http:
            response = http.get("/admin/tenants")
            assert response.status_code == status, response.text
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}


# --- limits set through the admin API -----------------------------------------------------------------------


def test_a_keys_own_rate_limit_and_budget_hold_through_the_sdk(admin_gateway: Proc) -> None:
    with admin(admin_gateway) as http:
        tenant = new_tenant(http)
        limited = new_key(http, tenant, rate_limit={"requests_per_minute": 2})
        broke = new_key(http, tenant, budget={"usd_per_day": 0.000001})  # $0.000001: not even one request
        free = new_key(http, tenant)
    with sdk(admin_gateway, limited["key"]) as client:
        for remaining in ("1", "0"):
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}]
            )
            assert raw.headers["x-ratelimit-limit-requests"] == "2"
            assert raw.headers["x-ratelimit-remaining-requests"] == remaining
        with pytest.raises(openai.RateLimitError) as rate_limited:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}])
    assert rate_limited.value.code == "rate_limit_exceeded"
    assert f"(API key {limited['id']})" in rate_limited.value.message
    assert int(rate_limited.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError) as no_budget:
        ask(admin_gateway, broke["key"])
    assert no_budget.value.code == "insufficient_quota"
    assert f"API key {broke['id']}'s daily budget of $0.000001 cannot cover" in no_budget.value.message
    assert no_budget.value.response.headers["x-should-retry"] == "false"
    assert ask(admin_gateway, free["key"]) == "Mock reply to: ping"  # the tenant itself has no limits


class _Webhook:
    """A local HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/budget-alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_budgets_alert_calls_the_webhook_once_per_window(admin_gateway: Proc) -> None:
    hook = _Webhook()
    try:
        with admin(admin_gateway) as http_client:
            probe = new_key(http_client, new_tenant(http_client))
            with sdk(admin_gateway, probe["key"]) as client:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}], max_tokens=16
                )
            cost = Decimal(raw.headers["x-gateway-cost-usd"])  # what one such request costs, exactly
            budget = {"usd_per_day": float(cost * 100), "alert_at": 0.025, "webhook_url": hook.url}  # at 2.5 requests
            tenant = new_tenant(http_client, overrides={"budget": budget})
            key = new_key(http_client, tenant)
        with sdk(admin_gateway, key["key"]) as client:
            for _ in range(5):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}], max_tokens=16
                )
        deadline = time.monotonic() + 5.0  # settlement, then the webhook, run after the answers
        while not hook.received and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # a second alert, if there were one, would have arrived by now
        (alert,) = hook.received
        assert alert["type"] == "budget.alert"
        assert alert["who"] == f"tenant {tenant}"
        assert alert["window"] == time.strftime("%Y-%m-%d", time.gmtime())
        assert Decimal(alert["spent_usd"].lstrip("$")) == cost * 3  # the settlement that crossed 2.5 requests
    finally:
        hook.close()
    metrics = httpx.get(f"{admin_gateway.url}/metrics", timeout=5.0, trust_env=False).text
    assert f'gateway_budget_alerts_total{{tenant="{tenant}"}} 1.0' in metrics
