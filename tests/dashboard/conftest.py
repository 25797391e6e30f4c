"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium driven by
Playwright) against a real `imh serve` process.

The tests skip, naming what is missing, when Chromium or Playwright is not installed.
`dashboard` is one server for this package's tests, on a port of its own so that a test can stop
it and start it again on the same address (a server that restarts under the page).
Each test gets a fresh browser context (its own sessionStorage, so its own job token)
whose every request is recorded: `assert_local(page)` checks that nothing went to any
host but the server.

Screenshots of each view go to the test's temporary folder, and to docs/img as
dashboard_<view>.png when IMH_DASHBOARD_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import READY_TIMEOUT_S, ROOT, Server, free_port, stop_server

CHROMIUM = os.environ.get("IMH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ADMIN_TOKEN = "dashboard-admin-token-0123456789"
VIEWPORT = {"width": 1400, "height": 1000}
DOCS_IMG = ROOT / "docs" / "img"


def _need_browser() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed: pip install playwright")


@dataclass
class Dashboard:
    """One `imh serve` on a fixed port, which `restart()` keeps."""

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    server: Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> None:
        log = self.log_path.open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli.main", "serve", "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=ROOT, env={**os.environ, "IMH_LOG_LEVEL": "warning", **self.env},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.server = Server(self.url, process, self.log_path)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        assert self.server is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if not self.server.alive():
                raise RuntimeError(f"imh serve exited:\n{self.server.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"imh serve was not ready in time:\n{self.server.log()}")
            time.sleep(0.2)  # polling interval, not an assertion

    def stop(self) -> None:
        if self.server is not None:
            stop_server(self.server)

    def summary(self) -> dict:
        return httpx.get(f"{self.url}/v1/summary", timeout=10).json()


@pytest.fixture(scope="package")
def dashboard(tmp_path_factory) -> Iterator[Dashboard]:
    _need_browser()
    store = tmp_path_factory.mktemp("dashboard-store")
    server = Dashboard(
        {
            "IMH_MODEL_STORE": str(store),
            "IMH_ADMIN_TOKEN": ADMIN_TOKEN,
            "IMH_TORCH_THREADS": "1",
            "IMH_METRICS_INTERVAL_S": "0.1",
            "IMH_JOB_SHARD_ROWS": "2000",
        },
        tmp_path_factory.mktemp("dashboard-log") / "server.log",
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """A page with every request it made (URLs), the ones its Content-Security-Policy
    stopped inside the browser, and its uncaught errors."""

    def __init__(self, page, base: str):
        self.page, self.base = page, base
        self.requests: list[str] = []
        self.blocked: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("requestfailed", self._failed)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _failed(self, request) -> None:
        if request.failure == "csp":  # refused before it reached the network
            self.blocked.append(request.url)

    def __getattr__(self, name):
        return getattr(self.page, name)

    def open(self, view: str = "") -> None:
        self.page.goto(f"{self.base}/#{view}" if view else f"{self.base}/")
        self.page.wait_for_selector("body[data-ready='1']", state="attached")

    def view(self, name: str) -> None:
        self.page.evaluate("name => { location.hash = name; }", name)
        self.page.wait_for_selector(f"#view-{name}:not([hidden])")

    def foreign(self) -> list[str]:
        """Requests that went to anything but the server (data: and blob: URLs stay in the
        page; what the page's CSP refused never reached the network)."""
        own = urlsplit(self.base).netloc
        return [
            u for u in self.requests
            if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).netloc != own
            and u not in self.blocked
        ]  # fmt: skip


@pytest.fixture
def open_tab(browser) -> Iterator[Callable[[str], Page]]:
    """Fresh browser contexts (each its own sessionStorage) on a server's base URL."""
    contexts = []

    def open_one(base: str) -> Page:
        context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        context.set_default_timeout(30_000)
        contexts.append(context)
        return Page(context.new_page(), base)

    yield open_one
    for context in contexts:
        context.close()


@pytest.fixture
def tab(open_tab, dashboard) -> Page:
    return open_tab(dashboard.url)


def assert_local(page: Page) -> None:
    assert page.foreign() == [], f"requests to other hosts: {page.foreign()}"
    assert page.errors == [], f"uncaught errors in the page: {page.errors}"


@pytest.fixture
def screenshot(tmp_path) -> Callable[[Page, str], Path]:
    def take(page: Page, view: str) -> Path:
        path = tmp_path / f"dashboard_{view}.png"
        page.page.screenshot(path=str(path), full_page=True)
        if os.environ.get("IMH_DASHBOARD_SCREENSHOTS") == "1":
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_IMG / path.name)
        return path

    return take
