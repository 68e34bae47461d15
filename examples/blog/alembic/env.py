"""Alembic environment for the blog example.

Where the database is, in order: a connection handed over in ``config.attributes["connection"]``
(programmatic use, e.g. a migration test), ``sqlalchemy.url`` when the caller set it, else the
``DATABASE_URL`` environment variable (the same variable the app reads).
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from blog.models import Base
from sqlalchemy import Connection, create_engine, pool

config = context.config

# Configure logging only for the `alembic` command line: when migrations run inside another
# program (pytest, pgshard) that program owns logging, and fileConfig would reset its handlers.
if config.cmd_opts is not None and config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    try:
        return os.environ["DATABASE_URL"]
    except KeyError:
        raise RuntimeError(
            "No database to migrate: set DATABASE_URL or sqlalchemy.url in alembic.ini"
        ) from None


def configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_with_connection(connection: Connection) -> None:
    configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with_connection(connection)
        return
    # NullPool: a migration run opens one connection and must not leave any behind (a template
    # database cannot be cloned while someone is still connected to it).
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run_with_connection(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
