"""KeyRing: config key hashes, stored keys, listing, revocation, rotation, last_used_at, caching."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from fake_clock import FakeClock

from gateway.config import GatewayConfig, parse_config
from gateway.errors import NotFound
from gateway.identity.keyring import KeyRing
from gateway.identity.keys import KeyRecord, format_time, hash_key, parse_time
from gateway.identity.tenants import CHANNEL
from gateway.store.memory import MemoryStore

CONFIG_KEY = "sk-gw-config-plain"
HASHED_KEY = "sk-gw-config-hashed"


def _config() -> GatewayConfig:
    return parse_config(
        {
            "store": {"url": "memory://"},
            "upstreams": {"u": {"base_url": "http://u.test"}},
            "models": {"m1": {"upstream": "u"}},
            "tenants": {
                "acme": {"api_keys": [{"id": "acme-plain", "key": CONFIG_KEY}]},
                "globex": {"api_keys": [{"id": "globex-hashed", "sha256": hash_key(HASHED_KEY)}]},
            },
        },
        "test.yaml",
        env={},
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def ring(store: MemoryStore, clock: FakeClock) -> KeyRing:
    return KeyRing(_config(), store, clock)


def test_config_keys_are_held_by_hash_only(ring: KeyRing) -> None:
    assert ring.configured == {
        hash_key(CONFIG_KEY): ("acme", "acme-plain"),
        hash_key(HASHED_KEY): ("globex", "globex-hashed"),
    }


async def test_a_created_key_is_stored_as_a_hash_only(ring: KeyRing, store: MemoryStore, clock: FakeClock) -> None:
    record, key = await ring.create(
        "acme",
        "ci",
        expires_at="2031-01-01T00:00:00Z",
        models=["m1"],
        metadata={"team": "x"},
        budget={"usd_per_day": 5.0},
        rate_limit={"requests_per_minute": 10},
    )
    assert key.startswith(f"sk-gw-{record.id}-")
    assert record.sha256 == hash_key(key)
    assert (record.tenant, record.name, record.created_at) == ("acme", "ci", "2030-01-01T12:00:00Z")
    assert (record.models, record.metadata, record.expires_at) == (["m1"], {"team": "x"}, "2031-01-01T00:00:00Z")
    everything = await store.scan("")
    assert sorted(name for name, _ in everything) == [f"apikey:{record.id}", f"tenantkey:acme:{record.id}"]
    secret = key.split("-", 3)[3]  # the secret may hold "-" itself
    for _, value in everything:
        assert key.encode() not in value
        assert secret.encode() not in value
    assert KeyRecord.loads(await store.get(f"apikey:{record.id}") or b"") == record


async def test_find_needs_the_whole_key(ring: KeyRing) -> None:
    record, key = await ring.create("acme", "ci")
    assert await ring.find(key) == record
    for wrong in (key[:-1], key + "A", key[:-2] + "AA" if not key.endswith("AA") else key[:-2] + "BB", CONFIG_KEY):
        assert await ring.find(wrong) is None
    # Another key's secret with this key's id does not match either.
    _, other = await ring.create("acme", "other")
    assert await ring.find(f"sk-gw-{record.id}-{other.split('-', 3)[3]}") is None


async def test_unknown_ids_are_not_cached(ring: KeyRing, store: MemoryStore, clock: FakeClock) -> None:
    assert await ring.find("sk-gw-0123456789abcdef-" + "a" * 43) is None
    assert await ring.get_record("0123456789abcdef") is None
    # The record appears later (created by another replica or the CLI): found at once.
    _, key = await KeyRing(_config(), store, clock).create("acme", "ci")
    assert await ring.find(key) is not None


async def test_records_are_cached_until_forgotten(ring: KeyRing, store: MemoryStore) -> None:
    record, key = await ring.create("acme", "ci")
    assert await ring.find(key) == record
    changed = KeyRecord.loads(await store.get(f"apikey:{record.id}") or b"")
    changed.revoked_at = "2030-01-01T00:00:00Z"
    await store.set(f"apikey:{record.id}", changed.dumps())
    assert (await ring.get_record(record.id)) == record  # still the cached one
    ring.forget(record.id)
    assert (await ring.get_record(record.id)) == changed


async def test_list_shows_one_tenants_keys_without_keys_or_hashes(ring: KeyRing) -> None:
    mine = [await ring.create("acme", f"k{i}") for i in range(3)]
    theirs, their_key = await ring.create("acme2", "other")
    listed = await ring.list("acme")
    assert sorted(item["id"] for item in listed) == sorted(record.id for record, _ in mine)
    text = orjson.dumps(listed).decode()
    for record, key in [*mine, (theirs, their_key)]:
        assert key not in text
        assert record.sha256 not in text
    assert all("sha256" not in item and "key" not in item for item in listed)
    assert all(item["prefix"] == f"sk-gw-{item['id']}" for item in listed)
    assert [item["id"] for item in await ring.list("acme2")] == [theirs.id]
    assert await ring.list("nobody") == []


async def test_get_hides_another_tenants_key(ring: KeyRing) -> None:
    record, _ = await ring.create("acme", "ci")
    assert await ring.get(record.id) == record
    assert await ring.get(record.id, "acme") == record
    for key_id, tenant in ((record.id, "globex"), ("0123456789abcdef", None), ("acme-plain", "acme")):
        with pytest.raises(NotFound) as caught:
            await ring.get(key_id, tenant)
        assert (caught.value.status, caught.value.code) == (404, "key_not_found")
        assert caught.value.message == f"No API key {key_id!r}."  # the same answer whoever owns it


async def test_revoke_marks_forgets_and_publishes(ring: KeyRing, store: MemoryStore, clock: FakeClock) -> None:
    record, key = await ring.create("acme", "ci")
    await ring.find(key)  # cached now
    async with store.subscribe(CHANNEL) as messages:
        revoked = await ring.revoke(record.id, "acme")
        assert await asyncio.wait_for(messages.__anext__(), 1) == f"key:{record.id}".encode()
    assert revoked.revoked_at == "2030-01-01T12:00:00Z"
    found = await ring.find(key)
    assert found is not None
    assert found.revoked_at == "2030-01-01T12:00:00Z"
    clock.advance(60)
    again = await ring.revoke(record.id)
    assert again.revoked_at == "2030-01-01T12:00:00Z"  # the first revocation time is kept


async def test_revoking_another_tenants_key_changes_nothing(ring: KeyRing, store: MemoryStore) -> None:
    record, _ = await ring.create("acme", "ci")
    with pytest.raises(NotFound):
        await ring.revoke(record.id, "globex")
    assert (await ring.get(record.id)).revoked_at is None


async def test_revoke_after_a_grace_period_sets_the_expiry(ring: KeyRing, clock: FakeClock) -> None:
    record, _ = await ring.create("acme", "ci")
    later = await ring.revoke(record.id, after_s=90)
    assert (later.revoked_at, later.expires_at) == (None, "2030-01-01T12:01:30Z")
    # A grace period never extends a key that expires sooner.
    soon, _ = await ring.create("acme", "soon", expires_at="2030-01-01T12:00:30Z")
    kept = await ring.revoke(soon.id, after_s=3600)
    assert kept.expires_at == "2030-01-01T12:00:30Z"


async def test_a_grace_period_never_extends_an_expiry_within_the_same_second(ring: KeyRing, clock: FakeClock) -> None:
    record, _ = await ring.create("acme", "ci", expires_at="2030-01-01T12:00:01Z")
    clock.now = datetime(2030, 1, 1, 12, 0, 0, 750000, tzinfo=UTC)
    kept = await ring.revoke(record.id, after_s=0.5)  # would end at 12:00:01.25, after the key's own expiry
    assert parse_time(kept.expires_at) == datetime(2030, 1, 1, 12, 0, 1, tzinfo=UTC)
    shorter = await ring.revoke(record.id, after_s=0.1)  # ends at 12:00:00.85: earlier, so it applies
    assert parse_time(shorter.expires_at) == datetime(2030, 1, 1, 12, 0, 0, 850000, tzinfo=UTC)


async def test_rotation_without_grace_revokes_the_old_key_at_once(ring: KeyRing, clock: FakeClock) -> None:
    old, old_key = await ring.create("acme", "ci", models=["m1"], metadata={"team": "x"}, budget={"usd_per_day": 1.0})
    new, new_key = await ring.rotate(old.id, "acme", 0)
    assert new.id != old.id
    assert new_key != old_key
    assert (new.tenant, new.name, new.models, new.budget) == ("acme", "ci", ["m1"], {"usd_per_day": 1.0})
    assert new.metadata == {"team": "x", "rotated_from": old.id}
    assert (await ring.get(old.id)).revoked_at == "2030-01-01T12:00:00Z"
    assert (await ring.get(new.id)).revoked_at is None
    assert await ring.find(new_key) == new


async def test_rotation_with_grace_lets_the_old_key_expire_later(ring: KeyRing, clock: FakeClock) -> None:
    old, _ = await ring.create("acme", "ci")
    new, _ = await ring.rotate(old.id, None, 300)
    stored = await ring.get(old.id)
    assert stored.revoked_at is None
    assert stored.expires_at == format_time(clock.now + timedelta(seconds=300))
    assert not stored.expired(clock.now + timedelta(seconds=299))
    assert stored.expired(clock.now + timedelta(seconds=300))
    assert (await ring.get(new.id)).expires_at is None


async def test_rotating_another_tenants_key_creates_nothing(ring: KeyRing) -> None:
    old, _ = await ring.create("acme", "ci")
    with pytest.raises(NotFound):
        await ring.rotate(old.id, "globex", 0)
    assert [item["id"] for item in await ring.list("acme")] == [old.id]
    assert await ring.list("globex") == []
    assert (await ring.get(old.id)).revoked_at is None


async def test_revoke_all_touches_only_that_tenant(ring: KeyRing) -> None:
    mine = [(await ring.create("acme", f"k{i}"))[0] for i in range(3)]
    theirs, _ = await ring.create("acme-2", "other")  # a tenant whose id starts with the other's
    await ring.revoke_all("acme")
    for record in mine:
        assert (await ring.get(record.id)).revoked_at is not None
    assert (await ring.get(theirs.id)).revoked_at is None


async def test_last_used_at_is_batched(ring: KeyRing, store: MemoryStore, clock: FakeClock) -> None:
    record, key = await ring.create("acme", "ci")
    assert (await ring.list("acme"))[0]["last_used_at"] is None
    await ring.find(key)
    clock.advance(5)
    await ring.find(key)
    assert await store.get(f"apikey-used:{record.id}") is None  # not on the request path
    await ring.flush_last_used()
    assert (await ring.list("acme"))[0]["last_used_at"] == "2030-01-01T12:00:05Z"
    await store.delete(f"apikey-used:{record.id}")
    await ring.flush_last_used()  # nothing new since the last flush: nothing written
    assert await store.get(f"apikey-used:{record.id}") is None


async def test_a_wrong_secret_does_not_count_as_a_use(ring: KeyRing, store: MemoryStore) -> None:
    record, key = await ring.create("acme", "ci")
    assert await ring.find(key[:-1] + ("A" if not key.endswith("A") else "B")) is None
    await ring.flush_last_used()
    assert await store.get(f"apikey-used:{record.id}") is None


async def test_a_refused_key_does_not_count_as_a_use(ring: KeyRing, store: MemoryStore, clock: FakeClock) -> None:
    revoked, revoked_key = await ring.create("acme", "revoked")
    await ring.revoke(revoked.id)
    expired, expired_key = await ring.create("acme", "expired", expires_at="2030-01-01T12:00:10Z")
    clock.advance(10)
    assert await ring.find(revoked_key) is not None  # found, so the caller can say why it is refused
    assert await ring.find(expired_key) is not None
    await ring.flush_last_used()
    assert await store.get(f"apikey-used:{revoked.id}") is None
    assert await store.get(f"apikey-used:{expired.id}") is None
