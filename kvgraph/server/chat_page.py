"""The chat page at `/` (as llama-server's web UI): plain static files in `static/`, no build step, nothing
loaded from another host (the page sends a Content-Security-Policy that forbids it).

The page and its files are public: with --api-key the page asks for the key and sends it on every API call,
so `is_public` lets GET/HEAD of `/` and `/static/...` through the key check, and nothing else.
"""
from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PREFIX = "/static"

# Everything from this server only: no inline script or style, no other host (the page must work offline);
# data: images for the favicon (which spares the browser a /favicon.ico request).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def is_public(method: str, path: str) -> bool:
    """Whether a request may skip the API key: fetching the page or one of its static files."""
    if method not in ("GET", "HEAD") or ".." in path:
        return False
    return path == "/" or path.startswith(STATIC_PREFIX + "/")


def mount_chat_page(app) -> None:
    """GET / (the page) and /static/* (its script and style sheet) on a FastAPI app."""

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff"})

    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="chat-static")
