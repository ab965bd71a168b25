"""The admin API in-process: every endpoint, status and error code of the contract."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from gateway.identity.keys import hash_key, parse_time

from .conftest import ADMIN_KEY, CONFIG_KEY, SECOND_ADMIN_KEY, Gateway, error_of, mint

KEY_SHAPE = re.compile(r"sk-gw-[0-9a-f]{16}-[A-Za-z0-9_-]{43,}")
NO_SUCH_KEY = "0123456789abcdef"

ENDPOINTS = [
    ("POST", "/admin/tenants"),
    ("GET", "/admin/tenants"),
    ("GET", "/admin/tenants/acme"),
    ("PATCH", "/admin/tenants/acme"),
    ("DELETE", "/admin/tenants/acme"),
    ("POST", "/admin/tenants/acme/keys"),
    ("GET", "/admin/tenants/acme/keys"),
    ("GET", f"/admin/keys/{NO_SUCH_KEY}"),
    ("DELETE", f"/admin/keys/{NO_SUCH_KEY}"),
    ("POST", f"/admin/keys/{NO_SUCH_KEY}/rotate"),
]


def in_future(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


async def eventually_refused(gw: Gateway, key: str, within_s: float = 2.0) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        response = await gw.chat(key)
        if response.status_code != 200:
            assert response.status_code == 401, response.text
            return error_of(response)
        assert time.monotonic() < deadline, "the key still works"
        await asyncio.sleep(0.02)


# --- who may call it ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_every_endpoint_needs_a_credential(gw: Gateway, method: str, path: str) -> None:
    for auth in (None, "wrong-admin-key", ADMIN_KEY + "x", ADMIN_KEY[:-1]):
        response = await gw.admin(method, path, raw=b"not json", auth=auth)
        assert response.status_code == 401, (auth, response.text)
        error = error_of(response)
        assert error["code"] == "invalid_api_key"
        assert error["type"] == "invalid_request_error"
    response = await gw.client.request(method, path, headers={"authorization": f"Basic {ADMIN_KEY}"})
    assert response.status_code == 401
    assert "Bearer" in error_of(response)["message"]
    assert (await gw.admin("GET", "/admin/tenants/acme")).json()["id"] == "acme"  # nothing changed


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_a_tenant_key_or_a_token_without_the_role_is_forbidden(gw: Gateway, method: str, path: str) -> None:
    api_key = (await gw.new_key("acme"))["key"]
    for credential in (CONFIG_KEY, api_key, mint("acme", roles=None), mint("acme", roles=["reader"])):
        response = await gw.admin(method, path, {"id": "x", "name": "x"}, auth=credential)
        assert response.status_code == 403, response.text
        error = error_of(response)
        assert (error["type"], error["code"]) == ("permission_denied", "permission_denied")
    assert [k["name"] for k in (await gw.admin("GET", "/admin/tenants/acme/keys")).json()["data"]] == ["ci"]


async def test_every_admin_key_works(gw: Gateway) -> None:
    for key in (ADMIN_KEY, SECOND_ADMIN_KEY):
        assert (await gw.admin("GET", "/admin/tenants", auth=key)).status_code == 200
    assert (await gw.admin("GET", "/admin/tenants", auth=f"  {ADMIN_KEY}  ")).status_code == 200


async def test_a_revoked_or_expired_credential_is_401_not_403(gw: Gateway) -> None:
    created = await gw.new_key("acme")
    await gw.admin("DELETE", f"/admin/keys/{created['id']}")
    response = await gw.admin("GET", "/admin/tenants", auth=created["key"])
    assert (response.status_code, error_of(response)["code"]) == (401, "key_revoked")
    response = await gw.admin("GET", "/admin/tenants", auth=mint("acme", exp=int(time.time()) - 3600))
    assert response.status_code == 401


async def test_a_tenant_admin_token_manages_its_own_tenant(gw: Gateway) -> None:
    token = mint("acme")
    listed = await gw.admin("GET", "/admin/tenants", auth=token)
    assert [t["id"] for t in listed.json()["data"]] == ["acme"]
    assert (await gw.admin("GET", "/admin/tenants/acme", auth=token)).json()["source"] == "config"
    created = await gw.new_key("acme", "from-token", auth=token)
    assert created["tenant"] == "acme"
    assert (await gw.chat(created["key"])).status_code == 200
    keys = (await gw.admin("GET", "/admin/tenants/acme/keys", auth=token)).json()["data"]
    assert [k["id"] for k in keys] == [created["id"]]
    assert (await gw.admin("GET", f"/admin/keys/{created['id']}", auth=token)).status_code == 200
    rotated = await gw.admin("POST", f"/admin/keys/{created['id']}/rotate", {}, auth=token)
    assert rotated.status_code == 201
    assert (await gw.admin("DELETE", f"/admin/keys/{rotated.json()['id']}", auth=token)).status_code == 204
    assert (await gw.chat(rotated.json()["key"])).status_code == 401
    # Tenant-level changes stay with the gateway admins.
    for method, path in (
        ("POST", "/admin/tenants"),
        ("PATCH", "/admin/tenants/acme"),
        ("DELETE", "/admin/tenants/acme"),
    ):
        response = await gw.admin(method, path, {"id": "new"}, auth=token)
        assert (response.status_code, error_of(response)["code"]) == (403, "permission_denied")


# --- tenants ---------------------------------------------------------------------------------------------


async def test_create_a_tenant(gw: Gateway) -> None:
    response = await gw.admin("POST", "/admin/tenants", {"id": "beta"})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"object", "id", "policy", "overrides", "created_at", "source"}
    assert (body["object"], body["id"], body["policy"], body["overrides"], body["source"]) == (
        "tenant",
        "beta",
        "default",
        {},
        "api",
    )
    assert parse_time(body["created_at"]) is not None
    assert (await gw.admin("GET", "/admin/tenants/beta")).json() == body


async def test_create_a_tenant_with_policy_and_overrides(gw: Gateway) -> None:
    body = await gw.new_tenant("beta", policy="mini-only", overrides={"budget": {"usd_per_day": 3}})
    assert (body["policy"], body["overrides"]) == ("mini-only", {"budget": {"usd_per_day": 3}})
    key = (await gw.new_key("beta"))["key"]
    assert await gw.models(key) == ["gpt-4o-mini"]
    assert (await gw.chat(key, "gpt-4o-mini")).status_code == 200
    refused = await gw.chat(key, "gpt-4o")
    assert (refused.status_code, error_of(refused)["code"]) == (404, "model_not_found")


async def test_creating_an_existing_tenant_is_409(gw: Gateway) -> None:
    await gw.new_tenant("beta")
    for taken in ("beta", "acme"):
        response = await gw.admin("POST", "/admin/tenants", {"id": taken, "policy": "mini-only"})
        assert response.status_code == 409
        assert error_of(response)["code"] == "already_exists"
        assert response.headers["x-should-retry"] == "false"
    assert (await gw.admin("GET", "/admin/tenants/beta")).json()["policy"] == "default"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "id", "missing_required_parameter"),
        ({"id": None}, "id", "missing_required_parameter"),
        ({"id": 7}, "id", "invalid_type"),
        ({"id": "Not Valid"}, "id", "invalid_request"),
        ({"id": "x" * 64}, "id", "invalid_request"),
        ({"id": "beta", "policy": 1}, "policy", "invalid_type"),
        ({"id": "beta", "policy": "gold"}, "policy", "invalid_request"),
        ({"id": "beta", "overrides": []}, "overrides", "invalid_type"),
        ({"id": "beta", "overrides": {"models": ["nope"]}}, "overrides.models", "invalid_request"),
        ({"id": "beta", "overrides": {"models": "gpt-4o"}}, "overrides.models", "invalid_request"),
        ({"id": "beta", "overrides": {"size": 1}}, "overrides.size", "invalid_request"),
        (
            {"id": "beta", "overrides": {"budget": {"usd_per_day": 0}}},
            "overrides.budget.usd_per_day",
            "invalid_request",
        ),
    ],
)
async def test_a_bad_tenant_body_is_400_with_its_param(
    gw: Gateway, body: dict[str, Any], param: str, code: str
) -> None:
    response = await gw.admin("POST", "/admin/tenants", body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert [t["id"] for t in (await gw.admin("GET", "/admin/tenants")).json()["data"]] == ["acme"]


@pytest.mark.parametrize("raw", [b"{", b"[]", b'"beta"', b'{"id": "a", "id": "b"}', b"\xff", b"x" * (64 * 1024 + 1)])
async def test_a_body_that_is_not_one_json_object_is_400(gw: Gateway, raw: bytes) -> None:
    response = await gw.admin("POST", "/admin/tenants", raw=raw)
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "invalid_request_error"


async def test_list_tenants(gw: Gateway) -> None:
    await gw.new_tenant("zeta")
    await gw.new_tenant("beta", policy="mini-only")
    response = await gw.admin("GET", "/admin/tenants")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"object", "data"}
    assert body["object"] == "list"
    assert [(t["id"], t["source"], t["object"]) for t in body["data"]] == [
        ("acme", "config", "tenant"),
        ("beta", "api", "tenant"),
        ("zeta", "api", "tenant"),
    ]


async def test_get_an_unknown_tenant_is_404(gw: Gateway) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        response = await gw.admin(method, "/admin/tenants/nope", {"policy": "default"} if method == "PATCH" else None)
        assert response.status_code == 404
        error = error_of(response)
        assert (error["code"], error["param"], error["type"]) == ("tenant_not_found", "id", "invalid_request_error")


async def test_patch_a_tenant_takes_effect_at_once(gw: Gateway) -> None:
    await gw.new_tenant("beta")
    key = (await gw.new_key("beta"))["key"]
    assert (await gw.chat(key, "gpt-4o")).status_code == 200
    response = await gw.admin("PATCH", "/admin/tenants/beta", {"overrides": {"models": ["gpt-4o-mini"]}})
    assert response.status_code == 200
    assert (response.json()["policy"], response.json()["overrides"]) == ("default", {"models": ["gpt-4o-mini"]})
    assert (await gw.chat(key, "gpt-4o")).status_code == 404
    assert await gw.models(key) == ["gpt-4o-mini"]
    response = await gw.admin("PATCH", "/admin/tenants/beta", {"policy": "mini-only", "overrides": {}})
    assert (response.json()["policy"], response.json()["overrides"]) == ("mini-only", {})
    assert (await gw.admin("GET", "/admin/tenants/beta")).json()["policy"] == "mini-only"


async def test_patch_validates_and_changes_nothing_when_refused(gw: Gateway) -> None:
    await gw.new_tenant("beta")
    for body, param in (({"policy": "gold"}, "policy"), ({"overrides": {"models": ["x"]}}, "overrides.models")):
        response = await gw.admin("PATCH", "/admin/tenants/beta", body)
        assert (response.status_code, error_of(response)["param"]) == (400, param)
    assert (await gw.admin("GET", "/admin/tenants/beta")).json()["overrides"] == {}


async def test_a_config_tenant_is_read_only_but_takes_api_keys(gw: Gateway) -> None:
    for method, body in (("PATCH", {"policy": "mini-only"}), ("DELETE", None)):
        response = await gw.admin(method, "/admin/tenants/acme", body)
        assert response.status_code == 409
        assert error_of(response)["code"] == "read_only"
    created = await gw.new_key("acme", "api-side")
    # Config and API keys side by side, on the config tenant's policy.
    assert (await gw.chat(created["key"], "gpt-4o")).status_code == 200
    assert (await gw.chat(CONFIG_KEY, "gpt-4o")).status_code == 200
    assert (await gw.admin("GET", "/admin/tenants/acme")).json()["policy"] == "default"


async def test_delete_a_tenant_revokes_its_keys(gw: Gateway) -> None:
    await gw.new_tenant("beta")
    keys = [await gw.new_key("beta", f"k{i}") for i in range(2)]
    for created in keys:
        assert (await gw.chat(created["key"])).status_code == 200
    response = await gw.admin("DELETE", "/admin/tenants/beta")
    assert (response.status_code, response.content) == (204, b"")
    assert (await gw.admin("GET", "/admin/tenants/beta")).status_code == 404
    assert (await gw.admin("GET", "/admin/tenants/beta/keys")).status_code == 404
    for created in keys:
        response = await gw.chat(created["key"])
        assert response.status_code == 401
        assert error_of(response)["code"] == "key_revoked"
        assert (await gw.admin("GET", f"/admin/keys/{created['id']}")).json()["revoked_at"] is not None
    assert (await gw.admin("DELETE", "/admin/tenants/beta")).status_code == 404


# --- keys -----------------------------------------------------------------------------------------------


async def test_create_a_key(gw: Gateway) -> None:
    await gw.new_tenant("beta")
    expires = in_future(86400)
    response = await gw.admin(
        "POST",
        "/admin/tenants/beta/keys",
        {
            "name": "ci",
            "expires_at": expires,
            "models": ["gpt-4o-mini"],
            "metadata": {"team": "search", "cost_center": 42},
            "budget": {"usd_per_day": 5},
            "rate_limit": {"requests_per_minute": 60},
        },
    )
    assert response.status_code == 201
    body = response.json()
    assert KEY_SHAPE.fullmatch(body["key"]), body["key"]
    assert body["key"].startswith(f"sk-gw-{body['id']}-")
    assert body["prefix"] == f"sk-gw-{body['id']}"
    assert (body["object"], body["tenant"], body["name"]) == ("api_key", "beta", "ci")
    assert parse_time(body["expires_at"]) == parse_time(expires)
    assert (body["models"], body["metadata"]) == (["gpt-4o-mini"], {"team": "search", "cost_center": 42})
    assert (body["budget"], body["rate_limit"]) == ({"usd_per_day": 5}, {"requests_per_minute": 60})
    assert (body["revoked_at"], body["last_used_at"]) == (None, None)
    assert "sha256" not in body
    # Only the hash is stored.
    stored = b"".join(value for _, value in await gw.services.store.scan(""))
    assert body["key"].encode() not in stored
    assert hash_key(body["key"]).encode() in stored


async def test_the_plaintext_key_is_shown_once(gw: Gateway) -> None:
    created = await gw.new_key("acme")
    shown = [
        (await gw.admin("GET", "/admin/tenants/acme/keys")).text,
        (await gw.admin("GET", f"/admin/keys/{created['id']}")).text,
    ]
    for text in shown:
        assert created["key"] not in text
        assert created["key"].split("-", 3)[3] not in text
        assert hash_key(created["key"]) not in text
        assert '"key"' not in text
        assert "sha256" not in text


async def test_a_keys_model_list_is_enforced_on_the_request_path(gw: Gateway) -> None:
    narrow = (await gw.new_key("acme", models=["gpt-4o-mini"]))["key"]
    assert await gw.models(narrow) == ["gpt-4o-mini"]
    assert (await gw.chat(narrow, "gpt-4o-mini")).status_code == 200
    refused = await gw.chat(narrow, "gpt-4o")
    assert (refused.status_code, error_of(refused)["code"]) == (404, "model_not_found")
    assert [r.url.path for r in gw.upstream_requests] == ["/v1/chat/completions"]  # only the allowed one went out


async def test_key_and_policy_must_both_allow_a_model(gw: Gateway) -> None:
    await gw.new_tenant("beta", policy="mini-only")
    wide = (await gw.new_key("beta", models=["gpt-4o", "gpt-4o-mini"]))["key"]
    assert await gw.models(wide) == ["gpt-4o-mini"]
    assert (await gw.chat(wide, "gpt-4o")).status_code == 404
    disjoint = (await gw.new_key("beta", models=["gpt-4o"]))["key"]
    assert await gw.models(disjoint) == []
    assert (await gw.chat(disjoint, "gpt-4o-mini")).status_code == 404
    assert (await gw.chat(disjoint, "gpt-4o")).status_code == 404
    assert gw.upstream_requests == []


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "name", "missing_required_parameter"),
        ({"name": 3}, "name", "invalid_type"),
        ({"name": "k", "models": "gpt-4o"}, "models", "invalid_type"),
        ({"name": "k", "models": ["nope"]}, "models", "invalid_request"),
        ({"name": "k", "models": [1]}, "models", "invalid_request"),
        ({"name": "k", "metadata": "x"}, "metadata", "invalid_type"),
        ({"name": "k", "expires_at": 1}, "expires_at", "invalid_type"),
        ({"name": "k", "expires_at": "soon"}, "expires_at", "invalid_request"),
        ({"name": "k", "expires_at": "2099-01-01T00:00:00"}, "expires_at", "invalid_request"),
        ({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at", "invalid_request"),
        ({"name": "k", "budget": 5}, "budget", "invalid_type"),
        ({"name": "k", "budget": {"usd_per_day": -1}}, "budget.usd_per_day", "invalid_request"),
        ({"name": "k", "rate_limit": {"rpm": 1}}, "rate_limit.rpm", "invalid_request"),
        ({"name": "k", "rate_limit": {"requests_per_minute": 0}}, "rate_limit.requests_per_minute", "invalid_request"),
    ],
)
async def test_a_bad_key_body_is_400_with_its_param(gw: Gateway, body: dict[str, Any], param: str, code: str) -> None:
    response = await gw.admin("POST", "/admin/tenants/acme/keys", body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert (error["param"], error["code"]) == (param, code)
    assert (await gw.admin("GET", "/admin/tenants/acme/keys")).json()["data"] == []


async def test_keys_of_an_unknown_tenant_are_404(gw: Gateway) -> None:
    for method in ("POST", "GET"):
        response = await gw.admin(method, "/admin/tenants/nope/keys", {"name": "k"} if method == "POST" else None)
        assert (response.status_code, error_of(response)["code"]) == (404, "tenant_not_found")


async def test_list_keys_shows_only_that_tenant(gw: Gateway) -> None:
    await gw.new_tenant("beta")
    mine = [await gw.new_key("acme", f"k{i}") for i in range(2)]
    await gw.new_key("beta", "theirs")
    response = await gw.admin("GET", "/admin/tenants/acme/keys")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert sorted(k["id"] for k in body["data"]) == sorted(k["id"] for k in mine)
    assert all(k["object"] == "api_key" and k["tenant"] == "acme" for k in body["data"])
    assert [k["name"] for k in (await gw.admin("GET", "/admin/tenants/beta/keys")).json()["data"]] == ["theirs"]


async def test_get_a_key(gw: Gateway) -> None:
    created = await gw.new_key("acme", metadata={"a": 1})
    response = await gw.admin("GET", f"/admin/keys/{created['id']}")
    assert response.status_code == 200
    expected = {name: value for name, value in created.items() if name != "key"}
    assert response.json() == expected


@pytest.mark.parametrize("key_id", [NO_SUCH_KEY, "acme-1", "..", "x" * 300])
async def test_an_unknown_key_id_is_404(gw: Gateway, key_id: str) -> None:
    for method, path in (
        ("GET", f"/admin/keys/{key_id}"),
        ("DELETE", f"/admin/keys/{key_id}"),
        ("POST", f"/admin/keys/{key_id}/rotate"),
    ):
        response = await gw.admin(method, path)
        assert response.status_code == 404, (method, response.text)
        assert error_of(response)["code"] in ("key_not_found", "not_found")
    assert (await gw.chat(CONFIG_KEY)).status_code == 200  # "acme-1", a config key's id, is not revocable here


async def test_revoke_a_key(gw: Gateway) -> None:
    created = await gw.new_key("acme")
    other = await gw.new_key("acme", "other")
    assert (await gw.chat(created["key"])).status_code == 200
    response = await gw.admin("DELETE", f"/admin/keys/{created['id']}")
    assert (response.status_code, response.content) == (204, b"")
    refused = await gw.chat(created["key"])
    assert refused.status_code == 401
    error = error_of(refused)
    assert error["code"] == "key_revoked"
    assert "revoked" in error["message"]
    assert (await gw.client.get("/v1/models", headers={"authorization": f"Bearer {created['key']}"})).status_code == 401
    assert (await gw.admin("GET", f"/admin/keys/{created['id']}")).json()["revoked_at"] is not None
    assert (await gw.chat(other["key"])).status_code == 200
    assert (await gw.admin("DELETE", f"/admin/keys/{created['id']}")).status_code == 204  # idempotent


async def test_an_expired_key_gets_401_key_expired(gw: Gateway) -> None:
    created = await gw.new_key("acme", expires_at=in_future(0.4))
    assert (await gw.chat(created["key"])).status_code == 200
    error = await eventually_refused(gw, created["key"])
    assert error["code"] == "key_expired"
    assert "expired" in error["message"]


async def test_rotate_without_grace(gw: Gateway) -> None:
    old = await gw.new_key(
        "acme", "ci", models=["gpt-4o-mini"], metadata={"team": "x"}, rate_limit={"requests_per_minute": 5}
    )
    response = await gw.admin("POST", f"/admin/keys/{old['id']}/rotate")
    assert response.status_code == 201
    new = response.json()
    assert KEY_SHAPE.fullmatch(new["key"])
    assert (new["id"] != old["id"], new["key"] != old["key"]) == (True, True)
    assert (new["tenant"], new["name"], new["models"], new["rate_limit"]) == (
        "acme",
        "ci",
        ["gpt-4o-mini"],
        {"requests_per_minute": 5},
    )
    assert new["metadata"] == {"team": "x", "rotated_from": old["id"]}
    refused = await gw.chat(old["key"])
    assert (refused.status_code, error_of(refused)["code"]) == (401, "key_revoked")
    assert (await gw.chat(new["key"])).status_code == 200
    assert (await gw.chat(new["key"], "gpt-4o")).status_code == 404  # the model list came along


async def test_rotate_with_grace_keeps_the_old_key_for_a_while(gw: Gateway) -> None:
    old = await gw.new_key("acme")
    response = await gw.admin("POST", f"/admin/keys/{old['id']}/rotate", {"grace_period_s": 3600})
    assert response.status_code == 201
    new = response.json()
    assert (await gw.chat(old["key"])).status_code == 200
    assert (await gw.chat(new["key"])).status_code == 200
    shown = (await gw.admin("GET", f"/admin/keys/{old['id']}")).json()
    assert shown["revoked_at"] is None
    expires = parse_time(shown["expires_at"])
    assert expires is not None
    assert abs((expires - datetime.now(UTC)).total_seconds() - 3600) < 60
    # A short grace period runs out.
    short = await gw.admin("POST", f"/admin/keys/{new['id']}/rotate", {"grace_period_s": 0.4})
    assert (await gw.chat(new["key"])).status_code == 200
    assert (await eventually_refused(gw, new["key"]))["code"] == "key_expired"
    assert (await gw.chat(short.json()["key"])).status_code == 200


@pytest.mark.parametrize(
    ("grace", "code"),
    [
        (-1, "invalid_request"),
        ("60", "invalid_type"),
        (True, "invalid_type"),
        ([], "invalid_type"),
        (1e300, "invalid_request"),
    ],
)
async def test_a_bad_grace_period_is_400(gw: Gateway, grace: Any, code: str) -> None:
    old = await gw.new_key("acme")
    response = await gw.admin("POST", f"/admin/keys/{old['id']}/rotate", {"grace_period_s": grace})
    assert response.status_code == 400, response.text
    assert (error_of(response)["param"], error_of(response)["code"]) == ("grace_period_s", code)
    keys = (await gw.admin("GET", "/admin/tenants/acme/keys")).json()["data"]
    assert [(k["id"], k["revoked_at"], k["expires_at"]) for k in keys] == [(old["id"], None, None)]
    assert (await gw.chat(old["key"])).status_code == 200


async def test_last_used_at_is_recorded(gw: Gateway) -> None:
    created = await gw.new_key("acme")
    assert (await gw.admin("GET", "/admin/tenants/acme/keys")).json()["data"][0]["last_used_at"] is None
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert (await gw.chat(created["key"])).status_code == 200
    await gw.services.keys.flush_last_used()  # batched: normally every 30 s and at shutdown
    used = parse_time((await gw.admin("GET", "/admin/tenants/acme/keys")).json()["data"][0]["last_used_at"])
    assert used is not None
    assert before <= used <= datetime.now(UTC) + timedelta(seconds=1)
    # The single-key view shows the same time as the list.
    shown = (await gw.admin("GET", f"/admin/keys/{created['id']}")).json()["last_used_at"]
    assert parse_time(shown) == used


async def test_identity_travels_with_the_request(
    make_gw: Callable[..., Awaitable[Gateway]], caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gw({"server": {"access_log": True}})
    created = await gw.new_key("acme")
    jwt_user = mint("acme", roles=None, sub="jwt-user")
    caplog.set_level(logging.INFO, logger="gateway.access")
    await gw.chat(created["key"], user="end-user-1")
    await gw.client.post(
        "/v1/chat/completions",
        content=orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}),
        headers={"authorization": f"Bearer {created['key']}", "x-gateway-user": "header-user"},
    )
    await gw.chat(jwt_user)
    await gw.chat(jwt_user, user="body-wins")
    await gw.client.post(
        "/v1/chat/completions",
        content=orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}),
        headers={"authorization": f"Bearer {jwt_user}", "x-gateway-user": "header-beats-claim"},
    )
    await gw.chat(CONFIG_KEY)
    lines = [record.getMessage() for record in caplog.records if record.name == "gateway.access"]
    found = [re.search(r"tenant=(\S+) key=(\S+) user=(\S+)", line) for line in lines]
    assert [m.groups() if m else None for m in found] == [
        ("acme", created["id"], "'end-user-1'"),
        ("acme", created["id"], "'header-user'"),
        ("acme", "jwt:https://idp.example.test", "'jwt-user'"),
        ("acme", "jwt:https://idp.example.test", "'body-wins'"),
        ("acme", "jwt:https://idp.example.test", "'header-beats-claim'"),
        ("acme", "acme-1", "'-'"),
    ]


async def test_a_wrong_method_is_405(gw: Gateway) -> None:
    response = await gw.admin("PUT", "/admin/tenants")
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"
