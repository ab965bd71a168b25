"""Virtual keys: their format, their hash, RFC 3339 times and the record the store keeps."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from gateway.identity.keys import (
    KEY_PREFIX,
    KeyRecord,
    format_time,
    hash_key,
    key_id_of,
    new_key,
    parse_time,
)

KEY_SHAPE = re.compile(r"sk-gw-([0-9a-f]{16})-([A-Za-z0-9_-]+)")


def test_a_new_key_has_the_gateway_format_and_32_random_bytes() -> None:
    key_id, key = new_key()
    match = KEY_SHAPE.fullmatch(key)
    assert match is not None, key
    assert key.startswith(KEY_PREFIX)
    assert KEY_PREFIX == "sk-gw-"
    assert match.group(1) == key_id
    secret = match.group(2)
    assert len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))) >= 32
    assert key_id_of(key) == key_id


def test_new_keys_never_repeat() -> None:
    made = [new_key() for _ in range(200)]
    assert len({key for _, key in made}) == 200
    assert len({key_id for key_id, _ in made}) == 200


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sk-gw-test-key",  # a config key: no id inside
        "sk-gw-0123456789abcdef-short",  # secret too short
        "sk-gw-0123456789ABCDEF-" + "a" * 43,  # the id is lowercase hex
        "sk-gw-0123456789abcde-" + "a" * 43,  # 15 hex digits
        "sk-gw-0123456789abcdef-" + "a" * 42 + "!",
        " sk-gw-0123456789abcdef-" + "a" * 43,
        "sk-gw-0123456789abcdef-" + "a" * 43 + "\n",
        "xsk-gw-0123456789abcdef-" + "a" * 43,
        "sk-0123456789abcdef-" + "a" * 43,
    ],
)
def test_key_id_of_refuses_anything_else(text: str) -> None:
    assert key_id_of(text) is None


def test_key_id_of_finds_the_id() -> None:
    assert key_id_of("sk-gw-0123456789abcdef-" + "a_-9" * 11) == "0123456789abcdef"


def test_hash_key_is_hex_sha256_of_the_whole_key() -> None:
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    _, key = new_key()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_key(key))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-02T03:04:05Z", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2030-01-02t03:04:05z", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2030-01-02T05:04:05+02:00", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2030-01-02T03:04:05.250000Z", datetime(2030, 1, 2, 3, 4, 5, 250000, tzinfo=UTC)),
    ],
)
def test_parse_time_reads_rfc_3339(text: str, expected: datetime) -> None:
    assert parse_time(text) == expected


def test_parse_time_refuses_a_time_without_a_zone_and_garbage() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        parse_time("2030-01-02T03:04:05")
    with pytest.raises(ValueError, match="Invalid isoformat"):
        parse_time("tomorrow")
    assert parse_time(None) is None


def test_format_time_is_utc_with_z() -> None:
    moment = datetime(2030, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert format_time(moment) == "2030-01-02T03:04:05Z"
    assert format_time(None) is None
    assert parse_time(format_time(moment)) == moment


def _record(**fields: object) -> tuple[KeyRecord, str]:
    key_id, key = new_key()
    values: dict[str, object] = {
        "id": key_id,
        "tenant": "acme",
        "name": "ci",
        "sha256": hash_key(key),
        "created_at": "2030-01-01T00:00:00Z",
    }
    values.update(fields)
    return KeyRecord(**values), key  # type: ignore[arg-type]


def test_a_record_matches_only_its_own_key() -> None:
    record, key = _record()
    assert record.matches(key)
    assert not record.matches(key + "x")
    assert not record.matches(record.sha256)
    assert not record.matches(new_key()[1])


def test_expiry_is_inclusive_and_a_key_without_one_never_expires() -> None:
    record, _ = _record(expires_at="2030-06-01T00:00:00Z")
    boundary = datetime(2030, 6, 1, tzinfo=UTC)
    assert not record.expired(boundary - timedelta(microseconds=1))
    assert record.expired(boundary)
    assert record.expired(boundary + timedelta(days=1))
    forever, _ = _record()
    assert not forever.expired(datetime(9999, 1, 1, tzinfo=UTC))


def test_a_record_round_trips_through_the_store_format() -> None:
    record, _ = _record(
        models=["m1"],
        metadata={"team": "x", "n": 1},
        budget={"usd_per_day": 5.0},
        rate_limit={"requests_per_minute": 10},
        expires_at="2031-01-01T00:00:00Z",
    )
    assert KeyRecord.loads(record.dumps()) == record


def test_the_public_view_never_shows_the_hash() -> None:
    record, key = _record(metadata={"team": "x"})
    shown = record.public("2030-01-02T00:00:00Z")
    assert "sha256" not in shown
    assert record.sha256 not in orjson.dumps(shown).decode()
    assert key not in orjson.dumps(shown).decode()
    assert shown["object"] == "api_key"
    assert shown["prefix"] == f"sk-gw-{record.id}"
    assert shown["last_used_at"] == "2030-01-02T00:00:00Z"
    assert (shown["id"], shown["tenant"], shown["name"], shown["metadata"]) == (record.id, "acme", "ci", {"team": "x"})
    assert record.public()["last_used_at"] is None
