from __future__ import annotations

import json

import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.jsonbody import dumps, parse_object


def _rejects(raw: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_object(raw)
    assert caught.value.status == 400
    assert caught.value.type == "invalid_request_error"
    return caught.value


def test_a_json_object_is_parsed() -> None:
    assert parse_object(b'{"model": "gpt-4o", "n": 1, "x": [1.5, null, true]}') == {
        "model": "gpt-4o",
        "n": 1,
        "x": [1.5, None, True],
    }


def test_surrounding_whitespace_is_allowed() -> None:
    assert parse_object(b' \n\t{"a": 1}\r\n ') == {"a": 1}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1e400}',
        b'{"a": -1e400}',
    ],
)
def test_non_finite_numbers_are_rejected(raw: bytes) -> None:
    error = _rejects(raw)
    assert error.code == "invalid_json"
    assert "not valid JSON" in error.message


@pytest.mark.parametrize("escape", [b"\\ud800", b"\\udc00", b"\\ud800x", b"\\udfff\\ud800"])
def test_lone_surrogate_escapes_are_rejected(escape: bytes) -> None:
    error = _rejects(b'{"content": "' + escape + b'"}')
    assert error.code == "invalid_json"


def test_a_surrogate_pair_escape_is_accepted() -> None:
    assert parse_object(b'{"content": "\\ud83d\\ude00"}') == {"content": "\U0001f600"}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"content": "\xff"}',
        b'{"content": "caf\xe9"}',  # latin-1, not UTF-8
        b'{"content": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes
        b'{"content": "\xc3"}',  # truncated sequence
    ],
)
def test_invalid_utf8_is_rejected_with_its_own_code(raw: bytes) -> None:
    error = _rejects(raw)
    assert error.code == "invalid_utf8"
    assert "UTF-8" in error.message


def test_a_byte_order_mark_is_invalid_json_not_invalid_utf8() -> None:
    """A BOM is valid UTF-8; calling it invalid UTF-8 would send the client looking for the wrong bug."""
    error = _rejects(b'\xef\xbb\xbf{"a": 1}')
    assert error.code == "invalid_json"


@pytest.mark.parametrize(
    "raw",
    [b'{"a": 1, "a": 2}', b'{"a": 1, "b": {"c": 1, "c": 1}}', b'{"list": [{"k": 1, "k": 2}]}'],
)
def test_duplicate_keys_are_rejected(raw: bytes) -> None:
    error = _rejects(raw)
    assert error.code == "invalid_json"
    assert "twice" in error.message


def test_the_same_key_in_different_objects_is_fine() -> None:
    assert parse_object(b'{"a": {"k": 1}, "b": {"k": 2}}') == {"a": {"k": 1}, "b": {"k": 2}}


@pytest.mark.parametrize(
    ("raw", "kind"),
    [(b"[]", "list"), (b'"text"', "str"), (b"1", "int"), (b"null", "NoneType"), (b"true", "bool")],
)
def test_a_body_that_is_not_an_object_is_rejected(raw: bytes, kind: str) -> None:
    error = _rejects(raw)
    assert error.code == "invalid_json"
    assert kind in error.message


@pytest.mark.parametrize("raw", [b"", b"   ", b"\n\r\t"])
def test_an_empty_body_is_rejected(raw: bytes) -> None:
    error = _rejects(raw)
    assert error.code == "invalid_json"
    assert "empty" in error.message


@pytest.mark.parametrize("raw", [b"{", b'{"a": 1,}', b"{'a': 1}", b'{"a": 1} {"b": 2}', b'{"a": 01}'])
def test_malformed_json_is_rejected_with_a_position(raw: bytes) -> None:
    error = _rejects(raw)
    assert error.code == "invalid_json"
    assert "line 1 column" in error.message


def test_deep_nesting_is_rejected_not_a_crash() -> None:
    error = _rejects(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert error.code == "invalid_json"


@pytest.mark.parametrize("number", [2**64, 2**64 + 1, -(2**63) - 1, 10**30, -(10**40)])
def test_big_integers_are_kept_exact_through_parse_and_dumps(number: int) -> None:
    parsed = parse_object(b'{"seed": ' + str(number).encode() + b', "text": "caf\xc3\xa9"}')
    assert parsed["seed"] == number
    assert isinstance(parsed["seed"], int)
    encoded = dumps(parsed)
    assert str(number).encode() in encoded
    assert json.loads(encoded) == {"seed": number, "text": "café"}


def test_dumps_uses_compact_utf8_for_big_integers() -> None:
    encoded = dumps({"seed": 2**70, "text": "café"})
    assert encoded == b'{"seed":1180591620717411303424,"text":"caf\xc3\xa9"}'


def test_dumps_of_ordinary_values_matches_orjson() -> None:
    value = {"model": "m", "n": 2**63 - 1, "f": 0.5, "u": "é", "l": [None, True]}
    assert dumps(value) == orjson.dumps(value)


def test_u64_max_round_trips() -> None:
    parsed = parse_object(b'{"a": 18446744073709551615}')
    assert parsed["a"] == 2**64 - 1
    assert dumps(parsed) == b'{"a":18446744073709551615}'
