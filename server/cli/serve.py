"""`loraforge serve | worker | db upgrade`: the service's processes."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from server.settings import Settings

if TYPE_CHECKING:  # the engine side is imported only when a server is built
    from server.adapters import AdapterRegistry
    from server.app import Service
    from server.engine_client import EngineClient
    from server.metrics import Metrics

SERVE_SETTINGS = None  # every setting is a serve flag


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API (and the job worker)")
    Settings.add_arguments(serve)
    serve.set_defaults(run=run_serve)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION")
    up = db_sub.add_parser("upgrade", help="apply the Alembic migrations (also done at startup)")
    Settings.add_arguments(up, ["data_dir", "database_url"])
    up.set_defaults(run=run_db_upgrade, needs_mlx=False)


def build_services(
    settings: Settings,
) -> tuple[Metrics, AdapterRegistry, EngineClient, list[Service]]:
    """The engine client, adapter registry and (optionally) the job worker for one server."""
    from server.adapters import AdapterRegistry
    from server.db import Database
    from server.engine_client import EngineClient
    from server.metrics import Metrics
    from server.replicas.adapter_sync import AdapterSync

    metrics = Metrics()
    registry = AdapterRegistry(settings, Database.open(settings.database_url))
    # The engine loads adapters through the registry, and the registry validates them against
    # the engine's model: construct one, then point the other at it.
    engine = EngineClient(settings, metrics, adapter_loader=registry.load_for_engine)
    registry.host = engine
    # Other replicas sharing the database may delete or replace adapters resident here.
    services: list[Service] = [AdapterSync(registry.db, settings.database_url, engine)]
    if settings.start_worker and settings.max_concurrent_jobs > 0:
        from server.jobs.worker import JobWorker

        services.append(JobWorker(settings, registry=registry))
    return metrics, registry, engine, services


def run_serve(ns: argparse.Namespace) -> int:
    from mlx_core.demo import resolve_model_path
    from mlx_core.weights import check_model_folder
    from server.app import run_server

    settings = Settings.from_args(ns)
    # Fail now, in one line, rather than serve 503s for a model that can never load.
    check_model_folder(resolve_model_path(settings.model))
    metrics, registry, engine, services = build_services(settings)
    run_server(
        settings,
        engine=engine,
        services=services,
        metrics=metrics,
        adapter_registry=registry,
    )
    return 0


def run_db_upgrade(ns: argparse.Namespace) -> int:
    from server.db import upgrade_database

    settings = Settings.from_args(ns)
    settings.ensure_dirs()
    upgrade_database(settings.database_url)
    print(f"database at {settings.database_url} is up to date")
    return 0
