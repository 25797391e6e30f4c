"""Fixtures shared across test packages: a real `imh serve` process on a free port.

`imh_server` is a factory: `imh_server(env={...})` starts `python -m service.cli.main serve`
on a free loopback port with the given IMH_* variables, waits until /readyz answers 200,
and stops it when the session ends. `start_server(env, log, command="worker")` starts an
`imh worker` the same way. Nothing here sleeps a fixed time: it polls with a deadline and
shows the server's log when the deadline passes.

`redis_url` is a real Redis server: IMH_TEST_REDIS_URL, else 127.0.0.1:6379 when it
answers, else a redis-server this session starts on a free loopback port.
`RedisProcess` starts (and stops, and restarts) a private redis-server with an
append-only file, for tests that take Redis away.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180.0  # importing torch and loading models on a busy 2-core machine


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """The tests' networks are small: on a busy pair of shared cores a second intra-op
    thread only adds waiting (several times slower). Servers the tests start set
    IMH_TORCH_THREADS=1 themselves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def start_server(
    env: dict[str, str], log_path: Path, command: str = "serve", wait_ready: bool = True
) -> Server:
    port = free_port()
    log = log_path.open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli.main",
            command,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env={**os.environ, "IMH_LOG_LEVEL": "warning", **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    probe = "/readyz" if wait_ready else "/healthz"
    while True:
        if not server.alive():
            raise RuntimeError(f"imh serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}{probe}", timeout=2.0).status_code == 200:
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


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


class RedisProcess:
    """A private redis-server with an append-only file in `directory`; stop() and start()
    again keep the data, like a production Redis that restarts."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory, self.port = directory, port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (make test installs it)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not redis_answers(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    given = os.environ.get("IMH_TEST_REDIS_URL")
    if given:
        if not redis_answers(given):
            pytest.fail(f"IMH_TEST_REDIS_URL={given} does not answer PING")
        yield given
        return
    default = "redis://127.0.0.1:6379/0"
    if redis_answers(default):
        yield default
        return
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()
