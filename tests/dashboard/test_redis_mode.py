"""The dashboard against the distributed mode: an `imh serve` front end and an `imh
worker` over a real Redis. The page is the same; the Service view says where the work
runs, and streams and jobs go through Redis to the worker."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from tests.conftest import start_server, stop_server
from tests.dashboard.conftest import assert_local

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402


@pytest.fixture(scope="module")
def front_end(redis_url, dashboard, tmp_path_factory):
    # `dashboard` first: it skips the module cleanly when there is no browser.
    folder = tmp_path_factory.mktemp("dashboard-cluster")
    env = {
        "IMH_REDIS_URL": redis_url,
        "IMH_REDIS_PREFIX": f"dash{secrets.token_hex(4)}",
        "IMH_TORCH_THREADS": "1",
        "IMH_HEARTBEAT_S": "0.5",
        "IMH_METRICS_INTERVAL_S": "0.1",
        "IMH_MODEL_STORE": str(folder / "store"),
    }
    # Both start at once: the API turns ready once the worker's heartbeat is in Redis.
    with ThreadPoolExecutor(2) as pool:
        worker_start = pool.submit(start_server, env, folder / "worker.log", "worker")
        api_start = pool.submit(start_server, env, folder / "api.log")
        wait([worker_start, api_start])
    started = [f.result() for f in (worker_start, api_start) if f.exception() is None]
    try:
        worker_start.result()  # raises when the worker did not start
        yield api_start.result()
    finally:
        for server in started:
            stop_server(server)


def test_the_dashboard_works_over_redis(open_tab, front_end):
    tab = open_tab(front_end.url)
    tab.open("service")
    tiles = tab.locator("#service-tiles")
    expect(tiles.locator(".tile[data-tile=mode]")).to_contain_text("distributed")
    expect(tiles.locator(".tile[data-tile=Redis]")).to_contain_text("up")
    expect(tiles.locator(".tile[data-tile=workers]")).to_contain_text("1")
    expect(tab.locator("#service-workers")).to_contain_text("cpu")

    tab.view("sample")
    expect(tab.locator("#sample-form [name=generator] option[value=toy25]")).to_have_count(1)
    tab.select_option("#sample-form [name=generator]", "toy25")
    tab.fill("#sample-form [name=n]", "500")
    tab.fill("#sample-form [name=steps]", "400")
    tab.fill("#sample-form [name='p.chains']", "32")
    tab.click("#sample-run")
    expect(tab.locator("#sample-status")).to_have_class("status done", timeout=60_000)
    expect(tab.locator("#sample-status")).not_to_contain_text("the server counted")
    expect(tab.locator("#stream-count")).to_contain_text("500 received")

    tab.view("jobs")
    generate = tab.locator("#generate-form")
    generate.locator("[name=generator]").select_option("toy25")
    generate.locator("[name=n]").fill("3000")
    generate.locator("button[type=submit]").click()
    expect(tab.locator("#jobs-table .state.succeeded")).to_have_count(1, timeout=90_000)
    assert_local(tab)
