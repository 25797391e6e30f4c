"""/docs (Swagger UI) and /redoc (ReDoc) render from assets the server ships: the pages
work without a network and ask no other host for anything."""

from __future__ import annotations

import httpx
import pytest

from tests.dashboard.conftest import assert_local

pytest.importorskip("playwright")
pytest.importorskip("fastapi_offline")
from playwright.sync_api import expect  # noqa: E402


def test_swagger_ui_renders_offline(tab):
    tab.goto(f"{tab.base}/docs")
    expect(tab.locator(".swagger-ui .opblock").first).to_be_visible()
    expect(tab.locator(".swagger-ui")).to_contain_text("/v1/sample/stream")
    expect(tab.locator(".swagger-ui")).to_contain_text("/v1/summary")
    assert_local(tab)


def test_redoc_renders_offline(tab):
    tab.goto(f"{tab.base}/redoc")
    expect(tab.locator("redoc h1").first).to_contain_text("imh-service")
    expect(tab.locator("redoc")).to_contain_text("/v1/sample/stream")
    # ReDoc's sidebar would show its vendor's logo from a CDN: the page's policy refuses
    # it in the browser, and the image hides itself.
    assert all("cdn.redoc.ly" in url for url in tab.blocked), tab.blocked
    assert_local(tab)


def test_assets_are_local_and_cached(dashboard):
    for path in ("/docs", "/redoc"):
        page = httpx.get(f"{dashboard.url}{path}").text
        assert "cdn." not in page and "fonts.googleapis" not in page
    asset = httpx.get(f"{dashboard.url}/docs/assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and asset.headers["content-encoding"] == "gzip"
    again = httpx.get(
        f"{dashboard.url}/docs/assets/swagger-ui-bundle.js",
        headers={"if-none-match": asset.headers["etag"]},
    )
    assert again.status_code == 304
    assert httpx.get(f"{dashboard.url}/docs/assets/../app.py").status_code == 404
    assert httpx.get(f"{dashboard.url}/dashboard/../routes/dashboard.py").status_code == 404
