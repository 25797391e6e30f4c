"""Fixtures shared across test packages: a real `imh serve` process on a free port.

`imh_server` is a factory: `imh_server(env={...})` starts `python -m service.cli serve`
on a free loopback port with the given IMH_* variables, waits until /readyz answers 200,
and stops it when the session ends. Nothing here sleeps a fixed time: it polls with a
deadline and shows the server's log when the deadline passes.

(The Redis fixture of the distributed mode will live here too.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180.0  # importing torch and loading models on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def alive(self) -> bool:
        return self.process.poll() is None


def start_server(env: dict[str, str], log_path: Path) -> Server:
    port = free_port()
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "IMH_LOG_LEVEL": "warning", **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if not server.alive():
            raise RuntimeError(f"imh serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"imh serve was not ready in {READY_TIMEOUT_S}s:\n{server.log()}")
        time.sleep(0.2)  # polling interval, not an assertion


def stop_server(server: Server) -> None:
    if server.alive():
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session")
def imh_server(tmp_path_factory) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def factory(env: dict[str, str] | None = None) -> Server:
        log_path = tmp_path_factory.mktemp("imh-server") / "server.log"
        server = start_server(env or {}, log_path)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        stop_server(server)
