"""TenantDirectory: config tenants (read-only), API tenants in the store, overrides, caching, invalidation."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson
import pytest

from gateway.config import GatewayConfig, parse_config
from gateway.config.schema import PolicyConfig
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.identity import tenants as tenants_module
from gateway.identity.tenants import CHANNEL, TenantDirectory
from gateway.store.memory import MemoryStore


def _config() -> GatewayConfig:
    return parse_config(
        {
            "store": {"url": "memory://"},
            "upstreams": {"u": {"base_url": "http://u.test"}},
            "models": {"m1": {"upstream": "u"}, "m2": {"upstream": "u"}},
            "policies": {
                "default": {},
                "narrow": {"models": ["m1"], "rate_limit": {"requests_per_minute": 60}},
            },
            "tenants": {"acme": {"policy": "narrow", "api_keys": [{"id": "acme-1", "key": "sk-gw-acme"}]}},
        },
        "test.yaml",
        env={},
    )


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def tenants(store: MemoryStore) -> TenantDirectory:
    return TenantDirectory(_config(), store)


async def test_a_config_tenant_is_listed_and_resolved(tenants: TenantDirectory) -> None:
    record = await tenants.get("acme")
    assert (record.id, record.policy, record.source, record.overrides) == ("acme", "narrow", "config", {})
    assert record.public()["object"] == "tenant"
    resolved = await tenants.resolve("acme")
    assert resolved is not None
    assert resolved[1].models == ["m1"]
    assert [t.id for t in await tenants.list()] == ["acme"]


async def test_an_api_tenant_is_stored_listed_and_resolved(tenants: TenantDirectory, store: MemoryStore) -> None:
    created = await tenants.create("beta", "default", {"models": ["m2"]})
    assert (created.id, created.policy, created.overrides, created.source) == (
        "beta",
        "default",
        {"models": ["m2"]},
        "api",
    )
    assert created.created_at is not None
    assert created.created_at.endswith("Z")
    stored = orjson.loads(await store.get("tenant:beta") or b"null")
    assert stored["id"] == "beta"
    assert "source" not in stored
    await tenants.create("aaa", "default", {})
    assert [(t.id, t.source) for t in await tenants.list()] == [("aaa", "api"), ("acme", "config"), ("beta", "api")]
    # A second directory (another replica) on the same store sees it.
    other = TenantDirectory(_config(), store)
    resolved = await other.resolve("beta")
    assert resolved is not None
    assert resolved[0] == created
    assert resolved[1].allows_model("m2")
    assert not resolved[1].allows_model("m1")


async def test_creating_an_existing_tenant_is_a_conflict(tenants: TenantDirectory) -> None:
    await tenants.create("beta", "default", {})
    for taken in ("beta", "acme"):
        with pytest.raises(Conflict) as caught:
            await tenants.create(taken, "default", {})
        assert (caught.value.status, caught.value.code, caught.value.param) == (409, "already_exists", "id")


@pytest.mark.parametrize("bad", ["", "Beta", "-beta", ".beta", "be ta", "a:b", "a/b", "x" * 64, "é"])
async def test_a_tenant_id_is_checked(tenants: TenantDirectory, bad: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await tenants.create(bad, "default", {})
    assert (caught.value.status, caught.value.param) == (400, "id")
    assert await tenants.list() == [await tenants.get("acme")]


async def test_the_longest_tenant_id_is_accepted(tenants: TenantDirectory) -> None:
    assert (await tenants.create("x" * 63, "default", {})).id == "x" * 63
    assert (await tenants.create("0a._-", "default", {})).id == "0a._-"


async def test_an_unknown_policy_is_refused(tenants: TenantDirectory) -> None:
    with pytest.raises(InvalidRequest, match="Unknown policy 'gold'") as caught:
        await tenants.create("beta", "gold", {})
    assert caught.value.param == "policy"
    assert await tenants.resolve("beta") is None


def test_overrides_apply_over_the_named_policy(tenants: TenantDirectory) -> None:
    policy = tenants.effective_policy("narrow", {"budget": {"usd_per_day": 5}})
    assert policy.models == ["m1"]  # kept from the policy
    assert policy.rate_limit is not None
    assert policy.rate_limit.requests_per_minute == 60
    assert policy.budget is not None
    assert policy.budget.usd_per_day == 5
    replaced = tenants.effective_policy("narrow", {"models": ["m2"]})
    assert replaced.models == ["m2"]
    assert tenants.effective_policy("narrow", {}) == PolicyConfig.model_validate(
        {"models": ["m1"], "rate_limit": {"requests_per_minute": 60}}
    )


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"models": "m1"}, "overrides.models"),
        ({"models": ["nope"]}, "overrides.models"),
        ({"colour": "red"}, "overrides.colour"),
        ({"budget": {"usd_per_day": -1}}, "overrides.budget.usd_per_day"),
        ({"rate_limit": {"requests_per_minute": "many"}}, "overrides.rate_limit.requests_per_minute"),
    ],
)
async def test_overrides_are_validated_like_the_config(
    tenants: TenantDirectory, overrides: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await tenants.create("beta", "default", overrides)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert await tenants.resolve("beta") is None


async def test_a_config_tenant_is_read_only(tenants: TenantDirectory) -> None:
    for change in (tenants.update("acme", "default", None), tenants.delete("acme")):
        with pytest.raises(Conflict) as caught:
            await change
        assert (caught.value.status, caught.value.code) == (409, "read_only")
    assert (await tenants.get("acme")).policy == "narrow"


async def test_unknown_tenants_are_404(tenants: TenantDirectory) -> None:
    for action in (tenants.get("nope"), tenants.update("nope", "default", None), tenants.delete("nope")):
        with pytest.raises(NotFound) as caught:
            await action
        assert (caught.value.status, caught.value.code, caught.value.param) == (404, "tenant_not_found", "id")


async def test_update_and_delete_publish_an_invalidation(tenants: TenantDirectory, store: MemoryStore) -> None:
    async with store.subscribe(CHANNEL) as messages:
        await tenants.create("beta", "default", {})
        updated = await tenants.update("beta", "narrow", None)
        assert (updated.policy, updated.overrides) == ("narrow", {})
        kept = await tenants.update("beta", None, {"models": ["m2"]})
        assert (kept.policy, kept.overrides) == ("narrow", {"models": ["m2"]})
        await tenants.delete("beta")
        received = [await asyncio.wait_for(messages.__anext__(), 1) for _ in range(4)]
    assert received == [b"tenant:beta"] * 4
    assert await tenants.resolve("beta") is None
    assert await store.get("tenant:beta") is None


async def test_an_update_is_validated_and_changes_nothing_when_refused(tenants: TenantDirectory) -> None:
    await tenants.create("beta", "default", {"models": ["m2"]})
    with pytest.raises(InvalidRequest):
        await tenants.update("beta", "gold", None)
    with pytest.raises(InvalidRequest):
        await tenants.update("beta", None, {"models": ["nope"]})
    record = await tenants.get("beta")
    assert (record.policy, record.overrides) == ("default", {"models": ["m2"]})


async def test_resolve_is_cached_until_forgotten(tenants: TenantDirectory, store: MemoryStore) -> None:
    await tenants.create("beta", "default", {"models": ["m2"]})
    before = await tenants.resolve("beta")
    # Another replica changes the store behind this one's back: the cache still answers.
    await store.set("tenant:beta", orjson.dumps({"id": "beta", "policy": "default", "overrides": {"models": ["m1"]}}))
    assert await tenants.resolve("beta") == before
    tenants.forget("beta")
    after = await tenants.resolve("beta")
    assert after is not None
    assert after[1].models == ["m1"]


async def test_an_unknown_tenant_is_not_cached(tenants: TenantDirectory, store: MemoryStore) -> None:
    assert await tenants.resolve("later") is None
    await TenantDirectory(_config(), store).create("later", "default", {})
    assert await tenants.resolve("later") is not None


async def test_a_lost_invalidation_is_bounded_by_the_cache_ttl(
    tenants: TenantDirectory, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(tenants_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    await tenants.create("beta", "default", {})
    assert await tenants.resolve("beta") is not None
    await store.delete("tenant:beta")  # deleted elsewhere, and the message never arrived
    now[0] += tenants_module.CACHE_TTL_S - 1
    assert await tenants.resolve("beta") is not None
    now[0] += 2
    assert await tenants.resolve("beta") is None
