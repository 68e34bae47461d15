"""Issue 10, load: 2,000 savepoint tests and 200 db_commit tests (each holding ten connections at once, as
the example app's concurrency tests do) under ``-n 2``, on a server of their own: green with
``max_connections = 30``; with ``max_connections = 12`` one line saying to lower -n or raise
max_connections, not a traceback per test.

Per worker: two admin connections (this worker's, its clone pool's) and ten in a db_commit test, so one
worker alone exceeds 12 and both at their peak stay within 30: the outcome does not hang on timing.
The db_commit tests are collected first, so the run that cannot have enough connections meets the limit
at once instead of after two thousand tests (the machine is small and shared).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgshard.server.base import ServerInfo, to_libpq
from pgshard.server.embedded import EmbeddedServer
from tests.conftest import Project, secret_of

COMMITTING = '''
import pytest
from sqlalchemy import text

@pytest.mark.db_commit
@pytest.mark.parametrize("i", range(200))
def test_commit(i, commit_db):
    conns = [commit_db.engine.connect() for _ in range(10)]  # ten writers, as examples/blog has
    try:
        for n, conn in enumerate(conns):
            conn.execute(text("INSERT INTO item (worker) VALUES (:w)"), {"w": str(n)})
            conn.commit()
        assert conns[0].execute(text("SELECT count(*) FROM item")).scalar() == 10
    finally:
        for conn in conns:
            conn.close()
'''

SAVEPOINT = '''
import pytest
from sqlalchemy import text

@pytest.mark.parametrize("i", range(2000))
def test_savepoint(i, db_session):
    db_session.execute(text("INSERT INTO item (worker) VALUES ('x')"))
    db_session.commit()  # releases a savepoint: nothing outlives the test
    assert db_session.execute(text("SELECT count(*) FROM item")).scalar() == 1
'''


class Limited:
    """An embedded server of its own whose max_connections the test sets (ALTER SYSTEM + restart)."""

    def __init__(self) -> None:
        self.cache = Path("/dev/shm") / f"pgshard-load-{uuid.uuid4().hex[:8]}"
        self.server = EmbeddedServer(cache_dir=self.cache)
        self.info: ServerInfo = self.server.acquire()

    def max_connections(self, value: int) -> ServerInfo:
        with psycopg.connect(to_libpq(self.info.url), autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET max_connections = {int(value)}")
        self.server.release()  # our lease was the only one: it stops
        self.info = self.server.acquire()
        with psycopg.connect(to_libpq(self.info.url), autocommit=True) as conn:
            row = conn.execute("SHOW max_connections").fetchone()
        assert row is not None and int(row[0]) == value
        return self.info

    def close(self) -> None:
        self.server.release()
        shutil.rmtree(self.cache, ignore_errors=True)


@pytest.fixture
def limited() -> Iterator[Limited]:
    server = Limited()
    yield server
    server.close()


@pytest.mark.slow
def test_a_2200_test_suite_is_green_with_30_connections_and_one_line_with_12(project: Project,
                                                                             limited: Limited) -> None:
    project.pytester.makepyfile(test_a_commit=COMMITTING, test_b_savepoint=SAVEPOINT)

    roomy = limited.max_connections(30)
    green = project.run("-n", "2", "-q", "--pg-url", roomy.url)
    green.assert_outcomes(passed=2200)
    green.stdout.fnmatch_lines(["*; db_commit clones: 200, median wait * ms"])

    tight = limited.max_connections(12)
    result = project.run("-n", "2", "-q", "--pg-url", tight.url)
    text = result.stdout.str() + result.stderr.str()
    assert result.ret != 0
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    advice = [line for line in text.splitlines() if "lower -n or raise max_connections" in line]
    assert advice, text
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) + outcomes.get("errors", outcomes.get("error", 0)) <= 4, text
    assert len(text.splitlines()) < 80, text
    password = secret_of(tight.url)  # pgshard's URLs name a passfile; the password is only in there
    assert password not in text
