"""Authenticator: stored keys (expiry, revocation, rotation, key-level models), JWTs, cross-replica invalidation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from fake_clock import FakeClock

from gateway.config import GatewayConfig, parse_config
from gateway.errors import AuthenticationFailed
from gateway.identity.authenticator import Authenticator
from gateway.identity.jwt import JWTVerifier
from gateway.identity.keyring import KeyRing
from gateway.identity.tenants import TenantDirectory
from gateway.store.memory import MemoryStore

CONFIG_KEY = "sk-gw-config-key"
SECRET = "an-hs256-secret-of-at-least-32-bytes!!"
ISSUER = "https://idp.test"


def _config() -> GatewayConfig:
    return parse_config(
        {
            "store": {"url": "memory://"},
            "upstreams": {"u": {"base_url": "http://u.test"}},
            "models": {"m1": {"upstream": "u"}, "m2": {"upstream": "u"}},
            "policies": {"default": {}, "narrow": {"models": ["m1"]}},
            "tenants": {
                "acme": {"api_keys": [{"id": "acme-config", "key": CONFIG_KEY}]},
                "narrowco": {"policy": "narrow"},
            },
            "auth": {
                "jwt": {
                    "issuers": [
                        {
                            "issuer": ISSUER,
                            "audience": "gateway",
                            "secret": SECRET,
                            "algorithms": ["HS256"],
                            "tenant_claim": "tenant",
                            "user_claim": "email",
                            "roles_claim": "roles",
                        }
                    ]
                }
            },
        },
        "test.yaml",
        env={},
    )


def token(secret: str = SECRET, **claims: Any) -> str:
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "gateway",
        "exp": int(time.time()) + 300,
        "email": "alice@acme.test",
        "tenant": "acme",
        "roles": ["tenant-admin"],
    }
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm="HS256")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


Replica = Callable[[], Authenticator]


@pytest.fixture
async def replica(store: MemoryStore, clock: FakeClock) -> AsyncIterator[Replica]:
    """`replica()`: one more gateway process's Authenticator on the shared store."""
    made: list[Authenticator] = []

    def build() -> Authenticator:
        config = _config()
        assert config.auth.jwt is not None
        auth = Authenticator(
            store, TenantDirectory(config, store), KeyRing(config, store, clock), JWTVerifier(config.auth.jwt), clock
        )
        made.append(auth)
        return auth

    yield build
    for auth in made:
        assert auth.jwt is not None
        await auth.jwt.aclose()


@pytest.fixture
def auth(replica: Replica) -> Authenticator:
    return replica()


@contextlib.asynccontextmanager
async def watching(auth: Authenticator) -> AsyncIterator[None]:
    task = asyncio.create_task(auth.watch())
    await asyncio.sleep(0)  # let it subscribe
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def refused(auth: Authenticator, key: str) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as caught:
        await auth.authenticate(f"Bearer {key}")
    assert caught.value.status == 401
    return caught.value


async def eventually_refused(auth: Authenticator, key: str, within_s: float = 1.0) -> AuthenticationFailed:
    deadline = time.monotonic() + within_s
    while True:
        try:
            await auth.authenticate(f"Bearer {key}")
        except AuthenticationFailed as exc:
            return exc
        assert time.monotonic() < deadline, "still accepted"
        await asyncio.sleep(0.005)


# --- stored keys -------------------------------------------------------------------------------------


async def test_a_stored_key_becomes_a_principal(auth: Authenticator) -> None:
    record, key = await auth.keys.create("acme", "ci")
    principal = await auth.authenticate(f"Bearer {key}")
    assert (principal.tenant, principal.key_id, principal.policy_name) == ("acme", record.id, "default")
    assert (principal.user, principal.roles, principal.key_models, principal.key_policy) == (
        None,
        frozenset(),
        None,
        None,
    )
    assert principal.allows_model("m1")
    assert principal.allows_model("m2")


async def test_a_keys_own_limits_travel_with_the_principal(auth: Authenticator) -> None:
    _, key = await auth.keys.create(
        "acme", "ci", models=["m1"], budget={"usd_per_day": 2.5}, rate_limit={"requests_per_minute": 7}
    )
    principal = await auth.authenticate(f"Bearer {key}")
    assert principal.key_models == frozenset({"m1"})
    assert principal.key_policy is not None
    assert principal.key_policy.budget is not None
    assert principal.key_policy.budget.usd_per_day == 2.5
    assert principal.key_policy.rate_limit is not None
    assert principal.key_policy.rate_limit.requests_per_minute == 7
    assert principal.policy.budget is None  # the tenant's policy is unchanged: both travel, the stages combine


@pytest.mark.parametrize(
    ("tenant", "key_models", "allowed"),
    [
        ("acme", None, {"m1", "m2"}),
        ("acme", ["m2"], {"m2"}),
        ("acme", ["*"], {"m1", "m2"}),
        ("acme", [], set()),
        ("narrowco", None, {"m1"}),
        ("narrowco", ["m1", "m2"], {"m1"}),  # the key cannot widen its tenant's policy
        ("narrowco", ["m2"], set()),  # both must allow
        ("narrowco", ["*"], {"m1"}),
    ],
)
async def test_a_key_model_list_is_stricter_never_wider(
    auth: Authenticator, tenant: str, key_models: list[str] | None, allowed: set[str]
) -> None:
    _, key = await auth.keys.create(tenant, "k", models=key_models)
    principal = await auth.authenticate(f"Bearer {key}")
    assert {model for model in ("m1", "m2") if principal.allows_model(model)} == allowed


async def test_a_key_expires_by_the_injected_clock(auth: Authenticator, clock: FakeClock) -> None:
    _, key = await auth.keys.create("acme", "ci", expires_at="2030-01-01T12:01:00Z")
    clock.advance(59)
    assert (await auth.authenticate(f"Bearer {key}")).tenant == "acme"
    clock.advance(1)
    error = await refused(auth, key)
    assert error.code == "key_expired"
    assert error.message == "This API key expired at 2030-01-01T12:01:00Z."


async def test_a_revoked_key_says_so(auth: Authenticator, clock: FakeClock) -> None:
    record, key = await auth.keys.create("acme", "ci", expires_at="2030-01-01T12:01:00Z")
    assert (await auth.authenticate(f"Bearer {key}")).key_id == record.id  # cached from here on
    await auth.keys.revoke(record.id)
    error = await refused(auth, key)
    assert error.code == "key_revoked"
    assert error.message == "This API key was revoked at 2030-01-01T12:00:00Z."
    clock.advance(3600)  # revoked and expired: revoked is the reason
    assert (await refused(auth, key)).code == "key_revoked"


async def test_a_wrong_secret_for_a_revoked_key_reveals_nothing(auth: Authenticator) -> None:
    record, key = await auth.keys.create("acme", "ci")
    await auth.keys.revoke(record.id)
    error = await refused(auth, key[:-1] + ("A" if not key.endswith("A") else "B"))
    assert error.code == "invalid_api_key"
    assert "revoked" not in error.message


async def test_rotation_without_grace_stops_the_old_key_at_once(auth: Authenticator) -> None:
    old, old_key = await auth.keys.create("acme", "ci", models=["m1"])
    await auth.authenticate(f"Bearer {old_key}")
    new, new_key = await auth.keys.rotate(old.id, "acme", 0)
    assert (await refused(auth, old_key)).code == "key_revoked"
    principal = await auth.authenticate(f"Bearer {new_key}")
    assert (principal.key_id, principal.key_models) == (new.id, frozenset({"m1"}))


async def test_rotation_with_grace_keeps_the_old_key_for_the_grace_period(
    auth: Authenticator, clock: FakeClock
) -> None:
    old, old_key = await auth.keys.create("acme", "ci")
    await auth.authenticate(f"Bearer {old_key}")
    _, new_key = await auth.keys.rotate(old.id, "acme", 120)
    clock.advance(119)
    assert (await auth.authenticate(f"Bearer {old_key}")).key_id == old.id
    clock.advance(1)
    assert (await refused(auth, old_key)).code == "key_expired"
    clock.advance(86400)
    assert (await auth.authenticate(f"Bearer {new_key}")).tenant == "acme"


async def test_a_deleted_tenants_keys_are_revoked(auth: Authenticator) -> None:
    await auth.tenants.create("beta", "default", {})
    _, key = await auth.keys.create("beta", "ci")
    await auth.authenticate(f"Bearer {key}")
    await auth.tenants.delete("beta")
    await auth.keys.revoke_all("beta")
    assert (await refused(auth, key)).code == "key_revoked"


async def test_a_key_of_a_tenant_that_no_longer_exists_is_refused(auth: Authenticator, store: MemoryStore) -> None:
    await auth.tenants.create("beta", "default", {})
    _, key = await auth.keys.create("beta", "ci")
    await store.delete("tenant:beta")  # gone without its keys being revoked (an old store, a manual edit)
    auth.forget(b"tenant:beta")
    error = await refused(auth, key)
    assert error.code == "unknown_tenant"


# --- invalidation across replicas -----------------------------------------------------------------------


async def test_a_revocation_reaches_another_replica_through_the_store(replica: Replica) -> None:
    one, two = replica(), replica()
    record, key = await one.keys.create("acme", "ci")
    assert (await two.authenticate(f"Bearer {key}")).key_id == record.id  # two has it cached now
    async with watching(two):
        await one.keys.revoke(record.id)
        assert (await eventually_refused(two, key)).code == "key_revoked"


async def test_without_the_message_a_replica_serves_from_its_cache(replica: Replica) -> None:
    one, two = replica(), replica()
    record, key = await one.keys.create("acme", "ci")
    await two.authenticate(f"Bearer {key}")
    await one.keys.revoke(record.id)  # nobody is watching on two
    assert (await two.authenticate(f"Bearer {key}")).key_id == record.id
    two.forget(f"key:{record.id}".encode())
    assert (await refused(two, key)).code == "key_revoked"


async def test_a_tenant_change_reaches_another_replica(replica: Replica) -> None:
    one, two = replica(), replica()
    await one.tenants.create("beta", "default", {})
    _, key = await one.keys.create("beta", "ci")
    assert (await two.authenticate(f"Bearer {key}")).allows_model("m2")
    async with watching(two):
        await one.tenants.update("beta", None, {"models": ["m1"]})
        deadline = time.monotonic() + 1
        while (await two.authenticate(f"Bearer {key}")).allows_model("m2"):
            assert time.monotonic() < deadline, "the new policy never arrived"
            await asyncio.sleep(0.005)
    assert (await two.authenticate(f"Bearer {key}")).allows_model("m1")


async def test_a_tenant_deletion_reaches_another_replica(replica: Replica) -> None:
    one, two = replica(), replica()
    await one.tenants.create("beta", "default", {})
    _, key = await one.keys.create("beta", "ci")
    await two.authenticate(f"Bearer {key}")
    async with watching(two):
        await one.tenants.delete("beta")
        await one.keys.revoke_all("beta")
        assert (await eventually_refused(two, key)).code in ("key_revoked", "unknown_tenant")


async def test_any_invalidation_clears_cached_config_principals(auth: Authenticator) -> None:
    first = await auth.authenticate(f"Bearer {CONFIG_KEY}")
    assert await auth.authenticate(f"Bearer {CONFIG_KEY}") is first
    auth.forget(b"key:0123456789abcdef")
    assert await auth.authenticate(f"Bearer {CONFIG_KEY}") is not first
    auth.forget(b"something-else")  # an unknown kind is harmless


async def test_flush_periodically_records_last_used_at(auth: Authenticator, store: MemoryStore) -> None:
    record, key = await auth.keys.create("acme", "ci")
    await auth.authenticate(f"Bearer {key}")
    task = asyncio.create_task(auth.flush_periodically(every_s=0.01))
    try:
        deadline = time.monotonic() + 1
        while await store.get(f"apikey-used:{record.id}") is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await store.get(f"apikey-used:{record.id}") == b"2030-01-01T12:00:00Z"


# --- JWTs ---------------------------------------------------------------------------------------------


async def test_a_jwt_principal_carries_tenant_user_and_roles(auth: Authenticator) -> None:
    principal = await auth.authenticate(f"Bearer {token(roles=['tenant-admin', 'reader'])}")
    assert (principal.tenant, principal.key_id, principal.policy_name) == ("acme", f"jwt:{ISSUER}", "default")
    assert principal.user == "alice@acme.test"
    assert principal.roles == frozenset({"tenant-admin", "reader"})
    assert principal.key_models is None


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        ("tenant-admin", {"tenant-admin"}),
        ("reader tenant-admin", {"reader", "tenant-admin"}),
        (["tenant-admin"], {"tenant-admin"}),
        (None, set()),
    ],
)
async def test_the_roles_claim_may_be_a_string_or_a_list(
    auth: Authenticator, roles: str | list[str] | None, expected: set[str]
) -> None:
    principal = await auth.authenticate(f"Bearer {token(roles=roles)}")
    assert principal.roles == frozenset(expected)


async def test_a_jwt_gets_its_tenants_policy_with_overrides(auth: Authenticator) -> None:
    await auth.tenants.create("beta", "narrow", {"models": ["m2"]})
    principal = await auth.authenticate(f"Bearer {token(tenant='beta', email=None)}")
    assert (principal.tenant, principal.policy_name, principal.user) == ("beta", "narrow", None)
    assert principal.allows_model("m2")
    assert not principal.allows_model("m1")
    narrow = await auth.authenticate(f"Bearer {token(tenant='narrowco')}")
    assert narrow.allows_model("m1")
    assert not narrow.allows_model("m2")


async def test_a_jwt_for_an_unknown_tenant_is_refused(auth: Authenticator) -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        await auth.authenticate(f"Bearer {token(tenant='nobody')}")
    assert (caught.value.status, caught.value.code) == (401, "unknown_tenant")


@pytest.mark.parametrize(
    "bad",
    [
        token(secret="another-secret-that-is-32-bytes-long!"),
        token(exp=int(time.time()) - 3600),
        token(aud="someone-else"),
        token(iss="https://evil.test"),
        token(tenant=None),
    ],
    ids=["wrong-secret", "expired", "audience", "issuer", "no-tenant"],
)
async def test_a_bad_jwt_is_refused(auth: Authenticator, bad: str) -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        await auth.authenticate(f"Bearer {bad}")
    assert caught.value.status == 401
    assert bad not in caught.value.message
