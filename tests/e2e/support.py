"""Helpers for the end-to-end fixtures: real `gateway mock-upstream` and `gateway serve` processes on free local ports.

Processes are session-scoped (starting Python costs ~1 s each); tests tag the requests they send with a
unique `x-mock-tag` header (the gateway forwards `x-mock-*`) to find them again in GET /mock/requests.
Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

HOST = "127.0.0.1"
UPSTREAM_KEY = "sk-upstream-secret"
WRONG_UPSTREAM_KEY = "sk-upstream-wrong-key"
ACME_KEY = "sk-gw-test-acme-0123456789"
LIMITED_KEY = "sk-gw-test-limited-0123456789"
AZURE_API_VERSION = "2024-10-21"
AZURE_DEPLOYMENT = "my-deployment"
STARTUP_DEADLINE_S = 20.0

# Every model the main gateway config defines, in config order (GET /v1/models keeps it).
ALL_MODELS = [
    "gpt-4o-mini",
    "gpt-4o",
    "renamed-model",
    "text-embedding-3-small",
    "azure-gpt",
    "dead-model",
    "dead-with-fallback",
    "bad-auth-model",
    "slow-model",
    "stall-model",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENAI_", "GATEWAY_", "AZURE_")) and "proxy" not in name.lower()
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int
    _log: Any = field(repr=False, default=None)
    config_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return "(no output)"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # A wedged server: kill its process group (it runs in its own session, see start()).
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


def start(name: str, args: list[str], port: int, workdir: Path, env: dict[str, str] | None = None) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    popen = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        env=child_env(env),
        start_new_session=True,
    )
    return Proc(name, popen, log_path, port, log)


def wait_ready(proc: Proc, path: str, headers: dict[str, str] | None = None) -> None:
    """Poll `path` until it answers 200; fail with the process's output if it dies or the deadline passes."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    last = "no answer yet"
    with httpx.Client(base_url=proc.url, timeout=2.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            code = proc.popen.poll()
            if code is not None:
                proc.stop()
                pytest.fail(f"{proc.name} exited with {code} before it was ready; its output:\n{proc.output()}")
            try:
                response = http.get(path, headers=headers)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:300]}"
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.05)
    output = proc.output()
    proc.stop()
    pytest.fail(f"{proc.name} not ready on {proc.url}{path} within {STARTUP_DEADLINE_S}s ({last}); output:\n{output}")


def gateway_config(mock_port: int, dead_port: int, store_url: str, **server: Any) -> dict[str, Any]:
    mock = f"http://{HOST}:{mock_port}"
    fast = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "forward_headers": ["x-mock-*"]}
    return {
        "server": {"host": HOST, **server},
        "store": {"url": store_url},
        "upstreams": {
            "mock": {"base_url": f"{mock}/v1", "api_key": UPSTREAM_KEY, "max_retries": 2, "timeout_s": 10, **fast},
            "azure": {
                "kind": "azure",
                "base_url": mock,
                "api_key": UPSTREAM_KEY,
                "api_version": AZURE_API_VERSION,
                "max_retries": 0,
                **fast,
            },
            "dead": {"base_url": f"http://{HOST}:{dead_port}/v1", "api_key": UPSTREAM_KEY, "max_retries": 1, **fast},
            "badauth": {"base_url": f"{mock}/v1", "api_key": WRONG_UPSTREAM_KEY, "max_retries": 2, **fast},
            "slow": {
                "base_url": f"{mock}/v1",
                "api_key": UPSTREAM_KEY,
                "timeout_s": 0.5,
                "max_retries": 1,
                **fast,
            },
            "stall": {
                "base_url": f"{mock}/v1",
                "api_key": UPSTREAM_KEY,
                "read_timeout_s": 0.3,
                "max_retries": 0,
                **fast,
            },
        },
        "models": {
            "gpt-4o-mini": {"upstream": "mock"},
            "gpt-4o": {"upstream": "mock"},
            "renamed-model": {"upstream": "mock", "upstream_model": "gpt-4.1-mini"},
            "text-embedding-3-small": {"upstream": "mock"},
            "azure-gpt": {"upstream": "azure", "upstream_model": AZURE_DEPLOYMENT},
            "dead-model": {"upstream": "dead"},
            "dead-with-fallback": {"upstream": "dead", "fallbacks": ["gpt-4o-mini"]},
            "bad-auth-model": {"upstream": "badauth"},
            "slow-model": {"upstream": "slow"},
            "stall-model": {"upstream": "stall"},
        },
        "policies": {"default": {}, "limited": {"models": ["gpt-4o-mini"]}},
        "tenants": {
            "acme": {"policy": "default", "api_keys": [{"id": "acme-key", "key": ACME_KEY}]},
            "limited": {"policy": "limited", "api_keys": [{"id": "limited-key", "sha256": sha256_hex(LIMITED_KEY)}]},
        },
    }


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def serve(name: str, config: dict[str, Any], workdir: Path, extra_args: tuple[str, ...] = ()) -> Proc:
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    args = ["serve", "--config", str(config_path), "--port", str(port), *extra_args]
    proc = start(name, args, port, workdir)
    proc.config_path = config_path
    wait_ready(proc, "/healthz")
    return proc
