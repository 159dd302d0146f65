"""The API's docs pages, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served with their scripts from
this server: FastAPI's own pages load them from a public CDN, and were blank without internet.

The scripts come from the installed ``fastapi-offline`` package (its ``static/`` directory: Swagger UI's
bundle and stylesheet, ReDoc's standalone bundle and a favicon); the pages are FastAPI's
``get_swagger_ui_html`` and ``get_redoc_html`` pointed at them. Like the schema, the pages need no token.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from service.api.errors import Problem

ASSETS = "/docs/assets"
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
SWAGGER_UI_PARAMETERS = {
    "validatorUrl": None,  # Swagger UI would otherwise send the schema to its public validator
    "displayOperationId": True,
}
# Like the dashboard's (service/dashboard/pages.py): scripts and requests go only to this server. Swagger
# UI's page starts it with one inline script, allowed by its hash; ReDoc runs its search in a blob: worker.
CSP = (
    "default-src 'self'; script-src 'self'{inline}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    page = get_swagger_ui_html(
        openapi_url=root + str(request.app.openapi_url),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
        swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
    )
    return with_csp(page)


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    page = get_redoc_html(
        openapi_url=root + str(request.app.openapi_url),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
        with_google_fonts=False,
    )
    return with_csp(page)


@router.get(ASSETS + "/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSET_TYPES:
        raise Problem(404, f"no docs asset {name!r}")
    return FileResponse(
        assets_dir() / name, media_type=ASSET_TYPES[name], headers={"Cache-Control": "public, max-age=86400"}
    )


def assets_dir() -> Path:
    spec = importlib.util.find_spec("fastapi_offline")  # located, not imported
    if spec is None or spec.origin is None:
        raise Problem(404, "the fastapi-offline package is not installed; the docs pages cannot load their scripts")
    return Path(spec.origin).parent / "static"


def with_csp(page: HTMLResponse) -> HTMLResponse:
    """The page with a CSP that allows its inline scripts by their sha256, and nothing else inline."""
    body = bytes(page.body).decode()
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in INLINE_SCRIPT.findall(body)
    )
    page.headers["Content-Security-Policy"] = CSP.format(inline=hashes)
    return page
