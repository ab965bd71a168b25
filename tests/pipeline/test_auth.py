from __future__ import annotations

import hashlib

import pytest

from gateway.config import GatewayConfig, parse_config
from gateway.context import CHAT_COMPLETIONS, Principal, ProxyRequest, ProxyResponse
from gateway.errors import AuthenticationFailed
from gateway.pipeline.auth import Authenticate, KeyIndex, hash_key

PLAIN = "sk-gw-plain-key"
HASHED = "sk-gw-hashed-key"


def _config() -> GatewayConfig:
    return parse_config(
        {
            "store": {"url": "memory://"},
            "upstreams": {"u": {"base_url": "http://u.test"}},
            "models": {"m1": {"upstream": "u"}, "m2": {"upstream": "u"}},
            "policies": {"default": {}, "narrow": {"models": ["m1"]}},
            "tenants": {
                "acme": {"policy": "default", "api_keys": [{"id": "acme-plain", "key": PLAIN}]},
                "globex": {
                    "policy": "narrow",
                    "api_keys": [{"id": "globex-hashed", "sha256": hashlib.sha256(HASHED.encode()).hexdigest()}],
                },
            },
        },
        "test.yaml",
        env={},
    )


@pytest.fixture
def keys() -> KeyIndex:
    return KeyIndex(_config())


def test_hash_key_is_hex_sha256() -> None:
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_the_index_holds_every_key(keys: KeyIndex) -> None:
    assert len(keys) == 2


def test_a_plain_key_authenticates_as_its_tenant(keys: KeyIndex) -> None:
    principal = keys.authenticate(f"Bearer {PLAIN}")
    assert principal.tenant == "acme"
    assert principal.key_id == "acme-plain"
    assert principal.policy_name == "default"
    assert principal.policy.allows_model("m2")


def test_a_hashed_key_authenticates_with_its_policy(keys: KeyIndex) -> None:
    principal = keys.authenticate(f"Bearer {HASHED}")
    assert (principal.tenant, principal.key_id, principal.policy_name) == ("globex", "globex-hashed", "narrow")
    assert principal.policy.allows_model("m1")
    assert not principal.policy.allows_model("m2")


@pytest.mark.parametrize("header", [f"bearer {PLAIN}", f"BEARER {PLAIN}", f"Bearer   {PLAIN}  "])
def test_scheme_case_and_surrounding_spaces_do_not_matter(keys: KeyIndex, header: str) -> None:
    assert keys.authenticate(header).key_id == "acme-plain"


def test_a_missing_key(keys: KeyIndex) -> None:
    for header in (None, ""):
        with pytest.raises(AuthenticationFailed) as caught:
            keys.authenticate(header)
        assert "didn't provide an API key" in caught.value.message
        assert caught.value.status == 401
        assert caught.value.code == "invalid_api_key"


@pytest.mark.parametrize("header", [f"Basic {PLAIN}", "Bearer", "Bearer    ", PLAIN, f"Token {PLAIN}"])
def test_a_malformed_header(keys: KeyIndex, header: str) -> None:
    with pytest.raises(AuthenticationFailed, match="must be `Bearer YOUR_KEY`"):
        keys.authenticate(header)


@pytest.mark.parametrize(
    "token",
    [
        "sk-gw-wrong",
        PLAIN + "x",
        PLAIN[:-1],
        PLAIN.upper(),
        hashlib.sha256(HASHED.encode()).hexdigest(),  # the hash itself is not the key
    ],
)
def test_a_wrong_key(keys: KeyIndex, token: str) -> None:
    with pytest.raises(AuthenticationFailed, match="Incorrect API key") as caught:
        keys.authenticate(f"Bearer {token}")
    assert token not in caught.value.message


def _request(headers: dict[str, str]) -> ProxyRequest:
    return ProxyRequest("req_test", CHAT_COMPLETIONS, b"{}", headers, 0.0)


async def test_the_stage_sets_the_principal_and_calls_on(keys: KeyIndex) -> None:
    seen: list[Principal | None] = []

    async def next_stage(request: ProxyRequest) -> ProxyResponse:
        seen.append(request.principal)
        return ProxyResponse(200, {}, b"ok")

    request = _request({"authorization": f"Bearer {PLAIN}"})
    response = await Authenticate(keys)(request, next_stage)
    assert response.body == b"ok"
    assert seen == [request.principal]
    assert request.principal is not None
    assert request.principal.tenant == "acme"


async def test_the_stage_stops_an_unauthenticated_request(keys: KeyIndex) -> None:
    async def next_stage(request: ProxyRequest) -> ProxyResponse:
        raise AssertionError("must not be called")

    with pytest.raises(AuthenticationFailed):
        await Authenticate(keys)(_request({"authorization": "Bearer nope"}), next_stage)


def test_no_tenants_means_no_keys() -> None:
    config = parse_config({"store": {"url": "memory://"}}, "test.yaml", env={})
    keys = KeyIndex(config)
    assert len(keys) == 0
    with pytest.raises(AuthenticationFailed):
        keys.authenticate(f"Bearer {PLAIN}")
