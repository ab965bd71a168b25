"""The `gateway` command: a thin layer over the programmatic API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from gateway import __version__
from gateway.config import ConfigError, GatewayConfig, default_config_path, load_config


def _load(path: str | None) -> tuple[str, GatewayConfig]:
    path = path or default_config_path()
    try:
        return path, load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(1) from None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    path, config = _load(args.config)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    workers = args.workers or config.server.workers
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": "info",
        "access_log": False,
        "loop": "uvloop",
        "http": "httptools",
        "timeout_graceful_shutdown": 30,
        "proxy_headers": False,
    }
    if workers > 1:
        from gateway.metrics import MULTIPROC_ENV, multiprocess_dir

        # Each worker process builds its own app from the same file, so it must be importable by name.
        os.environ["GATEWAY_CONFIG"] = path
        # The workers share their metrics through files in a fresh directory. uvicorn spawns them as new
        # interpreters, which inherit this environment: prometheus_client sees it when they first import it.
        with multiprocess_dir() as metrics_dir:
            previous = os.environ.get(MULTIPROC_ENV)
            os.environ[MULTIPROC_ENV] = metrics_dir
            try:
                uvicorn.run("gateway.asgi:app_from_env", factory=True, workers=workers, **options)
            finally:
                if previous is None:
                    os.environ.pop(MULTIPROC_ENV, None)
                else:
                    os.environ[MULTIPROC_ENV] = previous
    else:
        from gateway.app import create_app

        try:
            app = create_app(config)
        except ConfigError as exc:  # e.g. the prices file named by pricing.file
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            raise SystemExit(1) from None
        uvicorn.run(app, **options)
    return 0


def _check(args: argparse.Namespace) -> int:
    from gateway.store.base import redact_url

    path, config = _load(args.config)
    keys = sum(len(tenant.api_keys) for tenant in config.tenants.values())
    print(f"{path}: OK")
    print(f"  store:     {redact_url(config.store.url)}")
    print(f"  upstreams: {', '.join(f'{n} ({u.kind})' for n, u in config.upstreams.items()) or 'none'}")
    print(f"  models:    {', '.join(config.models) or 'none'}")
    print(f"  policies:  {', '.join(config.policies)}")
    print(f"  tenants:   {', '.join(config.tenants) or 'none'} ({keys} key{'s' if keys != 1 else ''})")
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    from gateway.identity.keys import hash_key

    key = sys.stdin.readline().rstrip("\r\n") if args.key == "-" else args.key
    print(hash_key(key))
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.identity.keyring import KeyRing
    from gateway.identity.tenants import TenantDirectory
    from gateway.store import StoreError, open_store

    path, config = _load(args.config)
    if config.store.url.startswith("memory://"):
        raise SystemExit(
            f"{path}: store.url is memory://, which lives only inside one process: a key created here would "
            "vanish at once. Use the sqlite:/// or redis:// store the gateway runs on."
        )

    async def create() -> str:
        store = open_store(config.store.url)
        try:
            if await TenantDirectory(config, store).resolve(args.tenant) is None:
                raise SystemExit(f"no tenant {args.tenant!r} in the config file or in {store.url}")
            record, key = await KeyRing(config, store).create(args.tenant, args.name)
            print(f"created key {record.id} for tenant {args.tenant!r}; it is shown this once:", file=sys.stderr)
            return key
        finally:
            await store.aclose()

    try:
        print(asyncio.run(create()))
    except StoreError as exc:
        raise SystemExit(str(exc)) from None
    return 0


def _mock_upstream(args: argparse.Namespace) -> int:
    from gateway.mock_upstream import serve

    print(f"mock upstream on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(host=args.host, port=args.port, latency_ms=args.latency_ms, api_key=args.api_key)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="An OpenAI-compatible policy gateway.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    config_help = "config file (default: $GATEWAY_CONFIG, then config/gateway.yaml)"

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help=config_help)
    serve.add_argument("--host", help="address to bind (default: server.host)")
    serve.add_argument("--port", type=int, help="port to bind (default: server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    serve.set_defaults(func=_serve)

    check = commands.add_parser("check", help="validate a config file and summarise it")
    check.add_argument("--config", help=config_help)
    check.set_defaults(func=_check)

    keys = commands.add_parser("keys", help="API key tools").add_subparsers(dest="keys_command", required=True)
    hash_ = keys.add_parser("hash", help="print the sha256 of KEY for a config's `sha256:` field")
    hash_.add_argument("key", help="the key, or - to read it from standard input (keeps it out of shell history)")
    hash_.set_defaults(func=_keys_hash)
    create = keys.add_parser("create", help="create an API key in the configured store and print it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--config", help=config_help)
    create.set_defaults(func=_keys_create)

    mock = commands.add_parser("mock-upstream", help="run a fake OpenAI-compatible model server")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9000)
    mock.add_argument("--latency-ms", type=float, default=0.0, help="delay before every answer")
    mock.add_argument("--api-key", help="require this key from callers")
    mock.set_defaults(func=_mock_upstream)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
