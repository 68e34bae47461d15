"""Baseline: the tests on one already-migrated database, no isolation, nothing undone.

Its wall time is what the tests cost by themselves; every strategy's per-test overhead is measured against
it. The harness recreates ``BENCH_BARE_DB`` from its migrated copy before each run, outside the timing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from benchmarks.conftests._common import url_of


@pytest.fixture(scope="session")
def bare_engine() -> Iterator[Engine]:
    engine = create_engine(url_of(os.environ["BENCH_BARE_DB"]))
    yield engine
    engine.dispose()


@pytest.fixture
def db_session(bare_engine: Engine) -> Iterator[Session]:
    with Session(bare_engine, expire_on_commit=False) as session:
        yield session
