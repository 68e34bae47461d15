"""Issue 8 item 4 and issue 9 item 3: a suite that hard-codes its database, drops and recreates it with
sqlalchemy-utils, runs isolated under -n 2 with `pgshard_redirect` alone; db_commit tests move the app's
module-level engines to the test's clone (inner pytest sessions against real PostgreSQL)."""

from __future__ import annotations

import textwrap

import psycopg
import pytest

from pgshard.server.base import ServerInfo, to_libpq

HARD_CODED = "postgresql+psycopg2://app:secret@db.example.invalid:5432/app_test"  # a host that does not exist

SECOND_APP = '''
import os
from sqlalchemy import String, create_engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

engine = create_engine(os.environ["DATABASE_URL"])  # psycopg2, built at import from the overwritten env
async_engine = create_async_engine(os.environ["DATABASE_URL"].replace("+psycopg2", "+asyncpg"))
SessionLocal = sessionmaker(bind=engine)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(100), unique=True)
'''

SECOND_CONFTEST = f'''
import os

os.environ["DATABASE_URL"] = "{HARD_CODED}"  # the project insists on its own database

import pytest
from sqlalchemy import create_engine, delete
from sqlalchemy_utils import create_database, database_exists, drop_database

from app import Base, SessionLocal, User, engine

# a second engine, psycopg 3, built in the conftest after the environment was overwritten
conftest_engine = create_engine(os.environ["DATABASE_URL"].replace("+psycopg2", "+psycopg"))


@pytest.fixture(scope="session", autouse=True)
def database():
    if database_exists(engine.url):
        drop_database(engine.url)
    create_database(engine.url)
    assert database_exists(engine.url)
    Base.metadata.create_all(engine)
    with SessionLocal() as session:
        session.add(User(email="admin@example.com"))
        session.commit()
    yield
    engine.dispose()
    conftest_engine.dispose()
    drop_database(engine.url)


@pytest.fixture
def session():
    with SessionLocal() as session:
        yield session
        session.rollback()
        session.execute(delete(User).where(User.email != "admin@example.com"))
        session.commit()
'''

SECOND_TESTS = '''
import asyncio, os
import pytest
from sqlalchemy import func, select, text
from app import User, async_engine, engine
from conftest import conftest_engine

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.mark.parametrize("n", range(12))
def test_users(session, n):
    session.add(User(email=f"user{n}@example.com"))
    session.commit()
    assert session.scalar(select(func.count()).select_from(User)) == 2  # the seeded admin and ours
    database = session.scalar(text("SELECT current_database()"))
    assert database.startswith("pgshard_") and database.endswith("_" + WORKER)
    # no app_test anywhere on the server (LIKE, so the catalog lookup is not the one redirected)
    assert session.scalar(text("SELECT count(*) FROM pg_database WHERE datname LIKE 'app\\\\_test'")) == 0


def test_engine_built_in_conftest_on_psycopg3_lands_on_the_same_database():
    with conftest_engine.connect() as conn, engine.connect() as other:
        assert conn.dialect.driver == "psycopg" and other.dialect.driver == "psycopg2"
        assert conn.scalar(text("SELECT current_database()")) == other.scalar(text("SELECT current_database()"))
        assert conn.scalar(select(func.count()).select_from(User)) == 1


def test_async_engine_on_asyncpg_lands_on_the_same_database():
    async def main():
        async with async_engine.connect() as conn:
            return await conn.scalar(text("SELECT current_database()")), await conn.scalar(
                select(func.count()).select_from(User))
        await async_engine.dispose()

    name, users = asyncio.run(main())
    assert name.endswith("_" + WORKER) and users == 1
'''


def _catalog(server: ServerInfo) -> set[str]:
    with psycopg.connect(to_libpq(server.url), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


def test_suite_that_drops_and_recreates_its_hard_coded_database_runs_isolated_with_redirect_alone(
        pytester: pytest.Pytester, second_server: ServerInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(app=SECOND_APP, conftest=SECOND_CONFTEST, test_users=SECOND_TESTS)
    pytester.makeini("[pytest]\npgshard_redirect = app_test\n")
    monkeypatch.setenv("PGSHARD_URL", second_server.url)  # a server of this test's own: its catalog is ours to read
    before = _catalog(second_server)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=14)
    after = _catalog(second_server)
    assert "app_test" not in after
    assert {d for d in after if not d.startswith("pgshard")} == {d for d in before if not d.startswith("pgshard")}
    assert not {d for d in after - before if not d.startswith("pgshard_tpl_")}  # the clones are gone too


COMMIT_APP = '''
import os
from sqlalchemy import String, create_engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

URL = os.environ.get("DATABASE_URL", "postgresql+psycopg2://app:secret@db.example.invalid/app_test")
engine = create_engine(URL, pool_size=2)
async_engine = create_async_engine(URL.replace("+psycopg2", "+asyncpg").replace("+psycopg", "+asyncpg"))
SessionLocal = sessionmaker(bind=engine)


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "thing"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def build(url):  # a template step that ignores the URL it is given: the app's own reset, on its own engine
    from sqlalchemy_utils import create_database, database_exists, drop_database

    if database_exists(engine.url):
        drop_database(engine.url)
    create_database(engine.url)
    Base.metadata.create_all(engine)
    engine.dispose()
'''

COMMIT_TESTS = '''
import asyncio, time
import pytest
from sqlalchemy import text
import app

CLONE = []


def count(conn):
    return conn.scalar(text("SELECT count(*) FROM thing"))


def test_1_before(pg_database):
    with app.engine.connect() as conn:  # leaves a pooled connection to the worker's database
        assert conn.scalar(text("SELECT current_database()")) == pg_database.name
        assert count(conn) == 0


@pytest.mark.db_commit
def test_2_app_engine_writes_to_the_tests_own_clone(commit_db, pg_database):
    CLONE.append(commit_db.name)
    with app.engine.begin() as conn:  # app code on its module-level engine, not through pgshard
        assert conn.scalar(text("SELECT current_database()")) == commit_db.name
        conn.execute(text("INSERT INTO thing (name) VALUES ('committed')"))
    with app.SessionLocal() as session:  # the app's sessionmaker: its own engine, on the clone
        assert session.scalar(text("SELECT current_database()")) == commit_db.name
        assert count(session) == 1

    async def on_async_engine():
        async with app.async_engine.connect() as conn:
            found = await conn.scalar(text("SELECT current_database()")), await count_async(conn)
        await app.async_engine.dispose()
        return found

    async def count_async(conn):
        return await conn.scalar(text("SELECT count(*) FROM thing"))

    assert asyncio.run(on_async_engine()) == (commit_db.name, 1)
    with commit_db.engine.connect() as conn:
        assert count(conn) == 1


def test_3_after(pg_database):
    with app.engine.connect() as conn:
        assert conn.scalar(text("SELECT current_database()")) == pg_database.name
        assert count(conn) == 0  # the worker's database is unchanged
    with app.engine.connect() as conn:  # no pooled connection of the app's engine is left on the clone
        deadline = time.monotonic() + 30  # (a closed connection's backend exits just after it)
        while conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = :n"), {"n": CLONE[0]}):
            assert time.monotonic() < deadline
            time.sleep(0.05)
'''


@pytest.mark.parametrize("how", ["redirect", "engine"])
def test_db_commit_app_engine_writes_to_the_tests_own_clone_and_the_worker_database_is_unchanged(
        pytester: pytest.Pytester, how: str) -> None:
    pytester.makepyfile(app=COMMIT_APP, test_commit=COMMIT_TESTS)
    wiring = ("pgshard_redirect = app_test\npgshard_migrate = python:app:build" if how == "redirect" else
              "pgshard_migrate = metadata:app:Base\npgshard_env = DATABASE_URL={url}\n"
              "pgshard_engine = app:async_engine\npgshard_sessionmaker = app:SessionLocal")
    pytester.makeini(textwrap.dedent("""
        [pytest]
        pythonpath = .
        """) + wiring + "\n")
    for args in ((), ("-n", "2", "--dist", "loadfile")):
        result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *args)
        result.assert_outcomes(passed=3)


@pytest.mark.parametrize("name", ["postgres", "pgshard_mine"])
def test_redirecting_a_maintenance_or_pgshard_database_is_refused_in_one_line(
        pytester: pytest.Pytester, name: str) -> None:
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    pytester.makeini(f"[pytest]\npgshard_redirect = {name}\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text
    assert [line for line in text.splitlines() if "pgshard:" in line and "pgshard_redirect" in line and name in line]


def test_pgshard_engine_that_is_no_engine_fails_the_test_in_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app="NOT_AN_ENGINE = 42\n", test_one=textwrap.dedent('''
        import pytest

        @pytest.mark.db_commit
        def test_one(commit_db):
            pass
    '''))
    pytester.makeini("[pytest]\npythonpath = .\npgshard_engine = app:NOT_AN_ENGINE\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    text = result.stdout.str()
    assert "Traceback" not in text
    result.stdout.fnmatch_lines(["*pgshard: pgshard_engine must name a SQLAlchemy Engine or AsyncEngine, got int*"])
