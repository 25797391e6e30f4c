"""A server that goes away under the page, stream running, and comes back on the same
address: the page says so (the stream's error, a banner, the status pill) and carries
on by itself once the server answers again. Runs last: it restarts the module's server."""

from __future__ import annotations

import pytest

from tests.dashboard.conftest import assert_local

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402


def test_the_page_survives_a_server_restart(tab, dashboard):
    tab.open("sample")
    tab.select_option("#sample-form [name=generator]", "digits")
    tab.fill("#sample-form [name=n]", "60000")
    tab.fill("#sample-form [name=steps]", "5000")
    tab.fill("#sample-form [name='p.chains']", "64")
    tab.click("#sample-run")
    expect(tab.locator("#stream-count")).to_contain_text("received")

    dashboard.stop()
    expect(tab.locator("#sample-error")).to_contain_text("Stream:", timeout=30_000)
    expect(tab.locator("#sample-status")).to_have_text("failed")
    expect(tab.locator("#conn")).to_have_class("pill down", timeout=15_000)
    expect(tab.locator("#banner")).to_contain_text("does not answer")

    dashboard.start()
    expect(tab.locator("#conn")).to_have_class("pill ready", timeout=30_000)
    expect(tab.locator("#banner")).to_be_hidden()
    expect(tab.locator("#toasts")).to_contain_text("Connected to the server again")

    tab.select_option("#sample-form [name=generator]", "toy25")
    tab.fill("#sample-form [name=n]", "300")
    tab.fill("#sample-form [name=steps]", "100")
    tab.click("#sample-run")
    expect(tab.locator("#sample-status")).to_have_class("status done", timeout=60_000)
    expect(tab.locator("#sample-error")).to_be_hidden()
    assert_local(tab)
