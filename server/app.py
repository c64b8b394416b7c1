"""The Litestar app: `create_app(settings)` builds it, `run_server(settings)` serves it.

Startup (lifespan): create the data folders, apply database migrations, then start the engine
client and any other services (e.g. the job worker) in order; shutdown stops them in reverse.
Routes get `settings`, `db` (server.db.Database), `metrics` and `engine` (the EngineClient)
injected, never from globals. `/v1/*`, the legacy unversioned `/fine-tunes*` and vLLM's unversioned
`/tokenize`, `/detokenize`, `/tokenizer_info` require the API key when one is set; `/health`, `/ready`, `/metrics` and the API description (`/openapi.json`, `/docs`) are
public: they hold no user data.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import anyio.to_thread
import uvicorn
from litestar import Litestar, Response, Router, get
from litestar._openapi.plugin import handle_schema_path_not_found
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, Guard, HTTPScope, Message, Receive, Send
from swagger_ui_bundle import swagger_ui_path

from server.bodies import StrictJSONRequest, require_body_media_type
from server.db import Database, upgrade_database
from server.engine_client import EngineClient
from server.errors import AuthenticationError, ServiceUnavailableError, exception_handlers
from server.metrics import Metrics, method_label
from server.replicas.storage import check_writable
from server.routes import route_handlers
from server.routes.dependencies import Injected
from server.routes.openapi import ClosedStructSchemaPlugin, errors
from server.schemas.common import BlasStatus, DatabaseStatus, HealthStatus, StorageStatus
from server.settings import Settings

if TYPE_CHECKING:  # the app only passes the registry through to the routes
    from server.adapters import AdapterRegistry

log = logging.getLogger("loraforge.app")
access_log = logging.getLogger("loraforge.access")

# On SIGTERM/Ctrl-C in-flight requests get --shutdown-grace-s to finish; uvicorn waits this
# much longer, so the streams ended at the deadline can still send their error event and [DONE].
SHUTDOWN_FLUSH_S = 5
# Paths that need the API key: the API, the legacy fine-tunes API old clients call without /v1, and
# vLLM's tokenizer routes (lm-eval calls them at the root; its `auth_token` model arg sends the key).
PROTECTED_PREFIXES = ("/v1/", "/fine-tunes", "/tokenize", "/detokenize")
# Swagger UI's scripts, styles and icon come from a Python package, not a CDN: the service runs
# offline, and /docs must work there too.
DOCS_ASSETS = "/docs/assets"


class Service(Protocol):
    """Something the app starts after migrations and stops on shutdown (engine, job worker)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class _SchemaRouter(Router):
    """Litestar's router for /openapi.json and /docs, without its catch-all HTML 404.

    Mounted at "/" (so the schema stays at /openapi.json), that catch-all would answer every
    unknown one-segment path (GET /foo) with an HTML page instead of our OpenAI error object.
    """

    def register(self, value: Any) -> list[Any]:
        if getattr(value, "fn", None) is handle_schema_path_not_found:
            return []
        return super().register(value)


class LoraforgeApp(Litestar):
    """Litestar plus one access-log line and request metrics for every HTTP request.

    This wraps the app's ASGI entry point rather than using Litestar middleware because
    middleware runs only for matched routes, and 404s, 405s and 413s need logging too.
    """

    def __init__(self, *args: Any, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        await self._logged(scope, receive, send)

    async def _logged(self, scope: HTTPScope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 0

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await super().__call__(scope, receive, send_and_note_status)
        finally:
            seconds = time.perf_counter() - start
            method = method_label(scope["method"])
            # The route template ("/v1/files/{file_id}"), not the path, keeps the label set small.
            route = scope.get("path_template") or "unmatched"
            code = str(status or 500)  # no response started: the connection broke first
            self.metrics.http_requests.inc(method=method, route=route, status=code)
            self.metrics.http_request_duration.observe(seconds, method=method, route=route)
            access_log.info(
                "%s %s %s %.1fms", scope["method"][:16], scope["path"], code, seconds * 1000
            )


def api_key_guard(api_key: str | None) -> Guard:
    """A guard requiring `Authorization: Bearer <api_key>` on PROTECTED_PREFIXES; no-op without
    a key."""
    expected = api_key.encode() if api_key else None

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler) -> None:
        if expected is None or not connection.scope["path"].startswith(PROTECTED_PREFIXES):
            return
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                "(openai SDK: OpenAI(api_key=...) or OPENAI_API_KEY).",
                code="missing_api_key",
            )
        # Constant time, so response timing does not reveal how much of a guess was right.
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise AuthenticationError(
                "Incorrect API key provided. Use the key this server was started with "
                "(--api-key / LORAFORGE_API_KEY)."
            )

    return guard


@get("/health", sync_to_thread=False, tags=["service"])
def health() -> HealthStatus:
    """200 while the process is up (liveness)."""
    return HealthStatus("ok")


@get("/ready", tags=["service"], responses=errors(503))
async def ready(
    engine: Injected[EngineClient | None], db: Injected[Database], settings: Injected[Settings]
) -> HealthStatus:
    """200 once the model is loaded, the database answers and the data dir takes writes, so
    requests can be served; else 503 saying which (readiness)."""
    if engine is None:
        raise ServiceUnavailableError(
            "This server runs without a model engine, so it cannot serve completions. Start it "
            "with `loraforge serve` (optionally --model PATH).",
            code="engine_not_started",
        )
    engine.require_ready()  # the same 503 (failed, or still loading) requests get
    # What every replica shares: a replica that lost either must leave the load balancer.
    if (problem := await anyio.to_thread.run_sync(db.ping)) is not None:
        raise ServiceUnavailableError(problem, retry_after_s=5, code="database_unreachable")
    if (problem := await anyio.to_thread.run_sync(check_writable, settings.data_dir)) is not None:
        raise ServiceUnavailableError(problem, retry_after_s=5, code="data_dir_not_writable")
    blas = engine.blas
    return HealthStatus(
        "ready",
        BlasStatus(blas.device, blas.library, round(blas.gflops, 1), blas.slow) if blas else None,
        DatabaseStatus(db.dialect, reachable=True),
        StorageStatus(writable=True),
    )


# Rendered in a worker thread: many label sets take a while, and /health must not wait for it.
@get("/metrics", sync_to_thread=True, tags=["service"], include_in_schema=False)
def metrics_endpoint(metrics: Injected[Metrics]) -> Response[str]:
    """Prometheus text exposition of the server's metrics."""
    return Response(metrics.render(), media_type=Metrics.CONTENT_TYPE)


def _version() -> str:
    try:
        return importlib.metadata.version("loraforge")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "0.0.0+source"


def create_app(
    settings: Settings,
    *,
    engine: EngineClient | None = None,
    services: Sequence[Service] = (),
    metrics: Metrics | None = None,
    adapter_registry: AdapterRegistry | None = None,
) -> Litestar:
    """The app for `settings`. `engine` (None: no model, /ready says 503) and
    `services` are started in order after migrations and stopped in reverse on shutdown;
    pass `metrics` to share one Metrics object with them. `adapter_registry` is injected into
    routes as is (the adapter and model routes need it)."""
    metrics = metrics or Metrics()
    db = Database.open(settings.database_url)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(settings.ensure_dirs)
        await anyio.to_thread.run_sync(upgrade_database, settings.database_url)
        started: list[Service] = []
        try:
            for service in [engine, *services]:
                if service is not None:
                    await service.start()
                    started.append(service)
            yield
        finally:
            for service in reversed(started):
                try:
                    await service.stop()
                except Exception:  # stop the others regardless; say which one failed
                    log.exception("stopping %s failed", type(service).__name__)
            db.close()

    def constant(value: object) -> Provide:
        return Provide(lambda: value, use_cache=True, sync_to_thread=False)

    return LoraforgeApp(
        route_handlers=[
            health,
            ready,
            metrics_endpoint,
            create_static_files_router(
                path=DOCS_ASSETS, directories=[swagger_ui_path], include_in_schema=False
            ),
            *route_handlers(settings),
        ],
        lifespan=[lifespan],
        dependencies={
            "settings": constant(settings),
            "db": constant(db),
            "metrics": constant(metrics),
            "engine": constant(engine),
            "adapter_registry": constant(adapter_registry),
        },
        guards=[api_key_guard(settings.api_key)],
        exception_handlers=exception_handlers(),
        # JSON bodies; the upload routes read theirs themselves, counting against
        # --max-upload-mb (server.uploads).
        request_max_body_size=settings.max_body_bytes,
        # 415 before any of the body is read (a route's own before_request would replace it).
        before_request=require_body_media_type,
        request_class=StrictJSONRequest,
        plugins=[ClosedStructSchemaPlugin()],
        openapi_config=OpenAPIConfig(
            title="loraforge",
            version=_version(),
            summary="OpenAI-compatible serving and LoRA fine-tuning on MLX",
            path="/",  # -> /openapi.json, /openapi.yaml
            openapi_router=_SchemaRouter("/", route_handlers=[], include_in_schema=False),
            render_plugins=[
                SwaggerRenderPlugin(
                    path="/docs",
                    js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                    css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                    standalone_preset_js_url=f"{DOCS_ASSETS}/swagger-ui-standalone-preset.js",
                    favicon=f"<link rel='icon' type='image/png' href='{DOCS_ASSETS}/favicon-32x32.png'>",
                )
            ],
            use_handler_docstrings=True,
        ),
        logging_config=None,  # run_server configures logging once, for uvicorn and us
        debug=False,  # never send tracebacks to clients
        metrics=metrics,
    )


def logging_config(level: str) -> dict[str, Any]:
    """dictConfig for the whole process: one format for uvicorn's and loraforge's loggers."""
    root_level = "DEBUG" if level == "trace" else level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": root_level},
        "loggers": {
            "uvicorn": {"level": level.upper()},
            "uvicorn.error": {"level": level.upper()},
        },
    }


def uvicorn_config(app: ASGIApp, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn Config `run_server` uses; tests pass overrides (e.g. log_config=None)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": logging_config(settings.log_level),
        "access_log": False,  # LoraforgeApp writes the access log, 404s included
        "lifespan": "on",  # a failed migration or model load must stop the server
        "timeout_graceful_shutdown": int(settings.shutdown_grace_s) + SHUTDOWN_FLUSH_S,
        "server_header": False,
    }
    return uvicorn.Config(app, **{**options, **overrides})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the engine when shutdown starts: it stops admitting requests
    and ends the streams still open after --shutdown-grace-s with an error event and [DONE]
    (uvicorn alone would cut them silently once its own timeout passed)."""

    def __init__(self, config: uvicorn.Config, engine: EngineClient | None, grace_s: float):
        super().__init__(config)
        self._engine, self._grace_s = engine, grace_s

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        if self._engine is not None:
            self._engine.begin_shutdown(self._grace_s)
        await super().shutdown(sockets)
        # uvicorn re-raises the SIGTERM it caught once it is done, so the process would die of
        # it; the shutdown was graceful, so it exits with status 0 instead.
        self._captured_signals.clear()


def run_server(
    settings: Settings,
    *,
    engine: EngineClient | None = None,
    services: Sequence[Service] = (),
    metrics: Metrics | None = None,
    adapter_registry: AdapterRegistry | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get --shutdown-grace-s to finish."""
    app = create_app(
        settings,
        engine=engine,
        services=services,
        metrics=metrics,
        adapter_registry=adapter_registry,
    )
    server = DrainingServer(uvicorn_config(app, settings), engine, settings.shutdown_grace_s)
    server.run()
    if not server.started:
        raise SystemExit(1)  # startup failed; uvicorn has logged why
