"""End-to-end fixtures: real `gateway mock-upstream` and `gateway serve` processes on free local ports.

Processes are session-scoped and always stopped, also when a test or a start-up fails; see support.py.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .support import (
    ACME_KEY,
    HOST,
    LIMITED_KEY,
    UPSTREAM_KEY,
    Proc,
    free_port,
    gateway_config,
    serve,
    start,
    wait_ready,
)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def mock_upstream(workdir: Path) -> Iterator[Proc]:
    port = free_port()
    proc = start("mock-upstream", ["mock-upstream", "--port", str(port), "--api-key", UPSTREAM_KEY], port, workdir)
    try:
        wait_ready(proc, "/v1/models", headers={"authorization": f"Bearer {UPSTREAM_KEY}"})
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def dead_port() -> Iterator[int]:
    """A port nothing listens on: connecting to it is refused at once.

    The socket stays bound (without listening) for the session, so no other server can take the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def gateway(mock_upstream: Proc, dead_port: int, workdir: Path) -> Iterator[Proc]:
    store = f"sqlite:///{workdir / 'store' / 'gateway.db'}"
    proc = serve("gateway", gateway_config(mock_upstream.port, dead_port, store), workdir)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def small_gateway(mock_upstream: Proc, dead_port: int, workdir: Path) -> Iterator[Proc]:
    """A second gateway: two worker processes and a 2 KiB body limit."""
    config = gateway_config(mock_upstream.port, dead_port, "memory://", max_body_bytes=2048)
    proc = serve("small-gateway", config, workdir, ("--workers", "2"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def mock_http(mock_upstream: Proc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mock_upstream.url, timeout=10.0, trust_env=False) as http:
        yield http


@pytest.fixture(scope="session")
def http(gateway: Proc) -> Iterator[httpx.Client]:
    """A raw HTTP client for the main gateway, for what the SDK cannot send."""
    with httpx.Client(base_url=gateway.url, timeout=10.0, trust_env=False) as client:
        yield client


def make_client(gateway: Proc, key: str = ACME_KEY, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=15.0, **kwargs)


@pytest.fixture(scope="session")
def client(gateway: Proc) -> Iterator[openai.OpenAI]:
    with make_client(gateway) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def limited_client(gateway: Proc) -> Iterator[openai.OpenAI]:
    with make_client(gateway, LIMITED_KEY) as sdk:
        yield sdk


@pytest.fixture
async def async_client(gateway: Proc) -> Any:
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=ACME_KEY, max_retries=0, timeout=15.0) as sdk:
        yield sdk


@pytest.fixture
def tag() -> str:
    """A unique value for `x-mock-tag`, to find this test's requests at the mock."""
    return uuid.uuid4().hex


@pytest.fixture
def upstream_requests(mock_http: httpx.Client) -> Callable[[str], list[dict[str, Any]]]:
    """The requests the mock recorded that carry `x-mock-tag: <tag>`, oldest first."""

    def find(tag: str) -> list[dict[str, Any]]:
        response = mock_http.get("/mock/requests")
        assert response.status_code == 200, response.text
        return [r for r in response.json()["data"] if r["headers"].get("x-mock-tag") == tag]

    return find
