"""`make demo`: the gateway in front of the built-in mock upstream, with a real round trip.

Starts two child processes, `gateway mock-upstream` and `gateway serve --config config/demo.yaml`,
waits until both answer, prints how to call the gateway, sends one plain and one streamed chat
completion through it, then keeps both running until Ctrl-C (or until either of them dies).

    python -m gateway.demo          # run until Ctrl-C
    python -m gateway.demo --once   # the round trip only, then stop (exit status 0 if it worked)

Ports: DEMO_GATEWAY_PORT (default 8080) and DEMO_MOCK_PORT (default 9000).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml

DEMO_KEY = "sk-gw-demo"
MOCK_KEY = "sk-mock-upstream"  # must match upstreams.mock.api_key in config/demo.yaml
DEFAULT_GATEWAY_PORT = 8080  # server.port in config/demo.yaml
DEFAULT_MOCK_PORT = 9000  # the port in upstreams.mock.base_url in config/demo.yaml
DEMO_MODEL = "gpt-4o-mini"
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


class _Stop(Exception):
    """SIGTERM or SIGHUP arrived: shut down as for Ctrl-C."""


def _port_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise DemoError(f"{name}={raw!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise DemoError(f"{name}={port} is not between 1 and 65535")
    return port


def _find_demo_config() -> Path:
    candidates = (
        Path.cwd() / "config" / "demo.yaml",
        Path(__file__).resolve().parent.parent / "config" / "demo.yaml",  # a source checkout
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DemoError("cannot find config/demo.yaml; run the demo from the repository's top folder")


def _config_with_mock_port(source: Path, mock_port: int, folder: Path) -> Path:
    """A copy of the demo config whose upstreams point at the mock on `mock_port`."""
    data: Any = yaml.safe_load(source.read_text(encoding="utf-8"))
    old = f"//{HOST}:{DEFAULT_MOCK_PORT}"
    for upstream in data.get("upstreams", {}).values():
        upstream["base_url"] = str(upstream["base_url"]).replace(old, f"//{HOST}:{mock_port}")
    target = folder / "demo.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return target


def _check_port_free(port: int, variable: str) -> None:
    # Bind as uvicorn will (SO_REUSEADDR), so a port held only by TIME_WAIT connections counts as free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            raise DemoError(
                f"port {port} on {HOST} ({variable}) is already in use: is another `make demo` or gateway running? "
                "Stop it, or choose other ports, e.g. `DEMO_GATEWAY_PORT=8081 DEMO_MOCK_PORT=9001 make demo`."
            ) from None


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM if the demo itself is killed outright."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Child:
    """One child process; its own session, so Ctrl-C reaches only the demo, which then stops it."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.process = subprocess.Popen(  # noqa: S603 - argv is built here from sys.executable
            argv, start_new_session=True, preexec_fn=_die_with_parent
        )

    def exited(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _stop_all(children: Sequence[Child]) -> None:
    """SIGTERM every child at once (each shuts down gracefully), then SIGKILL any still there."""
    for child in reversed(children):
        child.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in reversed(children):
        child.wait_or_kill(deadline)


def _wait_until_up(client: httpx.Client, children: Sequence[Child], urls: Sequence[str]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    pending = list(urls)
    while pending:
        _check_alive(children)
        try:
            if client.get(pending[0], timeout=1.0).status_code == 200:
                pending.pop(0)
                continue
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise DemoError(f"{pending[0]} did not answer within {STARTUP_TIMEOUT_S:g}s; see the log above")
        time.sleep(0.1)


def _check_alive(children: Sequence[Child]) -> None:
    for child in children:
        code = child.exited()
        if code is not None:
            raise DemoError(f"the {child.name} exited with status {code}; see its log above")


def _banner(base_url: str, models: Sequence[str]) -> str:
    body = json.dumps({"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Hello!"}]})
    curl = (
        f"curl {base_url}/chat/completions \\\n"
        f'    -H "Authorization: Bearer {DEMO_KEY}" \\\n'
        f'    -H "Content-Type: application/json" \\\n'
        f"    -d {shlex.quote(body)}"
    )
    python = (
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="{base_url}", api_key="{DEMO_KEY}")\n'
        f'reply = client.chat.completions.create(model="{DEMO_MODEL}",\n'
        '    messages=[{"role": "user", "content": "Hello!"}])\n'
        "print(reply.choices[0].message.content)"
    )
    root = base_url.removesuffix("/v1")
    indent = "    "
    lines = [
        "",
        "=" * 72,
        "The gateway is running in front of a mock model server (no OpenAI key needed).",
        "",
        f"  Base URL:  {base_url}",
        f"  API key:   {DEMO_KEY}",
        f"  Models:    {', '.join(models)}",
        f"  Metrics:   {root}/metrics    Health: {root}/healthz",
        "",
        "curl:",
        "",
        *(indent + line for line in curl.splitlines()),
        "",
        "Python (pip install openai):",
        "",
        *(indent + line for line in python.splitlines()),
        "=" * 72,
        "",
    ]
    return "\n".join(lines)


def _list_models(client: httpx.Client, base_url: str) -> list[str]:
    response = client.get(f"{base_url}/models")
    response.raise_for_status()
    return [str(model["id"]) for model in response.json()["data"]]


def _chat(client: httpx.Client, base_url: str, content: str) -> str:
    request = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": content}]}
    response = client.post(f"{base_url}/chat/completions", json=request)
    if response.status_code != 200:
        raise DemoError(f"the chat completion failed: HTTP {response.status_code} {response.text}")
    return str(response.json()["choices"][0]["message"]["content"])


def _chat_stream(client: httpx.Client, base_url: str, content: str) -> Iterator[str]:
    """The content deltas of a streamed chat completion, as they arrive."""
    request = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": content}], "stream": True}
    with client.stream("POST", f"{base_url}/chat/completions", json=request) as response:
        if response.status_code != 200:
            raise DemoError(f"the streamed chat completion failed: HTTP {response.status_code} {response.read()!r}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise DemoError(f"the stream ended with an error: {event['error'].get('message')}")
            for choice in event.get("choices", []):
                delta = choice.get("delta", {}).get("content")
                if delta:
                    yield str(delta)
    raise DemoError("the stream ended without its final `data: [DONE]`")


def _round_trip(client: httpx.Client, base_url: str) -> None:
    print(f"Round trip through the gateway ({DEMO_MODEL}):", flush=True)
    question = "Hello, gateway!"
    print(f"  plain     > {question}")
    print(f"            < {_chat(client, base_url, question)}", flush=True)
    question = "Stream me a few words, please."
    print(f"  streamed  > {question}")
    print("            < ", end="", flush=True)
    pieces = 0
    for piece in _chat_stream(client, base_url, question):
        print(piece, end="", flush=True)
        pieces += 1
    print(f"   ({pieces} chunks)", flush=True)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def run(once: bool) -> int:
    gateway_port = _port_from_env("DEMO_GATEWAY_PORT", DEFAULT_GATEWAY_PORT)
    mock_port = _port_from_env("DEMO_MOCK_PORT", DEFAULT_MOCK_PORT)
    if gateway_port == mock_port:
        raise DemoError("DEMO_GATEWAY_PORT and DEMO_MOCK_PORT must differ")
    _check_port_free(mock_port, "DEMO_MOCK_PORT")
    _check_port_free(gateway_port, "DEMO_GATEWAY_PORT")
    base_url = f"http://{HOST}:{gateway_port}/v1"
    children: list[Child] = []
    with contextlib.ExitStack() as cleanup:
        config = _find_demo_config()
        if mock_port != DEFAULT_MOCK_PORT:
            folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="gateway-demo-")))
            config = _config_with_mock_port(config, mock_port, folder)
        cleanup.callback(_stop_all, children)
        # trust_env=False: a proxy set in the environment must not intercept calls to 127.0.0.1.
        client = cleanup.enter_context(
            httpx.Client(headers={"authorization": f"Bearer {DEMO_KEY}"}, timeout=30.0, trust_env=False)
        )
        python = sys.executable
        mock_argv = [python, "-m", "gateway", "mock-upstream", "--port", str(mock_port), "--api-key", MOCK_KEY]
        children.append(Child("mock upstream", mock_argv))
        gateway_argv = [python, "-m", "gateway", "serve", "--config", str(config), "--port", str(gateway_port)]
        children.append(Child("gateway", gateway_argv))
        print(f"Starting the mock upstream on :{mock_port} and the gateway on :{gateway_port} ...", flush=True)
        _wait_until_up(
            client, children, [f"http://{HOST}:{mock_port}/mock/stats", f"http://{HOST}:{gateway_port}/healthz"]
        )
        print(_banner(base_url, _list_models(client, base_url)), flush=True)
        _round_trip(client, base_url)
        if once:
            print("\nThe demo worked. Stopping (--once).", flush=True)
            return 0
        print("\nThe demo is running; press Ctrl-C to stop it.", flush=True)
        while True:
            _check_alive(children)
            time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.demo", description="Run the gateway in front of the mock upstream."
    )
    parser.add_argument("--once", action="store_true", help="run the round trip, then stop both servers")
    args = parser.parse_args(argv)
    # Ctrl-C must stop the demo even when it was started with SIGINT ignored (e.g. `make demo &` in a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        return run(args.once)
    except (KeyboardInterrupt, _Stop):
        print("\nStopped the gateway and the mock upstream.", flush=True)
        return 0
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        return 1
    except httpx.HTTPError as exc:
        print(f"demo: a request to the gateway failed: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
