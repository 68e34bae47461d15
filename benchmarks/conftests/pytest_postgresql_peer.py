"""Peer: pytest-postgresql. Its ``postgresql_noproc`` factory on our server (its own proc fixture would run
pg_ctl, which refuses root), a template loaded by Alembic once per run, and its ``postgresql`` client
factory: a fresh ``CREATE DATABASE ... TEMPLATE`` per test, dropped after."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pytest_postgresql import factories
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from benchmarks.conftests._common import SERVER_URL, migrate

_server = make_url(SERVER_URL)


def load_schema(host: str, port: int, user: str, dbname: str, password: str, **_: Any) -> None:
    migrate(URL.create("postgresql+psycopg", user, password, host, int(port), dbname).render_as_string(False))


bench_pg_noproc = factories.postgresql_noproc(host=_server.host, port=_server.port, user=_server.username,
                                              password=_server.password, dbname="bench_ppg", load=[load_schema])
bench_pg = factories.postgresql("bench_pg_noproc")


@pytest.fixture
def db_session(bench_pg: psycopg.Connection) -> Iterator[Session]:
    engine = create_engine("postgresql+psycopg://", creator=lambda: bench_pg, poolclass=StaticPool)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()
