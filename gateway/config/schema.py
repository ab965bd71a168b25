"""The config file's shape. Every model forbids unknown keys so a typo fails at startup."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_HEX64 = re.compile(r"[0-9a-f]{64}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    workers: Annotated[int, Field(ge=1)] = 1
    max_body_bytes: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024


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


class ModelConfig(_Model):
    upstream: str
    upstream_model: str | None = None
    fallbacks: list[str] = []


class PolicyConfig(_Model):
    models: list[str] = ["*"]

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


class GatewayConfig(_Model):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    admin: AdminConfig = AdminConfig()
    upstreams: dict[str, UpstreamConfig] = {}
    models: dict[str, ModelConfig] = {}
    policies: dict[str, PolicyConfig] = {"default": PolicyConfig()}
    tenants: dict[str, TenantConfig] = {}
