"""The Authenticate stage and the config-key half of the Authenticator (stored keys: tests/identity)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from gateway.config import GatewayConfig, parse_config
from gateway.context import CHAT_COMPLETIONS, Principal, ProxyRequest, ProxyResponse
from gateway.errors import AuthenticationFailed
from gateway.identity.authenticator import Authenticator
from gateway.identity.keys import hash_key
from gateway.pipeline.auth import Authenticate
from gateway.services import Services
from gateway.store.memory import MemoryStore

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
def auth() -> Authenticator:
    return Services.build(_config(), store=MemoryStore()).authenticator


def test_hash_key_is_hex_sha256() -> None:
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_the_keyring_holds_every_config_key_by_its_hash(auth: Authenticator) -> None:
    assert auth.keys.configured == {
        hash_key(PLAIN): ("acme", "acme-plain"),
        hash_key(HASHED): ("globex", "globex-hashed"),
    }


async def test_a_plain_key_authenticates_as_its_tenant(auth: Authenticator) -> None:
    principal = await auth.authenticate(f"Bearer {PLAIN}")
    assert principal.tenant == "acme"
    assert principal.key_id == "acme-plain"
    assert principal.policy_name == "default"
    assert principal.allows_model("m2")
    assert (principal.user, principal.roles, principal.key_models, principal.key_policy) == (
        None,
        frozenset(),
        None,
        None,
    )


async def test_a_hashed_key_authenticates_with_its_policy(auth: Authenticator) -> None:
    principal = await auth.authenticate(f"Bearer {HASHED}")
    assert (principal.tenant, principal.key_id, principal.policy_name) == ("globex", "globex-hashed", "narrow")
    assert principal.allows_model("m1")
    assert not principal.allows_model("m2")


async def test_a_config_key_principal_is_cached_and_an_invalidation_clears_it(auth: Authenticator) -> None:
    first = await auth.authenticate(f"Bearer {PLAIN}")
    assert await auth.authenticate(f"Bearer {PLAIN}") is first
    auth.forget(b"tenant:acme")
    again = await auth.authenticate(f"Bearer {PLAIN}")
    assert again is not first
    assert again == first


@pytest.mark.parametrize("header", [f"bearer {PLAIN}", f"BEARER {PLAIN}", f"Bearer   {PLAIN}  "])
async def test_scheme_case_and_surrounding_spaces_do_not_matter(auth: Authenticator, header: str) -> None:
    assert (await auth.authenticate(header)).key_id == "acme-plain"


@pytest.mark.parametrize("header", [None, ""])
async def test_a_missing_key(auth: Authenticator, header: str | None) -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        await auth.authenticate(header)
    assert "didn't provide an API key" in caught.value.message
    assert caught.value.status == 401
    assert caught.value.code == "invalid_api_key"


@pytest.mark.parametrize("header", [f"Basic {PLAIN}", "Bearer", "Bearer    ", PLAIN, f"Token {PLAIN}"])
async def test_a_malformed_header(auth: Authenticator, header: str) -> None:
    with pytest.raises(AuthenticationFailed, match="must be `Bearer YOUR_KEY`") as caught:
        await auth.authenticate(header)
    assert caught.value.status == 401


@pytest.mark.parametrize(
    "token",
    [
        "sk-gw-wrong",
        PLAIN + "x",
        PLAIN[:-1],
        PLAIN.upper(),
        hashlib.sha256(HASHED.encode()).hexdigest(),  # the hash itself is not the key
        "sk-gw-0123456789abcdef-" + "A" * 43,  # this gateway's key format, but no such key
        "a.b.c",  # shaped like a JWT, but no JWT issuer is configured
    ],
)
async def test_a_wrong_key(auth: Authenticator, token: str) -> None:
    with pytest.raises(AuthenticationFailed, match="Incorrect API key") as caught:
        await auth.authenticate(f"Bearer {token}")
    assert caught.value.code == "invalid_api_key"
    assert token not in caught.value.message


async def test_a_stored_key_is_compared_by_hash_in_constant_time(
    auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    record, key = await auth.keys.create("acme", "ci")
    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    compared: list[tuple[Any, Any]] = []
    original = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # keys.py calls hmac.compare_digest
    with pytest.raises(AuthenticationFailed, match="Incorrect API key"):
        await auth.authenticate(f"Bearer {wrong}")
    # The stored hash against the hash of what was sent: never the key itself, never `==`.
    assert compared == [(record.sha256, hash_key(wrong))]
    assert (await auth.authenticate(f"Bearer {key}")).key_id == record.id


def _request(headers: dict[str, str]) -> ProxyRequest:
    return ProxyRequest("req_test", CHAT_COMPLETIONS, b"{}", headers, 0.0)


async def test_the_stage_sets_the_principal_and_calls_on(auth: Authenticator) -> None:
    seen: list[Principal | None] = []

    async def next_stage(request: ProxyRequest) -> ProxyResponse:
        seen.append(request.principal)
        return ProxyResponse(200, {}, b"ok")

    request = _request({"authorization": f"Bearer {PLAIN}"})
    response = await Authenticate(auth)(request, next_stage)
    assert response.body == b"ok"
    assert seen == [request.principal]
    assert request.principal is not None
    assert request.principal.tenant == "acme"


async def test_the_stage_stops_an_unauthenticated_request(auth: Authenticator) -> None:
    async def next_stage(request: ProxyRequest) -> ProxyResponse:
        raise AssertionError("must not be called")

    with pytest.raises(AuthenticationFailed):
        await Authenticate(auth)(_request({"authorization": "Bearer nope"}), next_stage)
    with pytest.raises(AuthenticationFailed):
        await Authenticate(auth)(_request({}), next_stage)


async def test_no_tenants_means_no_keys() -> None:
    config = parse_config({"store": {"url": "memory://"}}, "test.yaml", env={})
    auth = Services.build(config, store=MemoryStore()).authenticator
    assert auth.keys.configured == {}
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(f"Bearer {PLAIN}")
