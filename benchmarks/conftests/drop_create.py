"""Strategy (c): ``metadata.create_all`` and the seed rows before each test, ``drop_all`` after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from benchapp.models import Base
from benchapp.seed import seed
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from benchmarks.conftests._common import admin_connection, create_database, drop_database

NAME = "bench_drop_create"


@pytest.fixture(scope="session")
def empty_engine() -> Iterator[Engine]:
    admin = admin_connection()
    engine = create_engine(create_database(admin, NAME))
    yield engine
    engine.dispose()
    drop_database(admin, NAME)
    admin.close()


@pytest.fixture
def db_session(empty_engine: Engine) -> Iterator[Session]:
    Base.metadata.create_all(empty_engine)
    with empty_engine.begin() as connection:
        seed(connection)
    with Session(empty_engine, expire_on_commit=False) as session:
        yield session
    Base.metadata.drop_all(empty_engine)
