"""OPTIONS for every API path, answering `Allow` with all of the path's methods.

Litestar adds an OPTIONS handler when it registers a path's first handler, and that one keeps
answering with the methods known then: GET /v1/files and POST /v1/files are two handlers, so its
OPTIONS /v1/files left out POST. Registered first, these handlers take that place.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from litestar import Response, route
from litestar.handlers import HTTPRouteHandler
from litestar.status_codes import HTTP_204_NO_CONTENT
from litestar.types import ControllerRouterHandler


def options_handlers(handlers: Sequence[ControllerRouterHandler]) -> list[HTTPRouteHandler]:
    """One OPTIONS handler per path of `handlers` (HTTP route handlers; others are ignored)."""
    methods: dict[str, set[str]] = defaultdict(lambda: {"OPTIONS"})
    for handler in handlers:
        if isinstance(handler, HTTPRouteHandler):
            for path in handler.paths:
                methods[path] |= set(handler.http_methods)
    return [_options(path, ", ".join(sorted(allowed))) for path, allowed in methods.items()]


def _options(path: str, allow: str) -> HTTPRouteHandler:
    def options() -> Response[None]:
        return Response(None, status_code=HTTP_204_NO_CONTENT, headers={"Allow": allow})

    return route(path, http_method="OPTIONS", include_in_schema=False, sync_to_thread=False)(
        options
    )
