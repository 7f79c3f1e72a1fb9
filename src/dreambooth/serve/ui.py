"""The web UI of `dreambooth serve`: a page at `/` over the server's own API, no build step.

The page (`static/index.html`, `app.js`, `style.css`, shipped in the package) creates
fine-tuning jobs from dropped photos, follows a job's progress, loss and validation images,
downloads its results and tries its model (`/v1/fine_tuning/jobs`, `/v1/images/generations`,
`/v1/models`). The assets hold no data, so they need no API key; everything the page shows it
fetches with the key as an `Authorization` header (the key is kept in the tab's
sessionStorage, never in a URL). The answers carry a Content-Security-Policy that allows only
this server's own scripts, styles and requests (images also from blob: and data: URLs).
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from dreambooth.serve.schemas import APIError

STATIC = Path(__file__).parent / "static"
ASSETS_PATH = "/ui"
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_ASSET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\.(?:js|css|svg)")
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated, so an upgraded server's page shows at once
}

ui_router = APIRouter()


def _asset(name: str) -> Response:
    path = STATIC / name
    if not path.is_file():
        raise APIError(404, f"No web UI file '{name}'.", code="not_found")
    return Response(path.read_bytes(), media_type=_CONTENT_TYPES[path.suffix],
                    headers=_HEADERS)


@ui_router.get("/", include_in_schema=False)
async def index() -> Response:
    return _asset("index.html")


@ui_router.get(ASSETS_PATH + "/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    # Plain names only: nothing outside static/ is reachable, not even index.html twice.
    if not _ASSET_NAME.fullmatch(name):
        raise APIError(404, f"No web UI file '{name}'.", code="not_found")
    return _asset(name)


__all__ = ["ASSETS_PATH", "STATIC", "ui_router"]
