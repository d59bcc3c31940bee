"""What a browser gets: the page at ``/`` that tries ``POST /segment``, and the API documentation
at ``/docs`` (Swagger UI) with every asset served from the package, so both work offline.

There is no ``/redoc``: ReDoc fetches its logo from its vendor's CDN whatever it is given, and
Swagger UI already shows every parameter and error."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["install_pages"]

STATIC = Path(str(files("service.http") / "static"))
# Swagger UI's bundle, as the fastapi-offline package ships it.
DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))

# The page loads nothing but its own files; results are shown from blob: URLs.
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def install_pages(app: FastAPI) -> None:
    """Add ``/``, ``/static`` and ``/docs`` to an app created with its default docs turned off
    (``docs_url=None, redoc_url=None``)."""
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    # The more specific mount first: /static/docs would otherwise be looked for in STATIC.
    app.mount("/static/docs", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": _PAGE_CSP},
        )

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} – API documentation",
            swagger_js_url=f"{root}/static/docs/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/static/docs/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/favicon.svg",
            oauth2_redirect_url=root + oauth2_redirect,
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
