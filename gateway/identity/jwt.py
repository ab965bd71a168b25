"""Verify bearer JWTs against the issuers of `auth.jwt`.

The unverified `iss` picks one configured issuer; only that issuer's algorithms and keys may verify
the token. Keys are made ready once: a secret or PEM key when the verifier is built, a JWKS when a
token first needs it. The JWKS is fetched again when a token names an unknown `kid` (at most once
every 10 s per issuer) or when it is an hour old. Every failure is a 401 whose message never
contains the token.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import httpx
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import PyJWTError

from gateway.config.schema import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, JwtConfig, JwtIssuerConfig
from gateway.errors import AuthenticationFailed

logger = logging.getLogger("gateway.identity.jwt")

MAX_TOKEN_CHARS = 16 * 1024
JWKS_TIMEOUT_S = 5.0
JWKS_MAX_BYTES = 1024 * 1024
JWKS_MAX_KEYS = 100
JWKS_MIN_REFETCH_INTERVAL_S = 10.0
JWKS_MAX_AGE_S = 3600.0

FetchJwks = Callable[[str], Awaitable[dict[str, Any]]]
Clock = Callable[[], float]

_ALGORITHMS = {
    name: impl for name, impl in get_default_algorithms().items() if name in HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS
}
_PUBLIC_KEY_TYPES = (RSAPublicKey, EllipticCurvePublicKey, Ed25519PublicKey, Ed448PublicKey)
# Three base64url segments (trailing `=` tolerated, as some issuers send it); the signature may be empty.
_JWT_SHAPE = re.compile(r"([A-Za-z0-9_-]+)={0,2}\.([A-Za-z0-9_-]+)={0,2}\.([A-Za-z0-9_-]*)={0,2}")
_MAX_HEADER_CHARS = 4096


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    issuer: str
    tenant: str
    user: str | None
    roles: frozenset[str]
    claims: Mapping[str, Any]


def looks_like_jwt(token: str) -> bool:
    """Three base64url segments whose first decodes to a JSON object with `alg`: cheap, and no verification."""
    match = _JWT_SHAPE.fullmatch(token)
    if match is None or len(match.group(1)) > _MAX_HEADER_CHARS:
        return False
    try:
        header = orjson.loads(_b64decode(match.group(1)))
    except ValueError:
        return False
    return isinstance(header, dict) and isinstance(header.get("alg"), str)


def _b64decode(segment: str) -> bytes:
    """Strict base64url: only the canonical encoding of the bytes is accepted (ValueError otherwise)."""
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=") != segment.encode():
        raise ValueError("not canonical base64url")
    return data


class JWTVerifier:
    """Verifies bearer JWTs from the issuers of one `auth.jwt` section; build once, share across requests."""

    def __init__(self, config: JwtConfig, *, fetch_jwks: FetchJwks | None = None, now: Clock = time.time) -> None:
        self._http = _HttpJwksFetcher() if fetch_jwks is None else None
        fetch: FetchJwks = fetch_jwks if fetch_jwks is not None else self._fetch_over_http
        self._now = now
        self._leeway = config.leeway_s
        self._issuers = {issuer.issuer: _Issuer(issuer, fetch, now) for issuer in config.issuers}

    async def verify(self, token: str) -> TokenIdentity:
        header, claims, signing_input, signature = _parse(token)
        iss = claims.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthenticationFailed("The token's issuer (`iss`) is not one this gateway trusts.")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            shown = f" {alg}" if isinstance(alg, str) and (alg in _ALGORITHMS or alg.lower() == "none") else ""
            allowed = ", ".join(sorted(issuer.algorithms))
            raise AuthenticationFailed(f"The token's algorithm{shown} is not allowed for its issuer ({allowed}).")
        key = await issuer.key(header.get("kid"), alg)
        if not _signature_ok(alg, signing_input, key, signature):
            raise AuthenticationFailed("The token's signature is invalid.")
        _check_times(claims, self._now(), self._leeway)
        _check_audience(claims, issuer.audience)
        return issuer.identity(claims)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def _fetch_over_http(self, url: str) -> dict[str, Any]:
        assert self._http is not None
        return await self._http.fetch(url)


def _malformed() -> AuthenticationFailed:
    return AuthenticationFailed("The bearer token is not a well-formed JWT.")


def _parse(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Header, claims, signing input and signature, none of them verified yet."""
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthenticationFailed(f"The bearer token is longer than the {MAX_TOKEN_CHARS} characters accepted.")
    match = _JWT_SHAPE.fullmatch(token)
    if match is None:
        raise _malformed()
    try:
        header = orjson.loads(_b64decode(match.group(1)))
        claims = orjson.loads(_b64decode(match.group(2)))
        signature = _b64decode(match.group(3))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        raise _malformed() from None
    # No critical extensions are understood (RFC 7515 4.1.11), and unencoded payloads (b64) are not taken.
    if not isinstance(header, dict) or not isinstance(claims, dict) or "crit" in header or "b64" in header:
        raise _malformed()
    if "kid" in header and not isinstance(header["kid"], str):
        raise _malformed()
    return header, claims, token.rpartition(".")[0].encode(), signature


def _signature_ok(alg: str, signing_input: bytes, key: Any, signature: bytes) -> bool:
    try:
        return bool(_ALGORITHMS[alg].verify(signing_input, key, signature))
    except (InvalidSignature, PyJWTError, ValueError, TypeError):
        return False


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthenticationFailed(f"The token's `{name}` claim must be a number of seconds since the epoch.")
    return value


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> None:
    exp = _number(claims, "exp")
    if exp is None:
        raise AuthenticationFailed("The token has no expiry time (`exp`); only tokens that expire are accepted.")
    if exp <= now - leeway:
        raise AuthenticationFailed("The token has expired.")
    nbf = _number(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise AuthenticationFailed("The token is not valid yet (`nbf` is in the future).")
    iat = _number(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise AuthenticationFailed("The token was issued in the future (`iat`); check the issuer's clock.")


def _check_audience(claims: Mapping[str, Any], audience: frozenset[str]) -> None:
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not values:
        raise AuthenticationFailed("The token has no audience (`aud`).")
    if not any(isinstance(value, str) and value in audience for value in values):
        raise AuthenticationFailed("The token's audience (`aud`) is not this gateway.")


class _Issuer:
    """One configured issuer: its algorithms, its claims, and its keys (static, or a JWKS)."""

    def __init__(self, config: JwtIssuerConfig, fetch: FetchJwks, now: Clock) -> None:
        self.name = config.issuer
        self.algorithms = frozenset(config.algorithms)
        self.audience = frozenset([config.audience] if isinstance(config.audience, str) else config.audience)
        self._tenant_claim, self._user_claim, self._roles_claim = (
            config.tenant_claim,
            config.user_claim,
            config.roles_claim,
        )
        self._jwks = _Jwks(config, self.algorithms, fetch, now) if config.jwks_url is not None else None
        self._static: dict[str, Any] = {}
        if config.secret is not None:
            secret = config.secret.get_secret_value().encode()
            self._static = {alg: _ALGORITHMS[alg].prepare_key(secret) for alg in self.algorithms}
        elif config.public_key is not None:
            self._static = _prepare(load_pem_public_key(config.public_key.encode()), self.algorithms)
        if self._jwks is None and set(self._static) != self.algorithms:
            raise ValueError(f"issuer {self.name}: the key cannot verify every algorithm listed (unvalidated config?)")

    async def key(self, kid: Any, alg: str) -> Any:
        if self._jwks is None:
            return self._static[alg]  # one key: the kid does not matter
        return await self._jwks.key(kid, alg)

    def identity(self, claims: dict[str, Any]) -> TokenIdentity:
        tenant = claims.get(self._tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise AuthenticationFailed(f"The token has no `{self._tenant_claim}` claim (a string naming the tenant).")
        user = claims.get(self._user_claim)
        if user is not None and not isinstance(user, str):
            raise AuthenticationFailed(f"The token's `{self._user_claim}` claim must be a string.")
        return TokenIdentity(self.name, tenant, user or None, self._roles(claims), MappingProxyType(claims))

    def _roles(self, claims: Mapping[str, Any]) -> frozenset[str]:
        if self._roles_claim is None:
            return frozenset()
        roles = claims.get(self._roles_claim)
        if roles is None:
            return frozenset()
        if isinstance(roles, str):
            return frozenset(roles.split())  # "admin", or space-separated like OAuth's `scope`
        if isinstance(roles, list) and all(isinstance(role, str) for role in roles):
            return frozenset(roles)
        raise AuthenticationFailed(f"The token's `{self._roles_claim}` claim must be a string or a list of strings.")


def _prepare(key: object, algorithms: Iterable[str]) -> dict[str, Any]:
    """The public key made ready for each of `algorithms` it fits (type, curve, size); private keys never."""
    if not isinstance(key, _PUBLIC_KEY_TYPES):
        return {}
    ready: dict[str, Any] = {}
    for alg in algorithms:
        impl = _ALGORITHMS[alg]
        try:
            prepared = impl.prepare_key(key)
        except (PyJWTError, TypeError, ValueError):
            continue
        if impl.check_key_length(prepared) is None:
            ready[alg] = prepared
    return ready


def _jwk_keys(jwk: Any, algorithms: frozenset[str]) -> dict[str, Any]:
    # Shared secrets (`oct`) are never taken from a URL; only signature keys count.
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or jwk.get("kty") not in ("RSA", "EC", "OKP"):
        return {}
    alg = jwk.get("alg")
    if alg is not None and not isinstance(alg, str):
        return {}
    wanted = algorithms if alg is None else algorithms & {alg}
    if not wanted:
        return {}
    try:
        parsed = PyJWK(jwk)
    except Exception:  # one broken key is skipped, not fatal to the set
        return {}
    return _prepare(parsed.key, wanted)


@dataclass(frozen=True, slots=True)
class _KeySet:
    """A JWKS made ready for verification: keys by (kid, alg), and by alg for tokens without a kid."""

    by_kid: dict[tuple[str, str], Any]
    by_alg: dict[str, list[Any]]

    @classmethod
    def from_jwks(cls, document: Any, algorithms: frozenset[str]) -> _KeySet:
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise ValueError("the document has no `keys` list")
        if len(keys) > JWKS_MAX_KEYS:
            raise ValueError(f"the document has {len(keys)} keys, more than the {JWKS_MAX_KEYS} accepted")
        by_kid: dict[tuple[str, str], Any] = {}
        by_alg: dict[str, list[Any]] = {}
        for jwk in keys:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            for alg, key in _jwk_keys(jwk, algorithms).items():
                if isinstance(kid, str):
                    by_kid.setdefault((kid, alg), key)
                by_alg.setdefault(alg, []).append(key)
        if not by_alg:
            raise ValueError(f"the document has no usable key for {', '.join(sorted(algorithms))}")
        return cls(by_kid, by_alg)

    def find(self, kid: Any, alg: str) -> Any | None:
        if kid is not None:
            return self.by_kid.get((kid, alg))
        candidates = self.by_alg.get(alg, [])
        return candidates[0] if len(candidates) == 1 else None


class _Jwks:
    """An issuer's JWKS: fetched lazily, refetched for an unknown kid (rate-limited) or when old."""

    def __init__(self, config: JwtIssuerConfig, algorithms: frozenset[str], fetch: FetchJwks, now: Clock) -> None:
        assert config.jwks_url is not None
        self._issuer, self._url, self._algorithms = config.issuer, config.jwks_url, algorithms
        self._fetch, self._now = fetch, now
        self._keys: _KeySet | None = None
        self._fetched_at = self._attempted_at = -math.inf
        self._lock = asyncio.Lock()  # concurrent verifications share one fetch

    async def key(self, kid: Any, alg: str) -> Any:
        key = self._find(kid, alg)
        # An old set still serves while another request refreshes it.
        if key is not None and (self._fresh() or self._lock.locked()):
            return key
        async with self._lock:
            key = self._find(kid, alg)
            if (key is None or not self._fresh()) and self._may_fetch():
                await self._refresh()
                key = self._find(kid, alg)
        if key is not None:
            return key
        if self._keys is None:
            raise AuthenticationFailed(
                f"The signing keys of the token's issuer ({self._issuer}) could not be fetched; try again later."
            )
        if kid is None:
            raise AuthenticationFailed(f"The token names no key (`kid`), and its issuer has no single {alg} key.")
        raise AuthenticationFailed(f"The token's key (`kid`) is not one its issuer publishes for {alg}.")

    def _find(self, kid: Any, alg: str) -> Any | None:
        return self._keys.find(kid, alg) if self._keys is not None else None

    def _fresh(self) -> bool:
        return 0 <= self._now() - self._fetched_at < JWKS_MAX_AGE_S

    def _may_fetch(self) -> bool:
        elapsed = self._now() - self._attempted_at
        return elapsed >= JWKS_MIN_REFETCH_INTERVAL_S or elapsed < 0  # < 0: the clock went back

    async def _refresh(self) -> None:
        self._attempted_at = self._now()
        try:
            keys = _KeySet.from_jwks(await self._fetch(self._url), self._algorithms)
        except Exception as exc:  # any failure is a 401 for this request, never a 500
            kept = "; keeping the keys fetched before" if self._keys is not None else ""
            reason = str(exc) or type(exc).__name__
            logger.warning("could not fetch the JWKS of issuer %s from %s: %s%s", self._issuer, self._url, reason, kept)
            return
        self._keys, self._fetched_at = keys, self._now()


class _HttpJwksFetcher:
    """GETs JWKS documents with one shared client: 5 s in all, no redirects, no compression, at most 1 MiB."""

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    async def fetch(self, url: str) -> dict[str, Any]:
        if self._client is None:
            # trust_env=False, like the upstream transport: no proxy from the environment.
            self._client = httpx.AsyncClient(timeout=JWKS_TIMEOUT_S, follow_redirects=False, trust_env=False)
        headers = {"accept": "application/json", "accept-encoding": "identity"}
        async with asyncio.timeout(JWKS_TIMEOUT_S), self._client.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            if response.headers.get("content-encoding", "identity") != "identity":
                raise ValueError("the response is compressed, though identity was asked for")
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise ValueError(f"the response is larger than {JWKS_MAX_BYTES} bytes")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("the response is not JSON") from None
        if not isinstance(document, dict):
            raise ValueError("the response is not a JSON object")
        return document

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
