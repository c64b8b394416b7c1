"""GET /ui: the dashboard, a static page (server/ui/: index.html, app.js, style.css) over the API.

Public like /docs: the page holds no data, and its own API calls carry the key the user types.
Everything it loads comes from these routes, and its Content-Security-Policy lets the browser
reach no other host (the service runs offline; no CDN, no web fonts).
"""

from __future__ import annotations

import functools
import importlib.resources

from litestar import Response, get
from litestar.params import FromPath

from server.errors import NotFoundError
from server.routes.dependencies import Injected
from server.settings import Settings

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# Only this origin, no inline script or style; data: for the empty favicon.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# A page from before a server upgrade must not keep running old script against the new API.
HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP}


@functools.cache
def _read(name: str) -> bytes:
    return (importlib.resources.files("server") / "ui" / name).read_bytes()


@get("/ui", sync_to_thread=False, include_in_schema=False)
def dashboard(settings: Injected[Settings]) -> Response[bytes]:
    """The page; it says whether the server needs a key, so it can ask for one first."""
    auth = b"required" if settings.api_key else b"none"
    page = _read("index.html").replace(b"{{auth}}", auth)
    return Response(page, media_type="text/html", headers=HEADERS)


@get("/ui/{name:str}", sync_to_thread=False, include_in_schema=False)
def asset(name: FromPath[str]) -> Response[bytes]:
    if name not in ASSETS:  # a fixed list: no path from the request reaches the file system
        raise NotFoundError(f"/ui/{name} does not exist: the dashboard is at /ui")
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)


route_handlers = [dashboard, asset]
