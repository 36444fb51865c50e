"""The chat page at ``/``: static files from ``heron/server/web/``, served as they are.

The page is plain HTML, CSS and ES modules (no build step, no CDN): it calls this server's
own ``/v1/models`` and ``/v1/chat/completions``. It is public (a browser cannot send the API
key when it opens a page); it asks for the key and sends it with each API call. A strict
Content-Security-Policy keeps it to its own files and its own server.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from heron.server.protocol import make_error

WEB_DIR = Path(__file__).resolve().parent / "web"
ASSETS = {  # name -> media type: nothing outside this list is served
    "chat.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}
PUBLIC_PATHS = ("/", "/index.html")  # and /web/<asset>: the paths the API key does not guard
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_public(path: str) -> bool:
    """The page and its assets need no API key (the page asks for it itself)."""
    return path in PUBLIC_PATHS or path.removeprefix("/web/") in ASSETS


@cache
def _read(name: str) -> bytes:
    return (WEB_DIR / name).read_bytes()


def _file(name: str, media_type: str) -> Response:
    return Response(_read(name), media_type=media_type, headers=_HEADERS)


def page_size() -> int:
    """Bytes of the page and its assets (what a browser downloads, uncompressed)."""
    return sum(len(_read(name)) for name in ("index.html", *ASSETS))


router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/index.html")
async def index() -> Response:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/web/{name}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        error = make_error(404, f"Not Found: GET /web/{name}")
        return Response(error.model_dump_json(), status_code=404, media_type="application/json")
    return _file(name, media_type)
