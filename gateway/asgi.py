"""An importable app factory, for `uvicorn --factory` and multi-worker serving."""

from __future__ import annotations

import os

from gateway.app import GatewayApp, create_app
from gateway.config import ConfigError, default_config_path, load_config
from gateway.metrics import MULTIPROC_ENV


def app_from_env() -> GatewayApp:
    """Build the app from `$GATEWAY_CONFIG` (default config/gateway.yaml).

    With `$PROMETHEUS_MULTIPROC_DIR` set (by `gateway serve --workers N`, or by you before starting
    uvicorn's workers), /metrics merges the numbers of every worker that writes to that directory.
    """
    try:
        config = load_config(default_config_path())
        return create_app(config, metrics_dir=os.environ.get(MULTIPROC_ENV) or None)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
