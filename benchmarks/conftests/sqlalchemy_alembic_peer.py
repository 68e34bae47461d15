"""Peer: pytest-sqlalchemy-alembic, as its README sets it up. Per worker it creates ``<db>_test_<worker>``,
runs ``alembic upgrade head`` into it at session start and rebinds the app's sessionmaker
(``sqlalchemy_alembic_configs = {"session_maker": "benchapp.db:SessionLocal"}``). It isolates nothing
between tests: ``db_session`` is the app's own session, so rows stay. The harness passes ``--createdb``
(a suite that keeps its rows must start from a new database each run, or its unique inserts collide)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from benchapp.db import SessionLocal
from sqlalchemy.orm import Session


@pytest.fixture
def db_session() -> Iterator[Session]:
    with SessionLocal() as session:
        yield session
