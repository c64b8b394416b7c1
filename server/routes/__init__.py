"""The API's route handlers, one module per resource; `create_app` mounts `route_handlers()`.

Route functions receive what the app provides by name, marked with `Injected[...]`
(server.routes.dependencies): `settings: Injected[Settings]`, `db: Injected[Database]`,
`metrics: Injected[Metrics]`, `engine: Injected[EngineClient | None]` (None when the server runs
without a model).
"""

from __future__ import annotations

from litestar.types import ControllerRouterHandler

from server.routes import adapters, completions, files, fine_tuning, models, sql, tokenizer, ui
from server.routes.options import options_handlers
from server.settings import Settings


def route_handlers(settings: Settings) -> list[ControllerRouterHandler]:
    """Every API route handler (/v1, and vLLM's unversioned tokenizer routes), and OPTIONS for
    each path (first: see server.routes.options). `settings` lets a module be left out or
    configured per server."""
    handlers: list[ControllerRouterHandler] = [
        *completions.route_handlers,
        *models.route_handlers,
        *adapters.route_handlers,
        *files.route_handlers,
        *sql.route_handlers,
        *fine_tuning.handlers(settings),
        *tokenizer.route_handlers,
        *ui.route_handlers,
    ]
    return [*options_handlers(handlers), *handlers]
