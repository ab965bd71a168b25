"""JWT verification: real keys, a real JWKS server on loopback, an injectable clock, and every attack."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.config import ConfigError, parse_config
from gateway.config.schema import JwtConfig
from gateway.errors import AuthenticationFailed
from gateway.identity import jwt as jwt_module
from gateway.identity.jwt import JWTVerifier, TokenIdentity, looks_like_jwt

NOW = 1_700_000_000.0
ISSUER = "https://login.example.com/"
HS_ISSUER = "https://hs.example.com"
PEM_ISSUER = "https://pem.example.com"
SECRET = "s3cret-that-is-at-least-32-bytes-long!!"
DROP = object()


# --- keys, tokens, clock ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    rsa: RSAPrivateKey
    rsa_other: RSAPrivateKey
    ec: EllipticCurvePrivateKey

    def rsa_pem(self) -> str:
        public = self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return public.decode()


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa_other=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
    )


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, **({"kid": kid} if kid else {}), **extra}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, **extra}


def default_jwks(keys: Keys) -> dict[str, Any]:
    return {
        "keys": [
            rsa_jwk(keys.rsa, "rsa-1", alg="RS256", use="sig"),
            ec_jwk(keys.ec, "ec-1"),
            rsa_jwk(keys.rsa, "rsa-any"),  # no `alg`: good for RS256 and PS256
        ]
    }


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


def claims(clock_t: float = NOW, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "gateway",
        "sub": "alice",
        "tenant": "acme",
        "roles": ["reader", "writer"],
        "iat": int(clock_t),
        "exp": int(clock_t) + 300,
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not DROP}


def sign(key: Any, alg: str = "RS256", kid: str | None = "rsa-1", **overrides: Any) -> str:
    at = overrides.pop("at", NOW)
    payload = json.dumps(claims(at, **overrides)).encode()  # PyJWS: no checks on the claims, so any may be sent
    return jwt.PyJWS().encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


def hmac_token(secret: bytes, header: dict[str, Any], payload: dict[str, Any]) -> str:
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


# --- a real JWKS server on loopback ----------------------------------------------------------------


class JwksServer:
    """Serves `document` (or `body`) at /jwks.json on a free 127.0.0.1 port and counts the fetches."""

    def __init__(self) -> None:
        self.document: Any = {"keys": []}
        self.body: bytes | None = None
        self.status = 200
        self.headers: dict[str, str] = {}
        self.delay_s = 0.0
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                body = outer.body if outer.body is not None else json.dumps(outer.document).encode()
                self.send_response(outer.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                for name, value in outer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (timeout test) is not a test failure

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def server(keys: Keys) -> Iterator[JwksServer]:
    jwks = JwksServer()
    jwks.document = default_jwks(keys)
    yield jwks
    jwks.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def jwt_config(*issuers: dict[str, Any], leeway_s: float = 30, env: dict[str, str] | None = None) -> JwtConfig:
    config = parse_config({"auth": {"jwt": {"leeway_s": leeway_s, "issuers": list(issuers)}}}, "t.yaml", env=env or {})
    assert config.auth.jwt is not None
    return config.auth.jwt


def jwks_issuer(url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "issuer": ISSUER,
        "audience": "gateway",
        "jwks_url": url,
        "algorithms": ["RS256", "PS256", "ES256"],
        "tenant_claim": "tenant",
        "roles_claim": "roles",
        **overrides,
    }


def hs_issuer(**overrides: Any) -> dict[str, Any]:
    return {
        "issuer": HS_ISSUER,
        "audience": ["gateway", "batch"],
        "secret": SECRET,
        "algorithms": ["HS256"],
        "tenant_claim": "org",
        **overrides,
    }


def pem_issuer(keys: Keys, **overrides: Any) -> dict[str, Any]:
    return {
        "issuer": PEM_ISSUER,
        "audience": "gateway",
        "public_key": keys.rsa_pem(),
        "algorithms": ["RS256"],
        "tenant_claim": "tenant",
        **overrides,
    }


@pytest.fixture
async def verifier(server: JwksServer, clock: Clock, keys: Keys) -> AsyncIterator[JWTVerifier]:
    config = jwt_config(jwks_issuer(server.url), hs_issuer(), pem_issuer(keys))
    instance = JWTVerifier(config, now=clock)
    yield instance
    await instance.aclose()


async def rejected(verifier: JWTVerifier, token: str) -> str:
    """Assert a 401 in OpenAI's error shape whose message holds no part of the token; return the message."""
    with pytest.raises(AuthenticationFailed) as caught:
        await verifier.verify(token)
    error = caught.value
    assert error.status == 401
    body = error.to_dict()["error"]
    assert body["type"] == "invalid_request_error"
    assert body["code"] == "invalid_api_key"
    assert body["message"] == error.message
    for part in [token, *token.split(".")]:
        if len(part) >= 8:
            assert part not in error.message
    return error.message


# --- tokens that verify ----------------------------------------------------------------------------


async def test_an_rs256_token_from_the_jwks_gives_the_identity(
    verifier: JWTVerifier, keys: Keys, server: JwksServer
) -> None:
    identity = await verifier.verify(sign(keys.rsa))
    assert identity == TokenIdentity(
        issuer=ISSUER,
        tenant="acme",
        user="alice",
        roles=frozenset({"reader", "writer"}),
        claims=identity.claims,
    )
    assert identity.claims["aud"] == "gateway"
    assert server.fetches == 1


async def test_an_es256_token_from_the_jwks_verifies(verifier: JWTVerifier, keys: Keys) -> None:
    identity = await verifier.verify(sign(keys.ec, "ES256", "ec-1", sub="bob"))
    assert (identity.tenant, identity.user) == ("acme", "bob")


async def test_a_ps256_token_verifies_with_a_jwk_that_names_no_alg(verifier: JWTVerifier, keys: Keys) -> None:
    identity = await verifier.verify(sign(keys.rsa, "PS256", "rsa-any"))
    assert identity.tenant == "acme"


async def test_an_hs256_token_verifies_by_secret(verifier: JWTVerifier, server: JwksServer) -> None:
    token = sign(SECRET, "HS256", None, iss=HS_ISSUER, org="globex", aud="batch")
    identity = await verifier.verify(token)
    assert (identity.issuer, identity.tenant, identity.user) == (HS_ISSUER, "globex", "alice")
    assert identity.roles == frozenset()  # this issuer has no roles_claim, so `roles` is ignored
    assert server.fetches == 0


async def test_a_public_key_issuer_verifies_without_fetching(
    verifier: JWTVerifier, keys: Keys, server: JwksServer
) -> None:
    identity = await verifier.verify(sign(keys.rsa, kid=None, iss=PEM_ISSUER))
    assert identity.issuer == PEM_ISSUER
    assert server.fetches == 0


async def test_keys_are_fetched_once_and_then_served_from_the_cache(
    verifier: JWTVerifier, keys: Keys, server: JwksServer
) -> None:
    for _ in range(20):
        await verifier.verify(sign(keys.rsa))
        await verifier.verify(sign(keys.ec, "ES256", "ec-1"))
    assert server.fetches == 1


async def test_the_identity_is_immutable(verifier: JWTVerifier, keys: Keys) -> None:
    identity = await verifier.verify(sign(keys.rsa))
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.tenant = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        identity.claims["tenant"] = "other"  # type: ignore[index]


# --- attacks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_an_unsigned_alg_none_token_is_rejected(verifier: JWTVerifier, server: JwksServer, alg: str) -> None:
    token = f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(claims())}."
    message = await rejected(verifier, token)
    assert f"algorithm {alg} is not allowed" in message
    assert server.fetches == 0


async def test_hs256_keyed_with_the_issuers_public_key_is_rejected(
    verifier: JWTVerifier, keys: Keys, server: JwksServer
) -> None:
    # The classic confusion attack: the public key, which anyone has, used as an HMAC secret.
    pem = keys.rsa_pem().encode()
    for iss in (PEM_ISSUER, ISSUER):
        token = hmac_token(pem, {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(iss=iss))
        message = await rejected(verifier, token)
        assert "algorithm HS256 is not allowed" in message
    jwk_json = json.dumps(rsa_jwk(keys.rsa, "rsa-1")).encode()
    token = hmac_token(jwk_json, {"alg": "HS256", "kid": "rsa-1"}, claims())
    assert "algorithm HS256 is not allowed" in await rejected(verifier, token)
    assert server.fetches == 0


async def test_an_rs256_token_for_the_secret_issuer_is_rejected(verifier: JWTVerifier, keys: Keys) -> None:
    message = await rejected(verifier, sign(keys.rsa, iss=HS_ISSUER, org="globex"))
    assert "algorithm RS256 is not allowed for its issuer (HS256)" in message


async def test_a_signature_by_another_key_under_a_known_kid_is_rejected(verifier: JWTVerifier, keys: Keys) -> None:
    assert "signature is invalid" in await rejected(verifier, sign(keys.rsa_other, kid="rsa-1"))
    assert "signature is invalid" in await rejected(verifier, sign(keys.rsa_other, kid=None, iss=PEM_ISSUER))
    wrong_secret = "another-secret-of-at-least-32-bytes!"
    assert "signature is invalid" in await rejected(verifier, sign(wrong_secret, "HS256", None, iss=HS_ISSUER))


async def test_a_tampered_payload_is_rejected(verifier: JWTVerifier, keys: Keys) -> None:
    header, _, signature = sign(keys.rsa).split(".")
    forged = f"{header}.{b64json(claims(tenant='victim'))}.{signature}"
    assert "signature is invalid" in await rejected(verifier, forged)


async def test_only_the_named_issuers_keys_verify(verifier: JWTVerifier, keys: Keys, server: JwksServer) -> None:
    server.document = {"keys": [rsa_jwk(keys.rsa_other, "rsa-other")]}
    # Valid for the JWKS issuer's key, but it claims to come from the PEM issuer.
    token = sign(keys.rsa_other, kid="rsa-other", iss=PEM_ISSUER)
    assert "signature is invalid" in await rejected(verifier, token)
    assert server.fetches == 0
    assert (await verifier.verify(sign(keys.rsa_other, kid="rsa-other"))).issuer == ISSUER


@pytest.mark.parametrize("iss", ["https://evil.example.com/", "https://login.example.com", DROP, 42, ["x"]])
async def test_an_unknown_or_absent_issuer_is_rejected(
    verifier: JWTVerifier, keys: Keys, server: JwksServer, iss: Any
) -> None:
    message = await rejected(verifier, sign(keys.rsa, iss=iss))
    assert message == "The token's issuer (`iss`) is not one this gateway trusts."
    assert server.fetches == 0


# --- time claims -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "accepted"),
    [
        ({"exp": NOW - 29}, True),
        ({"exp": NOW - 30}, False),
        ({"exp": NOW - 3600}, False),
        ({"nbf": NOW + 30}, True),
        ({"nbf": NOW + 31}, False),
        ({"iat": NOW + 30}, True),
        ({"iat": NOW + 31}, False),
        ({"exp": NOW + 0.5, "nbf": NOW - 0.5, "iat": NOW - 0.5}, True),  # NumericDate may be fractional
    ],
)
async def test_time_claims_allow_the_leeway_and_no_more(
    verifier: JWTVerifier, keys: Keys, overrides: dict[str, Any], accepted: bool
) -> None:
    token = sign(keys.rsa, **overrides)
    if accepted:
        assert (await verifier.verify(token)).tenant == "acme"
    else:
        message = await rejected(verifier, token)
        assert any(word in message for word in ("expired", "not valid yet", "issued in the future"))


async def test_expired_not_yet_valid_and_future_iat_say_so(verifier: JWTVerifier, keys: Keys) -> None:
    assert await rejected(verifier, sign(keys.rsa, exp=NOW - 100)) == "The token has expired."
    assert "not valid yet (`nbf`" in await rejected(verifier, sign(keys.rsa, nbf=NOW + 100))
    assert "issued in the future (`iat`)" in await rejected(verifier, sign(keys.rsa, iat=NOW + 100))


async def test_a_token_that_has_expired_since_it_was_first_accepted_is_rejected(
    verifier: JWTVerifier, keys: Keys, clock: Clock
) -> None:
    token = sign(keys.rsa)  # exp = NOW + 300
    await verifier.verify(token)
    clock.t = NOW + 329
    await verifier.verify(token)
    clock.t = NOW + 330
    assert await rejected(verifier, token) == "The token has expired."


async def test_a_zero_leeway_is_exact(server: JwksServer, keys: Keys, clock: Clock) -> None:
    verifier = JWTVerifier(jwt_config(jwks_issuer(server.url), leeway_s=0), now=clock)
    try:
        await verifier.verify(sign(keys.rsa, exp=NOW + 1, nbf=NOW, iat=NOW))
        assert "expired" in await rejected(verifier, sign(keys.rsa, exp=NOW))
        assert "not valid yet" in await rejected(verifier, sign(keys.rsa, nbf=NOW + 1))
        assert "issued in the future" in await rejected(verifier, sign(keys.rsa, iat=NOW + 1))
    finally:
        await verifier.aclose()


async def test_exp_is_required_and_must_be_a_number(verifier: JWTVerifier, keys: Keys) -> None:
    assert "no expiry time (`exp`)" in await rejected(verifier, sign(keys.rsa, exp=DROP))
    assert "no expiry time (`exp`)" in await rejected(verifier, sign(SECRET, "HS256", None, iss=HS_ISSUER, exp=DROP))
    for bad in ("2030-01-01", True, [NOW + 300]):
        assert "`exp` claim must be a number" in await rejected(verifier, sign(keys.rsa, exp=bad))
    assert "`nbf` claim must be a number" in await rejected(verifier, sign(keys.rsa, nbf="soon"))


# --- audience, tenant, user, roles -----------------------------------------------------------------


async def test_the_audience_must_name_the_gateway(verifier: JWTVerifier, keys: Keys) -> None:
    assert "audience (`aud`) is not this gateway" in await rejected(verifier, sign(keys.rsa, aud="another-app"))
    assert "audience (`aud`) is not this gateway" in await rejected(verifier, sign(keys.rsa, aud=["a", "b"]))
    assert "no audience" in await rejected(verifier, sign(keys.rsa, aud=DROP))
    assert "no audience" in await rejected(verifier, sign(keys.rsa, aud=[]))
    assert (await verifier.verify(sign(keys.rsa, aud=["another-app", "gateway"]))).tenant == "acme"


async def test_an_issuer_may_accept_several_audiences(verifier: JWTVerifier) -> None:
    for aud in ("gateway", "batch", ["x", "batch"]):
        assert (await verifier.verify(sign(SECRET, "HS256", None, iss=HS_ISSUER, org="o", aud=aud))).tenant == "o"
    assert "not this gateway" in await rejected(verifier, sign(SECRET, "HS256", None, iss=HS_ISSUER, aud="x"))


@pytest.mark.parametrize("tenant", [DROP, "", None, 7, ["acme"]])
async def test_the_tenant_claim_is_required(verifier: JWTVerifier, keys: Keys, tenant: Any) -> None:
    message = await rejected(verifier, sign(keys.rsa, tenant=tenant))
    assert message == "The token has no `tenant` claim (a string naming the tenant)."


async def test_the_user_comes_from_the_user_claim(server: JwksServer, keys: Keys, clock: Clock) -> None:
    verifier = JWTVerifier(jwt_config(jwks_issuer(server.url, user_claim="email")), now=clock)
    try:
        assert (await verifier.verify(sign(keys.rsa, email="a@example.com"))).user == "a@example.com"
        assert (await verifier.verify(sign(keys.rsa))).user is None  # no `email` claim
        assert "`email` claim must be a string" in await rejected(verifier, sign(keys.rsa, email=12))
    finally:
        await verifier.aclose()


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        ("admin", {"admin"}),
        ("read write", {"read", "write"}),
        (["admin", "billing", "admin"], {"admin", "billing"}),
        ([], set()),
        (DROP, set()),
    ],
)
async def test_roles_may_be_a_string_or_a_list(
    verifier: JWTVerifier, keys: Keys, roles: Any, expected: set[str]
) -> None:
    assert (await verifier.verify(sign(keys.rsa, roles=roles))).roles == frozenset(expected)


@pytest.mark.parametrize("roles", [42, ["admin", 1], {"admin": True}])
async def test_roles_of_another_shape_are_rejected(verifier: JWTVerifier, keys: Keys, roles: Any) -> None:
    assert "`roles` claim must be a string or a list of strings" in await rejected(
        verifier, sign(keys.rsa, roles=roles)
    )


# --- malformed tokens ------------------------------------------------------------------------------

GOOD_HEADER = b64json({"alg": "RS256", "kid": "rsa-1"})
GOOD_PAYLOAD = b64json(claims())


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt-at-all",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}.c2lnbmF0dXJl.ZXh0cmE",
        f"!!!!.{GOOD_PAYLOAD}.c2lnbmF0dXJl",
        f"{b64(b'not json')}.{GOOD_PAYLOAD}.c2lnbmF0dXJl",
        f"{b64json(['RS256'])}.{GOOD_PAYLOAD}.c2lnbmF0dXJl",
        f"{GOOD_HEADER}.{b64(b'not json')}.c2lnbmF0dXJl",
        f"{GOOD_HEADER}.{b64json(['a', 'list'])}.c2lnbmF0dXJl",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}.sig!nature",
        f"{b64json({'alg': 'RS256', 'kid': 7})}.{GOOD_PAYLOAD}.c2lnbmF0dXJl",
        f"{b64json({'alg': 'RS256', 'crit': ['exp']})}.{GOOD_PAYLOAD}.c2lnbmF0dXJl",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}.c2lnbmF0dXJl\u00e9",
        f"{b64json({'alg': 'RS256', 'b64': False})}.{GOOD_PAYLOAD}.c2lnbmF0dXJl",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}.QUF",
    ],
    ids=[
        "empty",
        "one-segment",
        "two-segments",
        "four-segments",
        "header-not-base64url",
        "header-not-json",
        "header-not-object",
        "payload-not-json",
        "payload-not-object",
        "signature-not-base64url",
        "kid-not-string",
        "unsupported-crit",
        "non-ascii",
        "unencoded-payload",
        "non-canonical-base64",
    ],
)
async def test_a_malformed_token_is_rejected(verifier: JWTVerifier, server: JwksServer, token: str) -> None:
    assert await rejected(verifier, token) == "The bearer token is not a well-formed JWT."
    assert server.fetches == 0


async def test_an_oversized_token_is_rejected_before_parsing(verifier: JWTVerifier, keys: Keys) -> None:
    token = sign(keys.rsa, padding="x" * 20_000)
    assert "longer than the 16384 characters" in await rejected(verifier, token)


# --- the JWKS: rotation, rate limits, sharing, failures ----------------------------------------------


async def test_a_rotated_in_key_is_found_by_a_refetch(
    verifier: JWTVerifier, keys: Keys, server: JwksServer, clock: Clock
) -> None:
    await verifier.verify(sign(keys.rsa))
    server.document = {"keys": [*default_jwks(keys)["keys"], rsa_jwk(keys.rsa_other, "rsa-2")]}
    new_token = sign(keys.rsa_other, kid="rsa-2", at=NOW + 1)
    clock.t = NOW + 1  # within 10 s of the last fetch: no refetch yet
    assert "key (`kid`) is not one its issuer publishes for RS256" in await rejected(verifier, new_token)
    assert server.fetches == 1
    clock.t = NOW + 10
    assert (await verifier.verify(new_token)).tenant == "acme"
    assert server.fetches == 2


async def test_a_rotated_out_key_stops_verifying_once_the_set_is_an_hour_old(
    verifier: JWTVerifier, keys: Keys, server: JwksServer, clock: Clock
) -> None:
    await verifier.verify(sign(keys.rsa))
    server.document = {"keys": [rsa_jwk(keys.rsa_other, "rsa-2")]}
    clock.t = NOW + 3599
    await verifier.verify(sign(keys.rsa, at=clock.t))  # still cached
    assert server.fetches == 1
    clock.t = NOW + 3600
    assert "not one its issuer publishes" in await rejected(verifier, sign(keys.rsa, at=clock.t))
    assert server.fetches == 2
    assert (await verifier.verify(sign(keys.rsa_other, kid="rsa-2", at=clock.t))).user == "alice"


async def test_unknown_kids_refetch_at_most_once_every_ten_seconds(
    verifier: JWTVerifier, keys: Keys, server: JwksServer, clock: Clock
) -> None:
    await verifier.verify(sign(keys.rsa))
    expected_fetches = {NOW + 1: 1, NOW + 9.9: 1, NOW + 10: 2, NOW + 15: 2, NOW + 19.9: 2, NOW + 20: 3, NOW + 25: 3}
    for at, fetches in expected_fetches.items():
        clock.t = at
        for n in range(25):
            await rejected(verifier, sign(keys.rsa, kid=f"random-{at}-{n}", at=at))
        assert server.fetches == fetches, at
    clock.t = NOW + 40
    spam = [verifier.verify(sign(keys.rsa, kid=f"burst-{n}", at=clock.t)) for n in range(50)]
    results = await asyncio.gather(*spam, return_exceptions=True)
    assert all(isinstance(result, AuthenticationFailed) for result in results)
    assert server.fetches == 4
    await verifier.verify(sign(keys.rsa, at=clock.t))  # known keys keep working throughout
    assert server.fetches == 4


async def test_concurrent_verifications_share_one_fetch(verifier: JWTVerifier, keys: Keys, server: JwksServer) -> None:
    server.delay_s = 0.2
    tokens = [sign(keys.rsa, sub=f"user-{n}") for n in range(10)] + [sign(keys.ec, "ES256", "ec-1")] * 10
    identities = await asyncio.gather(*(verifier.verify(token) for token in tokens))
    assert [identity.user for identity in identities[:10]] == [f"user-{n}" for n in range(10)]
    assert server.fetches == 1


async def test_a_token_without_kid_needs_a_single_candidate_key(
    verifier: JWTVerifier, keys: Keys, server: JwksServer, clock: Clock
) -> None:
    # The default set holds two RS256-capable keys (rsa-1 and rsa-any) but one ES256 key.
    assert "names no key (`kid`)" in await rejected(verifier, sign(keys.rsa, kid=None))
    assert (await verifier.verify(sign(keys.ec, "ES256", None))).tenant == "acme"
    server.document = {"keys": [rsa_jwk(keys.rsa, None)]}
    clock.t = NOW + 10
    assert (await verifier.verify(sign(keys.rsa, kid=None, at=clock.t))).tenant == "acme"


async def test_a_jwk_verifies_only_the_algorithms_it_fits(verifier: JWTVerifier, keys: Keys) -> None:
    # rsa-1 says alg RS256, so a PS256 token under it is refused even though the key is RSA.
    assert "not one its issuer publishes for PS256" in await rejected(verifier, sign(keys.rsa, "PS256", "rsa-1"))
    # An RS256 token that points at the EC key.
    assert "not one its issuer publishes for RS256" in await rejected(verifier, sign(keys.rsa, kid="ec-1"))


async def test_unusable_jwks_entries_are_skipped(server: JwksServer, keys: Keys, clock: Clock) -> None:
    private = RSAAlgorithm.to_jwk(keys.rsa_other, as_dict=True)
    server.document = {
        "keys": [
            {**private, "kid": "private"},  # a private key has no business in a JWKS
            rsa_jwk(keys.rsa_other, "enc", use="enc"),
            {"kty": "oct", "k": b64(SECRET.encode()), "kid": "oct", "alg": "HS256"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not a key",
            rsa_jwk(keys.rsa, "rsa-1"),
        ]
    }
    verifier = JWTVerifier(jwt_config(jwks_issuer(server.url)), now=clock)
    try:
        await verifier.verify(sign(keys.rsa))
        for kid in ("private", "enc", "oct", "broken"):
            assert "not one its issuer publishes" in await rejected(verifier, sign(keys.rsa_other, kid=kid))
    finally:
        await verifier.aclose()


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ({"status": 500}, "HTTP 500"),
        ({"status": 302, "headers": {"location": "/jwks.json"}}, "HTTP 302"),
        ({"body": b"<html>not json</html>"}, "the response is not JSON"),
        ({"document": [{"kty": "RSA"}]}, "not a JSON object"),
        ({"document": {"issuer": "x"}}, "no `keys` list"),
        ({"document": {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "oct"}]}}, "no usable key"),
        ({"body": b'{"keys": [' + b" " * (1024 * 1024) + b"]}"}, "larger than 1048576 bytes"),
        ({"body": gzip.compress(b'{"keys": []}'), "headers": {"content-encoding": "gzip"}}, "compressed"),
    ],
)
async def test_a_jwks_failure_is_a_401_and_a_warning(
    verifier: JWTVerifier,
    keys: Keys,
    server: JwksServer,
    caplog: pytest.LogCaptureFixture,
    setup: dict[str, Any],
    reason: str,
) -> None:
    for name, value in setup.items():
        setattr(server, name, value)
    with caplog.at_level(logging.WARNING, logger="gateway.identity.jwt"):
        message = await rejected(verifier, sign(keys.rsa))
    assert message == f"The signing keys of the token's issuer ({ISSUER}) could not be fetched; try again later."
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert ISSUER in record.getMessage()
    assert reason in record.getMessage()
    assert server.fetches == 1


async def test_too_many_keys_is_a_failure(
    verifier: JWTVerifier, keys: Keys, server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.document = {"keys": [rsa_jwk(keys.rsa, f"k{n}") for n in range(101)]}
    assert "could not be fetched" in await rejected(verifier, sign(keys.rsa, kid="k1"))
    assert "101 keys, more than the 100 accepted" in caplog.text


async def test_an_unreachable_jwks_is_a_401(clock: Clock, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    verifier = JWTVerifier(jwt_config(jwks_issuer(f"http://127.0.0.1:{port}/jwks.json")), now=clock)
    try:
        assert "could not be fetched" in await rejected(verifier, sign(keys.rsa))
        assert f"could not fetch the JWKS of issuer {ISSUER} from http://127.0.0.1:{port}/jwks.json" in caplog.text
    finally:
        await verifier.aclose()


async def test_a_slow_jwks_times_out_as_a_401(
    verifier: JWTVerifier, keys: Keys, server: JwksServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jwt_module, "JWKS_TIMEOUT_S", 0.1)
    server.delay_s = 1.0
    started = time.monotonic()
    assert "could not be fetched" in await rejected(verifier, sign(keys.rsa))
    assert time.monotonic() - started < 0.9


async def test_failed_fetches_are_rate_limited_too(
    verifier: JWTVerifier, keys: Keys, server: JwksServer, clock: Clock
) -> None:
    server.status = 503
    await rejected(verifier, sign(keys.rsa))
    clock.t = NOW + 9
    assert "could not be fetched" in await rejected(verifier, sign(keys.rsa, at=clock.t))
    assert server.fetches == 1
    server.status = 200
    clock.t = NOW + 10
    assert (await verifier.verify(sign(keys.rsa, at=clock.t))).tenant == "acme"
    assert server.fetches == 2


async def test_old_keys_keep_serving_when_a_refresh_fails(
    verifier: JWTVerifier, keys: Keys, server: JwksServer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    await verifier.verify(sign(keys.rsa))
    server.status = 500
    clock.t = NOW + 3700
    assert (await verifier.verify(sign(keys.rsa, at=clock.t))).tenant == "acme"
    assert server.fetches == 2
    assert "keeping the keys fetched before" in caplog.text


async def test_an_injected_fetch_replaces_http(keys: Keys, clock: Clock) -> None:
    calls: list[str] = []

    async def fetch(url: str) -> dict[str, Any]:
        calls.append(url)
        return default_jwks(keys)

    verifier = JWTVerifier(jwt_config(jwks_issuer("https://idp.example.com/jwks")), fetch_jwks=fetch, now=clock)
    assert (await verifier.verify(sign(keys.rsa))).tenant == "acme"
    assert calls == ["https://idp.example.com/jwks"]

    async def broken(url: str) -> dict[str, Any]:
        raise RuntimeError("idp down")

    verifier = JWTVerifier(jwt_config(jwks_issuer("https://idp.example.com/jwks")), fetch_jwks=broken, now=clock)
    assert "could not be fetched" in await rejected(verifier, sign(keys.rsa))


# --- looks_like_jwt --------------------------------------------------------------------------------


def test_looks_like_jwt_accepts_jwts(keys: Keys) -> None:
    assert looks_like_jwt(sign(keys.rsa))
    assert looks_like_jwt(sign(SECRET, "HS256", None))
    assert looks_like_jwt(f"{b64json({'alg': 'none'})}.{GOOD_PAYLOAD}.")
    padded = base64.urlsafe_b64encode(b'{"alg":"RS256","a":"b"}').decode()
    assert padded.endswith("=")
    assert looks_like_jwt(f"{padded}.{GOOD_PAYLOAD}.c2ln")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "sk-gw-test-key",
        "sk-proj-abc.def",
        "a.b.c",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}.c2ln.c2ln",
        f"{b64json({'typ': 'JWT'})}.{GOOD_PAYLOAD}.c2ln",
        f"{b64json({'alg': 256})}.{GOOD_PAYLOAD}.c2ln",
        f"{b64json(['alg'])}.{GOOD_PAYLOAD}.c2ln",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}.c2!n",
        f"{GOOD_HEADER}..c2ln",
        f"{b64json({'alg': 'RS256', 'x': 'y' * 5000})}.{GOOD_PAYLOAD}.c2ln",
    ],
)
def test_looks_like_jwt_refuses_api_keys_and_other_strings(token: str) -> None:
    assert not looks_like_jwt(token)


# --- the config section ----------------------------------------------------------------------------


def test_the_auth_section_is_optional_and_has_defaults(keys: Keys) -> None:
    assert parse_config({}, "t.yaml", env={}).auth.jwt is None
    config = jwt_config(
        {
            "issuer": ISSUER,
            "audience": "gateway",
            "public_key": keys.rsa_pem(),
            "algorithms": ["RS256"],
            "tenant_claim": "t",
        }
    )
    issuer = config.issuers[0]
    assert config.leeway_s == 30
    assert (issuer.user_claim, issuer.roles_claim) == ("sub", None)


def test_the_secret_comes_from_the_environment_and_stays_hidden() -> None:
    config = jwt_config(hs_issuer(secret="${JWT_SECRET}"), env={"JWT_SECRET": SECRET})
    assert config.issuers[0].secret is not None
    assert config.issuers[0].secret.get_secret_value() == SECRET
    assert SECRET not in repr(config)


@pytest.mark.parametrize(
    "url",
    [
        "https://login.example.com/.well-known/jwks.json",
        "http://127.0.0.1:8080/jwks",
        "http://127.5.0.1/jwks",
        "http://[::1]:9000/jwks",
        "http://localhost/jwks",
        "http://LOCALHOST:81/jwks",
    ],
)
def test_jwks_urls_that_are_accepted(url: str) -> None:
    assert jwt_config(jwks_issuer(url)).issuers[0].jwks_url == url


def _problems(issuer: dict[str, Any], **jwt_section: Any) -> list[str]:
    section = {"issuers": [issuer], **jwt_section}
    with pytest.raises(ConfigError) as caught:
        parse_config({"auth": {"jwt": section}}, "t.yaml", env={})
    return caught.value.problems


def _without(issuer: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: value for name, value in issuer.items() if name not in names}


P = "t.yaml:auth.jwt.issuers[0]"
JWKS_URL = "https://login.example.com/jwks"


@pytest.mark.parametrize(
    ("issuer", "expected"),
    [
        (_without(jwks_issuer(JWKS_URL), "jwks_url"), f"{P}: give exactly one of jwks_url, public_key or secret"),
        (jwks_issuer(JWKS_URL, secret=SECRET), f"{P}: give exactly one of jwks_url, public_key or secret"),
        (jwks_issuer(JWKS_URL, algorithms=["none"]), f"{P}.algorithms: 'none' is never accepted"),
        (jwks_issuer(JWKS_URL, algorithms=["RS256", "None"]), f"{P}.algorithms: 'none' is never accepted"),
        (hs_issuer(algorithms=["none"]), f"{P}.algorithms: 'none' is never accepted"),
        (jwks_issuer(JWKS_URL, algorithms=[]), f"{P}.algorithms: list the algorithms"),
        (jwks_issuer(JWKS_URL, algorithms=["RS257"]), f"{P}.algorithms: unknown algorithm 'RS257'"),
        (_without(jwks_issuer(JWKS_URL), "algorithms"), f"{P}.algorithms: Field required"),
        (hs_issuer(algorithms=["HS256", "RS256"]), f"{P}.algorithms: an issuer with a secret may list only HS256"),
        (
            jwks_issuer(JWKS_URL, algorithms=["RS256", "HS256"]),
            f"{P}.algorithms: an issuer with jwks_url may list only",
        ),
        (
            hs_issuer(algorithms=["HS512"]),
            f"{P}.algorithms: HS512 needs a secret of at least 64 bytes; this one has 39",
        ),
        (hs_issuer(secret="short"), f"{P}.secret: the secret must be at least 32 bytes long"),
        (hs_issuer(secret="${JWT_SECRET:-}"), f"{P}.secret: the secret must be at least 32 bytes long"),
        (hs_issuer(secret="${JWT_SECRET}"), f"{P}.secret: environment variable JWT_SECRET is not set"),
        (jwks_issuer("http://login.example.com/jwks"), f"{P}.jwks_url: expected an https:// URL"),
        (jwks_issuer("http://127.0.0.1.evil.example/jwks"), f"{P}.jwks_url: expected an https:// URL"),
        (jwks_issuer("http://localhost@evil.example/jwks"), f"{P}.jwks_url: expected an https:// URL"),
        (jwks_issuer("ftp://127.0.0.1/jwks"), f"{P}.jwks_url: expected an https:// URL"),
        (jwks_issuer("https:///jwks"), f"{P}.jwks_url: expected an https:// URL"),
        (_without(jwks_issuer(JWKS_URL), "tenant_claim"), f"{P}.tenant_claim: Field required"),
        (_without(jwks_issuer(JWKS_URL), "audience"), f"{P}.audience: Field required"),
        (jwks_issuer(JWKS_URL, audience=""), f"{P}.audience: name the audience"),
        (jwks_issuer(JWKS_URL, audience=[]), f"{P}.audience: name the audience"),
        (jwks_issuer(JWKS_URL, issuer=""), f"{P}.issuer: String should have at least 1 character"),
        (jwks_issuer(JWKS_URL, tenant_claims="t"), f"{P}.tenant_claims: unknown key"),
    ],
)
def test_config_errors_name_the_key_path(issuer: dict[str, Any], expected: str) -> None:
    problems = _problems(issuer)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_a_public_key_must_be_a_pem_key_that_fits_the_algorithms(keys: Keys) -> None:
    [problem] = _problems(pem_issuer(keys, public_key="not a key"))
    assert problem.startswith(f"{P}.public_key: expected a PEM public key")
    [problem] = _problems(pem_issuer(keys, algorithms=["RS256", "HS256"]))
    assert problem.startswith(f"{P}.algorithms: an issuer with public_key may list only asymmetric algorithms")
    assert "key-confusion" in problem
    [problem] = _problems(hs_issuer(secret=keys.rsa_pem()))  # HS256 keyed with a public key: anyone could sign
    assert problem.startswith(f"{P}.secret: the secret is a public key or certificate")
    [problem] = _problems(pem_issuer(keys, algorithms=["ES256"]))
    assert problem == f"{P}.algorithms: public_key cannot verify ES256 tokens (wrong key type or curve)"
    private_pem = keys.rsa.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    [problem] = _problems(pem_issuer(keys, public_key=private_pem.decode()))
    assert problem.startswith(f"{P}.public_key: expected a PEM public key")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()  # noqa: S505 (the point)
    weak_pem = weak.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    [problem] = _problems(pem_issuer(keys, public_key=weak_pem.decode()))
    assert problem.startswith(f"{P}.algorithms: The RSA key is 1024 bits long")


def test_section_level_config_errors() -> None:
    [problem] = _problems(jwks_issuer(JWKS_URL), leeway_s=61)
    assert problem == "t.yaml:auth.jwt.leeway_s: Input should be less than or equal to 60"
    with pytest.raises(ConfigError) as caught:
        parse_config({"auth": {"jwt": {"issuers": [jwks_issuer(JWKS_URL), jwks_issuer(JWKS_URL)]}}}, "t.yaml", env={})
    assert caught.value.problems == [f"t.yaml:auth.jwt.issuers: issuer '{ISSUER}' is listed twice (at [0] and [1])"]
    with pytest.raises(ConfigError) as caught:
        parse_config({"auth": {"jwt": {"issuers": []}}}, "t.yaml", env={})
    assert caught.value.problems == [
        "t.yaml:auth.jwt.issuers: List should have at least 1 item after validation, not 0"
    ]
