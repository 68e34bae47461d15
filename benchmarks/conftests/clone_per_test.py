"""Strategy (d): a template database migrated once; per test ``CREATE DATABASE ... TEMPLATE`` and a
``DROP DATABASE`` after. Also the naive ``commit_db`` for the db_commit comparison (same clone, real commits)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from benchmarks.conftests._common import admin_connection, create_database, drop_database, migrate, url_of

TEMPLATE = "bench_clone_tpl"
_numbers = itertools.count()


@pytest.fixture(scope="session")
def admin() -> Iterator[Connection]:
    connection = admin_connection()
    yield connection
    connection.close()


@pytest.fixture(scope="session")
def clone_template(admin: Connection) -> Iterator[str]:
    migrate(create_database(admin, TEMPLATE))
    yield TEMPLATE
    drop_database(admin, TEMPLATE)


@pytest.fixture
def fresh_engine(admin: Connection, clone_template: str) -> Iterator[Engine]:
    name = f"bench_clone_{next(_numbers)}"
    admin.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{clone_template}"'))
    engine = create_engine(url_of(name))
    yield engine
    engine.dispose()
    admin.execute(text(f'DROP DATABASE "{name}"'))


@pytest.fixture
def db_session(fresh_engine: Engine) -> Iterator[Session]:
    with Session(fresh_engine, expire_on_commit=False) as session:
        yield session


@pytest.fixture
def commit_db(fresh_engine: Engine) -> SimpleNamespace:
    return SimpleNamespace(engine=fresh_engine)
