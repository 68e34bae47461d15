"""The hand-written conftest teams write today: a database per xdist worker (its URL in DATABASE_URL before
the app is imported, so the app's own engine lands there), migrated in-process at the session's start, and
SQLAlchemy's "Joining a Session into an External Transaction" recipe per test on the app's engine (a
connection, an outer transaction, a session in ``create_savepoint`` mode, all rolled back). Its per-test
cost is the floor pgshard's db_session is measured against: one checkout of the app's engine (with the
app's own pool_pre_ping), BEGIN, SAVEPOINT and their rollback."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from benchmarks.conftests._common import admin_connection, create_database, drop_database, migrate, url_of

NAME = f"bench_worker_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
os.environ["DATABASE_URL"] = url_of(NAME)  # read by benchapp.db at its import, as the app's settings would


@pytest.fixture(scope="session")
def worker_engine() -> Iterator[Engine]:
    from benchapp.db import engine

    admin = admin_connection()
    migrate(create_database(admin, NAME))
    yield engine
    engine.dispose()
    drop_database(admin, NAME)
    admin.close()


@pytest.fixture
def db_session(worker_engine: Engine) -> Iterator[Session]:
    with worker_engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
            outer.rollback()
