"""The API's route handlers, one module per resource; `create_app` mounts `route_handlers()`.

Route functions receive what the app provides by name, marked with `Injected[...]`:
`settings: Injected[Settings]`, `db: Injected[Database]`, `metrics: Injected[Metrics]`,
`engine: Injected[EngineClient | None]` (None when the server runs without a model).
"""

from __future__ import annotations

from typing import Annotated, TypeAlias, TypeVar

from litestar.di import Dependency
from litestar.params import SkipValidationMarker
from litestar.types import ControllerRouterHandler

from server.settings import Settings

T = TypeVar("T")

# A dependency the app provides by this parameter's name. Not validated: these are the server's
# own objects (Litestar would otherwise try to msgspec-convert a Database or an engine).
Injected: TypeAlias = Annotated[T, Dependency(kind="named"), SkipValidationMarker()]


def route_handlers(settings: Settings) -> list[ControllerRouterHandler]:
    """Every /v1 route handler. `settings` lets a module be left out or configured per server."""
    # Imported here, not at the top: the route modules import `Injected` from this package.
    from server.routes import adapters, completions, files, fine_tuning, models

    return [
        *completions.route_handlers,
        *models.route_handlers,
        *adapters.route_handlers,
        *files.route_handlers,
        *fine_tuning.handlers(settings),
    ]
