"""The browser page at `/`: plain static files that call only the public API (/models, /predict)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"
# Only the page's own origin; thumbnails are blob: URLs of the user's files, which never leave the
# browser. No inline scripts or styles, no frames, no plugins, no form posts elsewhere.
CSP = "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with the service: revalidated each time, answered 304 when unchanged.
    "Cache-Control": "no-cache",
}
# An allow-list rather than a folder mount: nothing but these files can be asked for.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

router = APIRouter()


@router.get(
    "/",
    response_class=FileResponse,
    summary="A page to try the models in a browser",
    description="Pick a model, drop, choose or paste images, and see each one's top-k labels; it calls only /models and /predict.",
    responses={200: {"content": {"text/html": {}}}},
)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no such page file: {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
