"""The `gateway` command line, run as a real process."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from .support import Proc, child_env, free_port


def gateway_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=child_env(),
        check=False,
    )


def test_help() -> None:
    result = gateway_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "check", "keys", "mock-upstream"):
        assert command in result.stdout


def test_keys_hash_prints_bare_sha256() -> None:
    result = gateway_cli("keys", "hash", "sk-gw-test-hash-me")
    assert result.returncode == 0, result.stderr
    assert result.stdout == hashlib.sha256(b"sk-gw-test-hash-me").hexdigest() + "\n"


def test_check_good_config(gateway: Proc) -> None:
    assert gateway.config_path is not None
    result = gateway_cli("check", "--config", str(gateway.config_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{gateway.config_path}: OK"
    summary = "\n".join(lines[1:])
    assert "azure (azure)" in summary
    assert "renamed-model" in summary
    assert "default, limited" in summary
    assert "acme, limited (2 keys)" in summary
    assert "sk-upstream-secret" not in result.stdout


BAD_SHA = """
upstreams: {u: {base_url: "http://127.0.0.1:9/v1"}}
models: {m: {upstream: u}}
tenants:
  acme:
    api_keys: [{id: k1, sha256: "ABC123"}]
"""

BAD_UPSTREAM = """
upstreams: {u: {base_url: "http://127.0.0.1:9/v1"}}
models:
  m: {upstream: u}
  other: {upstream: nowhere}
"""

UNSET_VAR = """
upstreams:
  u: {base_url: "http://127.0.0.1:9/v1", api_key: "${GW_E2E_SURELY_UNSET_VAR}"}
models: {m: {upstream: u}}
"""


@pytest.mark.parametrize(
    ("text", "location", "message"),
    [
        (BAD_SHA, "tenants.acme.api_keys[0].sha256", "expected 64 lowercase hex characters"),
        (BAD_UPSTREAM, "models.other.upstream", "unknown upstream 'nowhere'"),
        (UNSET_VAR, "upstreams.u.api_key", "environment variable GW_E2E_SURELY_UNSET_VAR is not set"),
    ],
    ids=["bad-sha256", "unknown-upstream", "unset-variable"],
)
def test_check_bad_config(tmp_path: Path, text: str, location: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = gateway_cli("check", "--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{path}:{location}: ")
    assert message in lines[0]


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_SHA)
    result = gateway_cli("serve", "--config", str(path), "--port", str(free_port()))
    assert result.returncode == 1
    assert f"{path}:tenants.acme.api_keys[0].sha256:" in result.stderr
