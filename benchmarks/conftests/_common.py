"""What the hand-written strategies share: the server, database names, and migrating a database."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url

SERVER_URL = os.environ["BENCH_PG_URL"]  # the 'postgres' maintenance database of the shared server
PROJECT = Path(os.environ["BENCH_PROJECT"])


def url_of(database: str) -> str:
    return make_url(SERVER_URL).set(database=database).render_as_string(hide_password=False)


def admin_connection() -> Connection:
    """An autocommit connection to the maintenance database, for CREATE/DROP DATABASE."""
    return create_engine(SERVER_URL, isolation_level="AUTOCOMMIT", pool_size=1).connect()


def create_database(admin: Connection, name: str, template: str | None = None) -> str:
    admin.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    return url_of(name)


def drop_database(admin: Connection, name: str) -> None:
    admin.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def migrate(url: str) -> None:
    """``alembic upgrade head`` in-process (revision 0005 inserts the seed data).

    Alembic is imported here, not at the top: the bare baseline must not pay for an import it never uses.
    """
    from alembic import command
    from alembic.config import Config

    config = Config(str(PROJECT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")
