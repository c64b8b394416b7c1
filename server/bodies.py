"""What a route's request body may be: its media type (415 otherwise), checked before any of it
is read, and for JSON how strictly it is decoded. Sizes are limited elsewhere: JSON bodies by
Litestar (`request_max_body_size`, from --max-body-mb), uploads by server.uploads as they stream
(--max-upload-mb).

A route that takes a `data` parameter takes JSON; a route that reads the body itself says what it
takes with `opt=accepts(...)`. A JSON route also takes a request without Content-Type (curl -d
sends form encoding, but scripts often send none): the body is then parsed as JSON, as before.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.handlers import HTTPRouteHandler
from multipart import parse_options_header

from server.errors import UnsupportedMediaTypeError, decode_body

JSON = "application/json"
MULTIPART = "multipart/form-data"
_OPT_KEY = "body_media_types"


def accepts(*media_types: str) -> dict[str, Any]:
    """`opt` for a route that reads its body itself: the media types it takes (JSON, MULTIPART)."""
    return {_OPT_KEY: media_types}


def body_media_types(handler: HTTPRouteHandler) -> tuple[str, ...]:
    """The media types `handler` takes a body in; () for a route without a body."""
    declared = handler.opt.get(_OPT_KEY)
    if declared is not None:
        return tuple(declared)
    return (JSON,) if "data" in handler.parsed_fn_signature.parameters else ()


def _is_json(media_type: str) -> bool:
    return media_type == JSON or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def require_body_media_type(request: Request[Any, Any, Any]) -> None:
    """Litestar `before_request` hook: 415 for a body in a media type its route does not take."""
    handler = request.route_handler
    if not isinstance(handler, HTTPRouteHandler):
        return
    taken = body_media_types(handler)
    if not taken:
        return
    header = request.headers.get("content-type")
    if header is None and JSON in taken:
        return
    media_type = parse_options_header(header or "")[0].lower()
    if (JSON in taken and _is_json(media_type)) or media_type in taken:
        return
    how = {
        JSON: "Content-Type: application/json (curl: -H 'Content-Type: application/json')",
        MULTIPART: "multipart/form-data (curl: -F field=value -F file=@PATH)",
    }
    sent = f"Content-Type {header!r}" if header else "a body without Content-Type"
    raise UnsupportedMediaTypeError(
        f"{request.method} {request.url.path} does not take {sent}: send "
        f"{' or '.join(how[t] for t in taken)}."
    )


class StrictJSONRequest(Request[Any, Any, Any]):
    """The app's request class: a route's JSON body is decoded straight into its `data` Struct,
    with msgspec's strict rules.

    Litestar would decode to dicts and lists, then convert in lax mode (made for query strings),
    which takes `"ignore_eos": 0`, `"n": "2"` or `"max_tokens": 1.5` as valid. The OpenAI API
    refuses those, and so does the schema this server publishes.
    """

    async def json(self) -> Any:
        handler = self.route_handler
        data = (
            handler.parsed_fn_signature.parameters.get("data")
            if isinstance(handler, HTTPRouteHandler)
            else None
        )
        if data is None or not isinstance(data.annotation, type):
            return await super().json()
        if not issubclass(data.annotation, msgspec.Struct):
            return await super().json()
        # The same 400s (naming the field) as before; Litestar passes the Struct through as is.
        return decode_body(await self.body(), data.annotation)
