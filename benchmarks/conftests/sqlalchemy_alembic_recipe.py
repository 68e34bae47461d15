"""Peer: pytest-sqlalchemy-alembic WITH SQLAlchemy's rollback recipe added by hand (its docs leave per-test
isolation to the user): per test a connection, an outer transaction, a session joined to it in
``create_savepoint`` mode, rolled back at teardown ("Joining a Session into an External Transaction").
With the rows rolled back, its per-worker database can be reused between runs, so no ``--createdb``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy.orm import Session


@pytest.fixture
def db_session(sqlalchemy_alembic_setup_session: Sequence[Any]) -> Iterator[Session]:
    engine = sqlalchemy_alembic_setup_session[0]  # the plugin's test engine of this worker
    with engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
            outer.rollback()
