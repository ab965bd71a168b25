"""An importable app factory, for `uvicorn --factory` and multi-worker serving."""

from __future__ import annotations

from gateway.app import GatewayApp, create_app
from gateway.config import ConfigError, default_config_path, load_config


def app_from_env() -> GatewayApp:
    """Build the app from `$GATEWAY_CONFIG` (default config/gateway.yaml)."""
    try:
        return create_app(load_config(default_config_path()))
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
