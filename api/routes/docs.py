"""/docs (Swagger UI) and /redoc, with their scripts and styles served by this process.

FastAPI's own pages load them from a CDN, which leaves them blank on a machine without internet.
The files come from the fastapi-offline package (Swagger UI 5, ReDoc 2, a favicon); only its static
folder is used, mounted at ASSETS_URL by create_app."""
from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

ASSETS_DIR = Path(fastapi_offline.__file__).with_name("static")
ASSETS_URL = "/docs/assets"

router = APIRouter(include_in_schema=False)


def _urls(request: Request) -> tuple[str, str]:
    """The OpenAPI document's URL and the assets' URL prefix, behind a proxy's root_path too."""
    root = request.scope.get("root_path", "")
    return f"{root}{request.app.openapi_url}", f"{root}{ASSETS_URL}"


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    openapi_url, assets = _urls(request)
    return get_swagger_ui_html(openapi_url=openapi_url, title=f"{request.app.title} - Swagger UI",
                               swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                               swagger_css_url=f"{assets}/swagger-ui.css",
                               swagger_favicon_url=f"{assets}/favicon.png")


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    openapi_url, assets = _urls(request)
    return get_redoc_html(openapi_url=openapi_url, title=f"{request.app.title} - ReDoc",
                          redoc_js_url=f"{assets}/redoc.standalone.js",
                          redoc_favicon_url=f"{assets}/favicon.png", with_google_fonts=False)
