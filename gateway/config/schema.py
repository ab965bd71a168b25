"""The config file's shape. Every model forbids unknown keys so a typo fails at startup."""

from __future__ import annotations

import ipaddress
import re
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import get_default_algorithms
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

_HEX64 = re.compile(r"[0-9a-f]{64}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    workers: Annotated[int, Field(ge=1)] = 1
    max_body_bytes: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024
    # One line per proxied request: ids, tenant, key, end user, model, status, timings. Never a prompt.
    access_log: bool = False


class StoreConfig(_Model):
    url: str = "sqlite:///./gateway.db"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        schemes = ("memory://", "sqlite:///", "redis://", "rediss://")
        if not url.startswith(schemes):
            raise ValueError(f"expected a URL starting with one of {', '.join(schemes)}, got {url!r}")
        return url


class AdminConfig(_Model):
    api_keys: list[SecretStr] = []

    @field_validator("api_keys")
    @classmethod
    def _drop_empty(cls, keys: list[SecretStr]) -> list[SecretStr]:
        # `${GATEWAY_ADMIN_KEY:-}` interpolates to "" when unset: that means "no admin key", not a key.
        return [key for key in keys if key.get_secret_value()]


class UpstreamConfig(_Model):
    kind: Literal["openai", "azure"] = "openai"
    base_url: str
    api_key: SecretStr = SecretStr("")
    api_version: str | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 600.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    max_retries: Annotated[int, Field(ge=0, le=10)] = 2
    backoff_initial_s: Annotated[float, Field(ge=0)] = 0.5
    backoff_max_s: Annotated[float, Field(ge=0)] = 8.0
    max_connections: Annotated[int, Field(ge=1)] = 1000
    headers: dict[str, str] = {}
    forward_headers: list[str] = []

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        return url.rstrip("/")

    @field_validator("forward_headers")
    @classmethod
    def _lowercase(cls, names: list[str]) -> list[str]:
        return [name.lower() for name in names]

    @model_validator(mode="after")
    def _azure_needs_version(self) -> UpstreamConfig:
        if self.kind == "azure" and not self.api_version:
            raise ValueError("an upstream of kind 'azure' needs api_version, e.g. api_version: '2024-10-21'")
        return self


# --- prices: USD per 1M tokens, dated (read by gateway/cost/prices.py; see docs/costs.md) -------------

_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _iso_day(value: Any) -> Any:
    # YAML dates arrive as strings (the loader keeps them so) or, from Python, as date objects.
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str) and _ISO_DAY.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"expected a date as YYYY-MM-DD, got {value!r} ({exc})") from None
    raise ValueError(f"expected a date as YYYY-MM-DD, got {value!r}")


# At most 6 decimal places per 1M tokens, so every cost is a whole number of 10^-12 USD.
UsdPerMillion = Annotated[Decimal, Field(ge=0, decimal_places=6, allow_inf_nan=False)]


class PriceEntry(_Model):
    """USD per 1M tokens from `effective_from` (a UTC day; absent: since always) until the next entry."""

    effective_from: Annotated[date, BeforeValidator(_iso_day)] | None = None
    input: UsdPerMillion
    cached_input: UsdPerMillion | None = None  # absent: cached tokens cost `input`
    output: UsdPerMillion | None = None  # absent (embeddings): any output token leaves the request unpriced


def _one_or_many(value: Any) -> Any:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise ValueError("expected a price entry {input: ..., cached_input: ..., output: ...} or a list of them")


def _distinct_days(entries: list[PriceEntry]) -> list[PriceEntry]:
    if not entries:
        raise ValueError("give at least one price entry")
    seen: dict[date | None, int] = {}
    for index, entry in enumerate(entries):
        day = entry.effective_from
        if day in seen:
            when = f"on {day.isoformat()}" if day else "without effective_from"
            raise ValueError(f"entries [{seen[day]}] and [{index}] both take effect {when}")
        seen[day] = index
    return entries


PriceList = Annotated[list[PriceEntry], BeforeValidator(_one_or_many), AfterValidator(_distinct_days)]


class PricingConfig(_Model):
    unpriced: Literal["record", "reject"] = "record"
    file: Annotated[str, Field(min_length=1)] | None = "config/prices.yaml"


class PricesFile(_Model):
    """The file named by `pricing.file`: `models:` maps a model name to its price entries."""

    models: dict[str, PriceList] = {}


class ModelConfig(_Model):
    upstream: str
    upstream_model: str | None = None
    fallbacks: list[str] = []
    price: PriceList | None = None


class BudgetConfig(_Model):
    """Spend limits in USD over UTC calendar windows (enforced by the budget stage)."""

    # At most $9,000,000: budgets are counted in nano-dollars, exact up to 2**53 in every store.
    usd_per_day: Annotated[float, Field(gt=0, le=9_000_000)] | None = None
    usd_per_month: Annotated[float, Field(gt=0, le=9_000_000)] | None = None
    alert_at: Annotated[float, Field(gt=0, le=1)] = 0.8
    webhook_url: str | None = None
    reserve_max_tokens: Annotated[int, Field(gt=0)] = 4096


class RateLimitConfig(_Model):
    requests_per_minute: Annotated[int, Field(gt=0)] | None = None
    tokens_per_minute: Annotated[int, Field(gt=0)] | None = None


class PolicyConfig(_Model):
    models: list[str] = ["*"]
    budget: BudgetConfig | None = None
    rate_limit: RateLimitConfig | None = None

    def allows_model(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class ApiKeyConfig(_Model):
    id: str
    sha256: str | None = None
    key: SecretStr | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not _HEX64.fullmatch(value):
            raise ValueError("expected 64 lowercase hex characters, the output of `gateway keys hash KEY`")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> ApiKeyConfig:
        if (self.sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of sha256 (preferred) or key")
        return self


class TenantConfig(_Model):
    policy: str = "default"
    api_keys: list[ApiKeyConfig] = []


# --- auth: bearer JWTs from trusted issuers (verified by gateway/identity/jwt.py) -----------------

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "ES256K", "EdDSA"}
)
# RFC 7518 section 3.2: an HMAC key at least as long as the hash.
HMAC_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _public_key_problem(pem: str, algorithm: str) -> str | None:
    """Why `pem` cannot verify `algorithm` tokens (wrong key type, curve or size), or None if it can."""
    algorithm_impl = get_default_algorithms()[algorithm]
    try:
        key = algorithm_impl.prepare_key(load_pem_public_key(pem.encode()))
    except Exception:  # pyjwt raises InvalidKeyError, TypeError or ValueError for a key of the wrong kind
        return f"public_key cannot verify {algorithm} tokens (wrong key type or curve)"
    return algorithm_impl.check_key_length(key)


_NonEmpty = Annotated[str, Field(min_length=1)]


class JwtIssuerConfig(_Model):
    # Field order matters: `algorithms` is checked against the key source validated before it.
    issuer: _NonEmpty
    audience: str | list[str]
    jwks_url: str | None = None
    public_key: str | None = None
    secret: SecretStr | None = None
    algorithms: list[str]
    tenant_claim: _NonEmpty
    user_claim: _NonEmpty = "sub"
    roles_claim: _NonEmpty | None = None

    @field_validator("audience")
    @classmethod
    def _some_audience(cls, audience: str | list[str]) -> str | list[str]:
        values = [audience] if isinstance(audience, str) else audience
        if not values or not all(values):
            raise ValueError("name the audience tokens must be issued for (`aud`), e.g. gateway")
        return audience

    @field_validator("jwks_url")
    @classmethod
    def _safe_jwks_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:
            host = None
        if host and (parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(host))):
            return url
        raise ValueError(f"expected an https:// URL (http:// only to 127.0.0.1, ::1 or localhost), got {url!r}")

    @field_validator("public_key")
    @classmethod
    def _pem_public_key(cls, pem: str | None) -> str | None:
        if pem is None:
            return None
        try:
            load_pem_public_key(pem.encode())
        except (ValueError, TypeError):
            raise ValueError("expected a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
        return pem

    @field_validator("secret")
    @classmethod
    def _long_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is None:
            return None
        if len(secret.get_secret_value().encode()) < HMAC_MIN_SECRET_BYTES["HS256"]:
            raise ValueError("the secret must be at least 32 bytes long (RFC 7518); an empty ${VAR:-} counts too")
        try:
            get_default_algorithms()["HS256"].prepare_key(secret.get_secret_value())
        except Exception:  # pyjwt refuses a PEM, SSH or DER key as an HMAC secret
            raise ValueError("the secret is a public key or certificate; give such a key as public_key") from None
        return secret

    @field_validator("algorithms")
    @classmethod
    def _safe_algorithms(cls, algorithms: list[str], info: ValidationInfo) -> list[str]:
        if not algorithms:
            raise ValueError("list the algorithms the issuer signs with, e.g. [RS256]")
        for algorithm in algorithms:
            if algorithm.lower() == "none":
                raise ValueError("'none' is never accepted: such a token carries no signature")
            if algorithm not in HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
                known = ", ".join(sorted(HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS))
                raise ValueError(f"unknown algorithm {algorithm!r} (known: {known})")
        sources = {name: info.data.get(name) for name in ("jwks_url", "public_key", "secret")}
        given = [name for name, value in sources.items() if value is not None]
        if len(given) == 1:  # otherwise the issuer-level check reports the key source
            _check_algorithms_fit(algorithms, given[0], sources)
        return list(dict.fromkeys(algorithms))

    @model_validator(mode="after")
    def _exactly_one_key_source(self) -> JwtIssuerConfig:
        if sum(value is not None for value in (self.jwks_url, self.public_key, self.secret)) != 1:
            raise ValueError("give exactly one of jwks_url, public_key or secret")
        return self


def _check_algorithms_fit(algorithms: list[str], source: str, sources: dict[str, Any]) -> None:
    if source == "secret":
        wrong = [algorithm for algorithm in algorithms if algorithm not in HMAC_ALGORITHMS]
        if wrong:
            raise ValueError(f"an issuer with a secret may list only HS256, HS384 or HS512, not {', '.join(wrong)}")
        size = len(sources["secret"].get_secret_value().encode())
        for algorithm in algorithms:
            if size < HMAC_MIN_SECRET_BYTES[algorithm]:
                need = HMAC_MIN_SECRET_BYTES[algorithm]
                raise ValueError(f"{algorithm} needs a secret of at least {need} bytes; this one has {size}")
        return
    wrong = [algorithm for algorithm in algorithms if algorithm in HMAC_ALGORITHMS]
    if wrong:
        raise ValueError(
            f"an issuer with {source} may list only asymmetric algorithms (RS*, PS*, ES*, EdDSA), not "
            f"{', '.join(wrong)}: HMAC keyed with a public key is the classic key-confusion attack"
        )
    if source == "public_key":
        for algorithm in algorithms:
            problem = _public_key_problem(sources["public_key"], algorithm)
            if problem:
                raise ValueError(problem)


class JwtConfig(_Model):
    leeway_s: Annotated[float, Field(ge=0, le=60)] = 30.0
    issuers: Annotated[list[JwtIssuerConfig], Field(min_length=1)]

    @field_validator("issuers")
    @classmethod
    def _unique_issuers(cls, issuers: list[JwtIssuerConfig]) -> list[JwtIssuerConfig]:
        seen: dict[str, int] = {}
        for index, issuer in enumerate(issuers):
            if issuer.issuer in seen:
                raise ValueError(f"issuer {issuer.issuer!r} is listed twice (at [{seen[issuer.issuer]}] and [{index}])")
            seen[issuer.issuer] = index
        return issuers


class AuthConfig(_Model):
    jwt: JwtConfig | None = None


class LedgerConfig(_Model):
    """The spend ledger's writes: batched; awaited before an answer completes only if `durable`."""

    # true: an answer's last bytes wait (at most 2 s) until its usage is in the store, so a crash
    # loses nothing a client received; false: written within flush_interval_s, a crash may lose that.
    durable: bool = False
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.2
    commit_delay_s: Annotated[float, Field(ge=0, le=1)] = 0.0


class MetricsLabelsConfig(_Model):
    """Extra labels on the token and cost counters (gateway_tokens, gateway_cost_usd, gateway_unpriced_requests)."""

    key: bool = False  # the API key's id (never the key): one series per key that is used
    user: bool = False  # the end user (`user` field, x-gateway-user or the JWT's user claim), bounded by max_users


class MetricsConfig(_Model):
    """What /metrics exports beyond the fixed set (see docs/metrics.md)."""

    labels: MetricsLabelsConfig = MetricsLabelsConfig()
    # With labels.user: distinct users per process that get their own label value; later ones count as __other__.
    max_users: Annotated[int, Field(ge=1, le=100_000)] = 1000


class GatewayConfig(_Model):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    admin: AdminConfig = AdminConfig()
    auth: AuthConfig = AuthConfig()
    upstreams: dict[str, UpstreamConfig] = {}
    models: dict[str, ModelConfig] = {}
    policies: dict[str, PolicyConfig] = {"default": PolicyConfig()}
    tenants: dict[str, TenantConfig] = {}
    prices: dict[str, PriceList] = {}
    pricing: PricingConfig = PricingConfig()
    ledger: LedgerConfig = LedgerConfig()
    metrics: MetricsConfig = MetricsConfig()
