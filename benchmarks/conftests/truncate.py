"""Strategy (b): one migrated database; after each test TRUNCATE all 30 tables and re-insert the seed rows
(the tests read them, so a truncate-based suite has to put them back)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from benchapp.models import Base
from benchapp.seed import seed
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from benchmarks.conftests._common import admin_connection, create_database, drop_database, migrate

NAME = "bench_truncate"
TRUNCATE = text("TRUNCATE " + ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
                + " RESTART IDENTITY CASCADE")


@pytest.fixture(scope="session")
def truncate_engine() -> Iterator[Engine]:
    admin = admin_connection()
    url = create_database(admin, NAME)
    migrate(url)
    engine = create_engine(url)
    yield engine
    engine.dispose()
    drop_database(admin, NAME)
    admin.close()


@pytest.fixture
def db_session(truncate_engine: Engine) -> Iterator[Session]:
    with Session(truncate_engine, expire_on_commit=False) as session:
        yield session
    with truncate_engine.begin() as connection:
        connection.execute(TRUNCATE)
        seed(connection)
