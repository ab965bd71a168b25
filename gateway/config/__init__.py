"""Configuration: the pydantic schema and the loader that validates a YAML file against it."""

from gateway.config.loader import ConfigError, default_config_path, load_config, parse_config
from gateway.config.schema import (
    ApiKeyConfig,
    GatewayConfig,
    ModelConfig,
    PolicyConfig,
    ServerConfig,
    StoreConfig,
    TenantConfig,
    UpstreamConfig,
)

__all__ = [
    "ApiKeyConfig",
    "ConfigError",
    "GatewayConfig",
    "ModelConfig",
    "PolicyConfig",
    "ServerConfig",
    "StoreConfig",
    "TenantConfig",
    "UpstreamConfig",
    "default_config_path",
    "load_config",
    "parse_config",
]
