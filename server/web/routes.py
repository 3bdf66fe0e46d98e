"""``GET /`` and ``GET /ui/{file}``: the web UI's page, script and style sheet.

The UI is plain HTML, CSS and JavaScript modules under ``static/`` (no build step: nothing in
it needs one). Every answer carries a Content-Security-Policy that allows scripts, styles and
connections to this origin only, with no inline script or style, and forbids framing; the
access token lives in the page's memory and the refresh token in an httpOnly, SameSite=Strict
cookie (see ``POST /api/auth/login`` with ``cookie: true``), so no script can read it.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from server.api.registry import route
from server.errors import ApiError

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> web.Response:
    """A file of ``static/`` by plain name (no folders, no dot files); 404 for anything else."""
    path = STATIC / name
    if "/" in name or "\\" in name or name.startswith(".") or path.suffix not in TYPES or not path.is_file():
        raise ApiError(404, f"the web UI has no file {name!r}", "file")
    return web.Response(
        body=path.read_bytes(), content_type=TYPES[path.suffix], charset="utf-8", headers=SECURITY_HEADERS
    )


@route("GET", "/", permission="public", summary="The web UI (a single page; it logs in itself)")
async def index(request: web.Request) -> web.Response:
    """The page; everything it shows comes from the API with the user's token."""
    return _file("index.html")


@route("GET", "/ui/{file}", permission="public", summary="A script, style sheet or image of the web UI")
async def asset(request: web.Request) -> web.Response:
    """One file of the web UI."""
    return _file(request.match_info["file"])
