"""Peer: pytest-sqla. Its ``sqla_session`` (one connection per test in an outer transaction, the session in
``create_savepoint`` mode, rolled back at teardown: SQLAlchemy's documented recipe) on a database the
harness migrated beforehand, outside the timing (``sqla_schema = none``: it runs no DDL itself). Under
xdist both workers share that database, which the rollback makes safe. The URL comes from
``PYTEST_SQLA_URL``, set by the harness."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session


@pytest.fixture
def db_session(sqla_session: Session) -> Session:
    sqla_session.expire_on_commit = False  # as every other contender's session (and the app's)
    return sqla_session
