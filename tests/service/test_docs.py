"""The docs pages, /docs (Swagger UI) and /redoc (ReDoc): served with their scripts from this server
(the fastapi-offline package), under a Content-Security-Policy, and rendered by a real browser whose
every request to another host is aborted."""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import urlsplit

import pytest

from service.api.docs import ASSET_TYPES, assets_dir
from tests.service.helpers import assert_problem, enable_auth

IMAGE_STOPPED_BY_CSP = re.compile(
    r"Loading the image '([^']+)' violates the following Content Security Policy directive: \"img-src "
)
TIMEOUT_MS = 20_000  # ReDoc parses the whole schema before it draws (about 1 s here)


def test_the_pages_load_their_scripts_from_this_server(client):
    for path in ("/docs", "/redoc"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources and all(source.startswith("/docs/assets/") for source in sources), sources
        assert "googleapis" not in page.text and "cdn." not in page.text
        for source in sources:
            asset = client.get(source)
            assert asset.status_code == 200, source
            assert asset.content == (assets_dir() / source.rsplit("/", 1)[1]).read_bytes()
            assert asset.headers["content-type"].startswith(ASSET_TYPES[source.rsplit("/", 1)[1]])
    assert_problem(client.get("/docs/assets/core.py"), 404, "no docs asset")


def test_the_pages_allow_only_their_own_inline_script(client):
    """Scripts only from this server; Swagger UI's inline start-up script by its hash, and no other."""
    swagger = client.get("/docs")
    policy = swagger.headers["content-security-policy"]
    (inline,) = re.findall(r"<script>(.*?)</script>", swagger.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    script_src = re.search(r"script-src ([^;]*)", policy)
    assert script_src is not None and script_src.group(1).split() == ["'self'", f"'sha256-{digest}'"]
    assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    redoc = client.get("/redoc").headers["content-security-policy"]
    assert "script-src 'self';" in redoc


def test_the_pages_and_the_schema_need_no_token(client, app):
    enable_auth(app)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/favicon.png"):
        assert client.get(path).status_code == 200, path
    assert_problem(client.get("/v1/jobs"), 401, "token")


# ---------------------------------------------------------------- in a browser, offline


def offline_page(browser, live_server):
    """A page on the live server whose requests to any host but 127.0.0.1 are aborted, and recorded."""
    context = browser.new_context(base_url=live_server, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    blocked: list[str] = []
    left: list[str] = []
    errors: list[str] = []

    def route(route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort("internetdisconnected")

    context.route("**/*", route)
    page = context.new_page()
    page.on(
        "requestfinished",
        lambda request: urlsplit(request.url).hostname not in {"127.0.0.1", None} and left.append(request.url),
    )
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    return context, page, blocked, left, errors


@pytest.mark.slow
@pytest.mark.parametrize("backend_settings", ["sqlite"], indirect=True)
def test_the_docs_render_with_the_network_blocked(browser, live_server):
    """From the dashboard's footer to Swagger UI's operations, then ReDoc's: drawn from this server alone."""
    context, page, blocked, left, errors = offline_page(browser, live_server)
    try:
        page.goto("/jobs")
        page.locator('footer a[href="/docs"]').click()
        page.wait_for_url("**/docs")
        page.locator("#operations-plans-create_plan").wait_for()
        shown = page.locator(".opblock-summary-operation-id").all_inner_texts()
        assert {"create_plan", "get_job", "upload_model", "get_sensitivity"} <= set(shown), shown
        assert "mpq" in page.locator(".info .title").inner_text()

        page.goto("/redoc")
        page.locator('[data-section-id="operation/create_plan"]').wait_for()
        assert "Plan per-layer precisions" in page.locator('[data-section-id="operation/create_plan"]').inner_text()
    finally:
        context.close()
    assert not blocked, f"the pages tried to leave 127.0.0.1: {blocked}"
    assert not left, f"requests to other hosts succeeded: {left}"
    # ReDoc's side menu always shows its maker's logo from their CDN (an <img> that hides itself when it
    # fails): the page's CSP stops it before any request is made, and says so on the console.
    images_stopped = [error for error in errors if IMAGE_STOPPED_BY_CSP.match(error)]
    assert len(images_stopped) <= 1, images_stopped
    assert all(urlsplit(IMAGE_STOPPED_BY_CSP.match(e).group(1)).hostname != "127.0.0.1" for e in images_stopped)
    assert not [error for error in errors if error not in images_stopped], f"script errors: {errors}"
