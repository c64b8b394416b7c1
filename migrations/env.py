"""Alembic environment: migrate the database whose URL `server.db.upgrade_database` passes in.

No alembic.ini is needed. `upgrade_database(url)` builds the Config in code and puts the URL in
`config.attributes["database_url"]`. To write a new revision from a checkout, run e.g.
`python -c "from alembic import command; from server.db import alembic_config;
command.revision(alembic_config('sqlite:////tmp/dev.db'), 'what changed', autogenerate=True)"`
against a database upgraded to head, then review the generated file by hand.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from server.db import Base, make_engine

config = context.config
# Any fixed number: the PostgreSQL advisory lock every loraforge process takes to migrate.
MIGRATION_LOCK_KEY = 0x6C6F7261  # "lora"


def _database_url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        # Someone ran the `alembic` CLI directly: use the URL the service itself would use.
        from server.settings import Settings

        url = Settings.from_env().database_url
    return url


def run_migrations_offline() -> None:
    # `--sql` mode: print the DDL instead of running it (for DBAs who apply it themselves).
    context.configure(
        url=_database_url(),
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # make_engine gives SQLite its BEGIN IMMEDIATE transactions, which make DDL transactional:
    # tell Alembic so (its SQLite default assumes the driver's autocommitting DDL), and a
    # failed migration leaves the database as it was. PostgreSQL's DDL is transactional anyway.
    engine = make_engine(_database_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
                render_as_batch=True,
                compare_type=True,
                transactional_ddl=True,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # Replicas starting together migrate one at a time: the others wait here,
                    # then read the version table after the first committed and find nothing
                    # to do (on SQLite, BEGIN IMMEDIATE does the same). Released at commit.
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                    )
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
