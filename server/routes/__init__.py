"""The API's route handlers, one module per resource; `create_app` mounts `route_handlers()`."""

from __future__ import annotations

from litestar.types import ControllerRouterHandler

from server.routes import files
from server.settings import Settings


def route_handlers(settings: Settings) -> list[ControllerRouterHandler]:
    """Every /v1 route handler. `settings` lets a module be left out or configured per server."""
    return [*files.route_handlers]
