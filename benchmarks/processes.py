"""`imh serve` and `imh worker` processes for the benchmarks: a free port, ready on return.

Example:
    >>> server = Process("serve", {**os.environ, "IMH_LOG_LEVEL": "warning"})
    >>> httpx.get(f"{server.url}/healthz"); server.stop()
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """An `imh serve` or `imh worker` on a free port, ready (GET /readyz 200) on return."""

    def __init__(self, command: str, env: dict[str, str], timeout_s: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli.main", command, "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=ROOT, env=env,
        )  # fmt: skip
        try:
            self._wait_ready(command, time.monotonic() + timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, command: str, deadline: float) -> None:
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, f"imh {command} exited"
            assert time.monotonic() < deadline, f"imh {command} not ready"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
