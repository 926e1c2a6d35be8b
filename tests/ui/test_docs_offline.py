"""/docs and /redoc render with no internet: their scripts and styles come from this server (the
open_page fixture refuses, and fails the test on, any request that leaves the test server)."""
from __future__ import annotations

import pytest

from tests.api.conftest import ApiRunner
from tests.ui.conftest import screenshot

expect = pytest.importorskip("playwright.sync_api", reason="the UI tests need the playwright package: "
                             "pip install -e '.[test]' (and Chromium: apt-get install chromium)").expect


def test_swagger_ui_renders_from_local_assets(api_runner: ApiRunner, open_page) -> None:
    api = api_runner.start()
    page = open_page(f"{api.url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("knowpatch")
    expect(page.locator(".opblock-summary-path[data-path='/edits/{edit_id}/rollback']")).to_be_visible()
    screenshot(page, "swagger-ui", full_page=False)
    loaded = page.evaluate("performance.getEntriesByType('resource').map((entry) => entry.name)")
    assert f"{api.url}/docs/assets/swagger-ui-bundle.js" in loaded and f"{api.url}/docs/assets/swagger-ui.css" in loaded
    assert f"{api.url}/openapi.json" in loaded


def test_redoc_renders_from_local_assets(api_runner: ApiRunner, open_page) -> None:
    api = api_runner.start()
    # Redoc's sidebar footer shows Redocly's logo from their CDN, unconditionally; offline the image
    # fails and Redoc hides it. Nothing else may leave the machine.
    page = open_page(f"{api.url}/redoc", tolerated=("https://cdn.redoc.ly/redoc/logo-mini.svg",))
    expect(page.locator("h1").first).to_contain_text("knowpatch")
    expect(page.get_by_text("Queue the rollback of an applied edit").first).to_be_attached()
    screenshot(page, "redoc", full_page=False)


def test_the_ui_and_docs_routes_stay_out_of_the_openapi_document(api_runner: ApiRunner) -> None:
    paths = api_runner.start().as_(None).get("/openapi.json").json()["paths"]
    assert not {"/ui", "/docs", "/redoc"} & set(paths)
