"""Isolation: nothing tenant A holds (an API key, a tenant-admin JWT) reads, changes or spends anything of tenant B."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from .conftest import ADMIN_KEY, Gateway, error_of, mint

B_ONLY_MODEL = "gpt-4o"  # in beta's overrides, not in alpha's


@dataclass
class World:
    gw: Gateway
    a_key: dict[str, Any]  # alpha's API key (the admin API's answer, with "key")
    b_key: dict[str, Any]
    a_admin: str  # alpha's tenant-admin JWT
    b_admin: str

    async def snapshot(self) -> Any:
        """Everything of beta's that the gateway admin sees."""
        tenant = (await self.gw.admin("GET", "/admin/tenants/beta")).json()
        keys = (await self.gw.admin("GET", "/admin/tenants/beta/keys")).json()["data"]
        return tenant, sorted(keys, key=lambda k: k["id"])


@pytest.fixture
async def world(gw: Gateway) -> World:
    await gw.new_tenant("alpha", overrides={"models": ["gpt-4o-mini"]})
    await gw.new_tenant("beta", overrides={"models": [B_ONLY_MODEL, "gpt-4o-mini"]})
    return World(gw, await gw.new_key("alpha", "a"), await gw.new_key("beta", "b"), mint("alpha"), mint("beta"))


def b_targets(world: World) -> list[tuple[str, str, Any]]:
    """Every admin call that names something of beta's."""
    b_id = world.b_key["id"]
    return [
        ("GET", "/admin/tenants/beta", None),
        ("PATCH", "/admin/tenants/beta", {"overrides": {"models": ["gpt-4o-mini"]}}),
        ("DELETE", "/admin/tenants/beta", None),
        ("GET", "/admin/tenants/beta/keys", None),
        ("POST", "/admin/tenants/beta/keys", {"name": "planted"}),
        ("GET", f"/admin/keys/{b_id}", None),
        ("DELETE", f"/admin/keys/{b_id}", None),
        ("POST", f"/admin/keys/{b_id}/rotate", {"grace_period_s": 0}),
    ]


def for_nothing(world: World, path: str) -> str:
    """The path with beta's ids replaced by ids that exist nowhere."""
    return path.replace("/beta", "/no-such-tenant").replace(world.b_key["id"], "0" * 16)


async def test_a_tenant_admin_gets_404_for_everything_of_another_tenant(world: World) -> None:
    before = await world.snapshot()
    for method, path, body in b_targets(world):
        response = await world.gw.admin(method, path, body, auth=world.a_admin)
        assert response.status_code == 404, (method, path, response.text)
        error = error_of(response)
        assert error["code"] in ("tenant_not_found", "key_not_found"), error
        # Exactly what an id that does not exist gets: the answer reveals nothing.
        nothing = await world.gw.admin(method, for_nothing(world, path), body, auth=world.a_admin)
        assert nothing.status_code == 404
        other = error_of(nothing)
        assert (other["code"], other["type"], other["param"]) == (error["code"], error["type"], error["param"])
    assert await world.snapshot() == before
    assert (await world.gw.chat(world.b_key["key"], B_ONLY_MODEL)).status_code == 200


async def test_a_tenant_api_key_gets_nothing_of_the_admin_api(world: World) -> None:
    before = await world.snapshot()
    for method, path, body in [
        *b_targets(world),
        ("GET", "/admin/tenants", None),
        ("GET", "/admin/tenants/alpha/keys", None),
        ("POST", "/admin/tenants/alpha/keys", {"name": "x"}),
    ]:
        response = await world.gw.admin(method, path, body, auth=world.a_key["key"])
        assert response.status_code == 403, (method, path, response.text)
        assert "beta" not in response.text
        assert world.b_key["id"] not in response.text
    assert await world.snapshot() == before


async def test_lists_show_only_the_callers_tenant(world: World) -> None:
    tenants = (await world.gw.admin("GET", "/admin/tenants", auth=world.a_admin)).json()
    assert tenants["object"] == "list"
    assert [t["id"] for t in tenants["data"]] == ["alpha"]
    keys = (await world.gw.admin("GET", "/admin/tenants/alpha/keys", auth=world.a_admin)).json()["data"]
    assert [k["id"] for k in keys] == [world.a_key["id"]]
    b_keys = (await world.gw.admin("GET", "/admin/tenants/beta/keys", auth=world.b_admin)).json()["data"]
    assert [k["id"] for k in b_keys] == [world.b_key["id"]]
    assert (await world.gw.admin("GET", "/admin/tenants", auth=ADMIN_KEY)).json()["data"][1:] == [
        (await world.gw.admin("GET", "/admin/tenants/alpha")).json(),
        (await world.gw.admin("GET", "/admin/tenants/beta")).json(),
    ]


async def test_a_key_a_tenant_admin_creates_belongs_to_its_own_tenant(world: World) -> None:
    created = await world.gw.new_key("alpha", "by-token", auth=world.a_admin, models=[B_ONLY_MODEL, "gpt-4o-mini"])
    assert created["tenant"] == "alpha"
    # Asking for beta's model on the key does not widen alpha's policy.
    assert await world.gw.models(created["key"]) == ["gpt-4o-mini"]
    assert (await world.gw.chat(created["key"], B_ONLY_MODEL)).status_code == 404
    assert created["id"] not in str(await world.snapshot())


async def test_a_tenant_admin_cannot_revoke_or_rotate_another_tenants_key(world: World) -> None:
    b_id = world.b_key["id"]
    assert (await world.gw.admin("DELETE", f"/admin/keys/{b_id}", auth=world.a_admin)).status_code == 404
    assert (await world.gw.admin("POST", f"/admin/keys/{b_id}/rotate", {}, auth=world.a_admin)).status_code == 404
    assert (await world.gw.chat(world.b_key["key"])).status_code == 200
    shown = (await world.gw.admin("GET", f"/admin/keys/{b_id}")).json()
    assert (shown["revoked_at"], shown["expires_at"]) == (None, None)
    # While beta's own admin can.
    assert (await world.gw.admin("DELETE", f"/admin/keys/{b_id}", auth=world.b_admin)).status_code == 204
    assert error_of(await world.gw.chat(world.b_key["key"]))["code"] == "key_revoked"


@pytest.mark.parametrize("credential", ["a_key", "a_admin"])
async def test_a_cannot_spend_on_b_only_models(world: World, credential: str) -> None:
    secret = world.a_key["key"] if credential == "a_key" else world.a_admin
    refused = await world.gw.chat(secret, B_ONLY_MODEL)
    assert (refused.status_code, error_of(refused)["code"]) == (404, "model_not_found")
    assert B_ONLY_MODEL not in await world.gw.models(secret)
    models = await world.gw.client.get(f"/v1/models/{B_ONLY_MODEL}", headers={"authorization": f"Bearer {secret}"})
    assert models.status_code == 404
    assert world.gw.upstream_requests == []
    assert (await world.gw.chat(secret, "gpt-4o-mini")).status_code == 200
    assert (await world.gw.chat(world.b_key["key"], B_ONLY_MODEL)).status_code == 200


async def test_an_a_key_never_authenticates_as_b(world: World) -> None:
    a_secret = world.a_key["key"].split("-", 3)[3]
    b_secret = world.b_key["key"].split("-", 3)[3]
    for forged in (f"sk-gw-{world.b_key['id']}-{a_secret}", f"sk-gw-{world.a_key['id']}-{b_secret}"):
        response = await world.gw.chat(forged)
        assert (response.status_code, error_of(response)["code"]) == (401, "invalid_api_key")
    # The key itself is alpha's, whatever it asks for.
    assert await world.gw.models(world.a_key["key"]) == ["gpt-4o-mini"]
    assert await world.gw.models(world.b_key["key"]) == ["gpt-4o", "gpt-4o-mini"]


async def test_a_token_signed_for_a_is_not_valid_for_b(world: World) -> None:
    forged = mint("beta", secret="not-the-issuer-secret-but-long-enough-0123")
    for response in (
        await world.gw.admin("GET", "/admin/tenants/beta", auth=forged),
        await world.gw.chat(forged, B_ONLY_MODEL),
    ):
        assert response.status_code == 401
    # A token for alpha that also claims beta's roles is still alpha's.
    token = mint("alpha", roles=["tenant-admin", "beta:tenant-admin"])
    assert (await world.gw.admin("GET", "/admin/tenants/beta", auth=token)).status_code == 404


async def test_deleting_b_does_not_touch_a(world: World) -> None:
    assert (await world.gw.admin("DELETE", "/admin/tenants/beta")).status_code == 204
    assert error_of(await world.gw.chat(world.b_key["key"]))["code"] == "key_revoked"
    assert (await world.gw.chat(world.a_key["key"])).status_code == 200
    assert (await world.gw.chat(world.a_admin)).status_code == 200
    assert (await world.gw.admin("GET", f"/admin/keys/{world.a_key['id']}")).json()["revoked_at"] is None
    # beta's admin token has no tenant any more.
    assert (await world.gw.admin("GET", "/admin/tenants", auth=world.b_admin)).status_code == 401


async def test_a_config_tenant_and_an_api_tenant_are_isolated_too(world: World) -> None:
    acme_admin = mint("acme")
    assert (await world.gw.admin("GET", "/admin/tenants/alpha", auth=acme_admin)).status_code == 404
    assert (await world.gw.admin("GET", "/admin/tenants/acme", auth=world.a_admin)).status_code == 404
    assert (await world.gw.admin("GET", f"/admin/keys/{world.a_key['id']}", auth=acme_admin)).status_code == 404
    acme_key = await world.gw.new_key("acme", auth=acme_admin)
    assert (await world.gw.admin("DELETE", f"/admin/keys/{acme_key['id']}", auth=world.a_admin)).status_code == 404
    assert (await world.gw.chat(acme_key["key"])).status_code == 200
