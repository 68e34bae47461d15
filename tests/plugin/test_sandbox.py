"""Issue 3: per-test isolation that application code cannot escape, async sessions under every runner,
db_commit clones, query counting and clear errors on misuse (inner pytest sessions, real PostgreSQL)."""

from __future__ import annotations

import textwrap
from importlib.metadata import version

import pytest

APP = '''
import os
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import String, create_engine, select, func
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

engine = create_engine(os.environ["DATABASE_URL"])  # built at import, from the env pgshard set
SessionLocal = sessionmaker(bind=engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "thing"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


def get_db():
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


app = FastAPI()


@app.post("/things/{name}", status_code=201)
def create(name: str, db: Session = Depends(get_db)):
    db.add(Thing(name=name))
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise HTTPException(409, "already exists")
    return {"count": db.scalar(select(func.count()).select_from(Thing))}


@app.get("/things")
async def count(db: Session = Depends(get_db)):
    return {"count": db.scalar(select(func.count()).select_from(Thing))}
'''

# pytest-asyncio >= 0.24 warns unless the fixture loop scope is set, and 0.23 (the last for pytest 7.4, our
# floor) warns that the key is unknown: with filterwarnings = error, write it only where it exists.
LOOP_SCOPE_INI = ("asyncio_default_fixture_loop_scope = function"
                  if tuple(int(p) for p in version("pytest-asyncio").split(".")[:2]) >= (0, 24) else "")

INI = """
[pytest]
pgshard_migrate = metadata:app:Base
pgshard_env = DATABASE_URL={url}
pgshard_app = app:app
pgshard_get_db = app:get_db
pgshard_sessionmaker = app:SessionLocal
pythonpath = .
filterwarnings = error
    ignore::DeprecationWarning
%s
"""


@pytest.fixture
def app_project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(app=APP)
    pytester.makeini(INI % "")
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *args)


def test_app_commits_are_rolled_back_between_tests_in_any_order(app_project: pytest.Pytester) -> None:
    app_project.makepyfile(test_leak=textwrap.dedent('''
        import os, pytest
        from sqlalchemy import func, select, text
        import app

        @pytest.mark.parametrize("how", ["client", "sessionmaker", "db_session", "nested", "connection"] * 2)
        def test_only_row(how, client, db_session, db_connection, pg_database):
            assert db_session.scalar(select(func.count()).select_from(app.Thing)) == 0
            if how == "client":
                assert client.post("/things/x").status_code == 201
            elif how == "sessionmaker":
                with app.SessionLocal() as own:  # app code opening its own session stays in the sandbox
                    own.add(app.Thing(name="x"))
                    own.commit()
            elif how == "db_session":
                db_session.add(app.Thing(name="x"))
                db_session.commit()
            elif how == "nested":
                with db_session.begin_nested():
                    db_session.add(app.Thing(name="x"))
            else:
                db_connection.execute(text("INSERT INTO thing (name) VALUES ('x')"))
            assert db_session.scalar(select(func.count()).select_from(app.Thing)) == 1
            assert app.engine.url.database == pg_database.name  # pgshard_env was set before the import
    '''))
    for args in ((), ("-p", "randomly", "-p", "no:cacheprovider"), ("-n", "2")):
        result = app_project.runpytest_subprocess(*args) if args[:2] == ("-p", "randomly") else run(app_project, *args)
        result.assert_outcomes(passed=10)


def test_duplicate_rolls_back_to_the_savepoint_and_overrides_are_cleared(app_project: pytest.Pytester) -> None:
    app_project.makepyfile(test_dup=textwrap.dedent('''
        import app
        from sqlalchemy import func, select

        def test_duplicate(client, db_session):
            assert client.post("/things/a").status_code == 201
            response = client.post("/things/a")
            assert response.status_code == 409
            assert db_session.scalar(select(func.count()).select_from(app.Thing)) == 1  # outer txn still usable
            assert app.get_db in app.app.dependency_overrides

        def test_overrides_cleared_and_sessionmaker_restored():
            # the client's override is gone; what remains is pgshard's per-test one (pgshard_app and pgshard_get_db
            # are set: every request of a test gets its session), which ends with the test too
            override = app.app.dependency_overrides[app.get_db]
            assert override.__qualname__.startswith("override_dependency")
            assert list(app.app.dependency_overrides) == [app.get_db]
            assert app.SessionLocal.kw["bind"] is app.engine
    '''))
    run(app_project).assert_outcomes(passed=2)


ASYNC_TESTS = '''
import pytest
from sqlalchemy import func, select, text
import app

{marker}
async def test_first(async_db_session):
    async_db_session.add(app.Thing(name="a"))
    await async_db_session.commit()
    async with async_db_session.begin_nested():
        async_db_session.add(app.Thing(name="b"))
    assert await async_db_session.scalar(select(func.count()).select_from(app.Thing)) == 2

{marker}
async def test_second_sees_nothing(async_db_session):
    assert await async_db_session.scalar(select(func.count()).select_from(app.Thing)) == 0

{marker}
async def test_driver(async_db_session):
    conn = await async_db_session.connection()
    assert conn.dialect.driver == "{driver}" and conn.dialect.is_async

def test_no_connection_left_behind(pg_engine, pg_database):
    with pg_engine.connect() as conn:
        others = conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )).scalar()
    assert others == 0

@pytest.fixture
def anyio_backend():
    return "asyncio"
'''


@pytest.mark.parametrize(("runner", "driver"), [
    ("asyncio-strict", "psycopg"), ("asyncio-strict", "asyncpg"), ("asyncio-auto", "psycopg"),
    ("asyncio-auto", "asyncpg"), ("anyio", "psycopg"), ("anyio", "asyncpg"),
])
def test_async_db_session_under_every_runner_and_driver(pytester: pytest.Pytester, runner: str, driver: str) -> None:
    pytester.makepyfile(app=APP)
    mode = "auto" if runner == "asyncio-auto" else "strict"
    asyncio_ini = "" if runner == "anyio" else f"asyncio_mode = {mode}\n{LOOP_SCOPE_INI}"
    pytester.makeini(INI % f"{asyncio_ini}\npgshard_async_driver = {driver}")
    marker = {"asyncio-strict": "@pytest.mark.asyncio", "asyncio-auto": "", "anyio": "@pytest.mark.anyio"}[runner]
    expected_driver = driver
    pytester.makepyfile(test_async=ASYNC_TESTS.format(marker=marker, driver=expected_driver))
    extra = ("-p", "no:asyncio") if runner == "anyio" else ()
    run(pytester, *extra).assert_outcomes(passed=4)


def test_db_commit_gets_a_fresh_clone_with_real_commits(app_project: pytest.Pytester) -> None:
    app_project.makepyfile(test_commit=textwrap.dedent('''
        import os, threading
        import pytest
        from concurrent.futures import ThreadPoolExecutor
        from sqlalchemy import func, select, text
        from sqlalchemy.engine import make_url
        import app

        @pytest.mark.db_commit
        @pytest.mark.parametrize("n", range(4))
        def test_real_commits(n, commit_db, pg_database, client):
            assert commit_db.name != pg_database.name
            assert make_url(os.environ["DATABASE_URL"]).database == commit_db.name
            def write(i):
                with app.SessionLocal() as session:
                    session.add(app.Thing(name=f"t{i}"))
                    session.commit()
                    return session.scalar(text("SELECT current_database()"))  # the app's engine, on the clone
            with ThreadPoolExecutor(max_workers=10) as pool:
                assert set(pool.map(write, range(10))) == {commit_db.name}
            assert client.post("/things/web").json() == {"count": 11}
            with commit_db.engine.connect() as conn:  # another connection sees the commits
                assert conn.execute(text("SELECT count(*) FROM thing")).scalar() == 11

        def test_worker_database_untouched(db_session):
            assert db_session.scalar(select(func.count()).select_from(app.Thing)) == 0

        @pytest.mark.db_commit
        def test_concurrently_is_fine_here(commit_db):
            with commit_db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("CREATE INDEX CONCURRENTLY ix_thing_name2 ON thing (name)"))
                conn.execute(text("VACUUM thing"))
    '''))
    result = run(app_project, "-n", "2")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*db_commit clones: 5, median wait * ms*"])


@pytest.mark.parametrize("url", ["url", "psycopg2_url"])  # psycopg2's errors carry .pgcode, not .sqlstate
def test_misuse_gets_one_clear_error(url: str, app_project: pytest.Pytester) -> None:
    app_project.makeini((INI % "").replace("DATABASE_URL={url}", f"DATABASE_URL={{{url}}}"))
    app_project.makepyfile(test_misuse=textwrap.dedent('''
        import pytest
        from sqlalchemy import text

        @pytest.mark.db_commit
        def test_session_in_commit_test(db_session):
            pass

        def test_concurrently(db_session):
            db_session.execute(text("CREATE INDEX CONCURRENTLY ix_thing_name ON thing (name)"))

        def test_vacuum(db_connection):
            db_connection.execute(text("VACUUM thing"))

        def test_commit_db_without_marker(commit_db):
            pass
    '''))
    result = run(app_project)
    result.assert_outcomes(errors=2, failed=2)
    text = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*pgshard: db_session wraps the test in a transaction*db_commit test opted out of*",
        "*pgshard: commit_db is only for tests marked @pytest.mark.db_commit*",
        "*pgshard: 'CREATE INDEX CONCURRENTLY ix_thing_name ON thing (name)' cannot run inside a "
        "transaction*mark the test @pytest.mark.db_commit*",
        "*pgshard: 'VACUUM thing' cannot run inside a transaction*",
    ])
    assert text.count("Traceback") == 0


def test_query_counter_counts_app_statements_not_savepoints(app_project: pytest.Pytester) -> None:
    app_project.makepyfile(test_queries=textwrap.dedent('''
        import pytest
        from sqlalchemy import select
        from pgshard import assert_max_queries
        import app

        def test_counts(client, db_session, query_counter):
            client.post("/things/a")  # INSERT + SELECT count; commit = RELEASE SAVEPOINT (not counted)
            assert query_counter.count == 2, query_counter.statements
            assert not [s for s in query_counter.statements if "SAVEPOINT" in s.upper()]
            query_counter.reset()
            with query_counter.assert_max(1):
                db_session.scalars(select(app.Thing)).all()

        def test_failure_lists_the_sql(db_session):
            with pytest.raises(AssertionError) as info:
                with assert_max_queries(1):
                    for _ in range(3):
                        db_session.scalars(select(app.Thing).where(app.Thing.name == "z")).all()
            message = str(info.value)
            assert "expected at most 1 queries, 3 ran" in message
            assert message.count("FROM thing") == 3
    '''))
    run(app_project).assert_outcomes(passed=2)


ASYNC_APP = '''
import os
from fastapi import Depends, FastAPI
from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

engine = create_async_engine(os.environ["DATABASE_URL"])
AsyncSessionLocal = async_sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "thing"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


async def get_db():
    async with AsyncSessionLocal() as session:
        yield session


app = FastAPI()


@app.post("/things/{name}", status_code=201)
async def create(name: str, db: AsyncSession = Depends(get_db)):
    db.add(Thing(name=name))
    await db.commit()
    return {"count": await db.scalar(select(func.count()).select_from(Thing))}


async def background_write(name: str) -> None:  # app code that opens its own session
    async with AsyncSessionLocal() as session:
        session.add(Thing(name=name))
        await session.commit()
'''


def test_an_async_app_stays_in_the_sandbox(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app=ASYNC_APP)
    pytester.makeini((INI % "pgshard_async_driver = asyncpg").replace(
        "DATABASE_URL={url}", "DATABASE_URL={asyncpg_url}").replace("app:SessionLocal", "app:AsyncSessionLocal"))
    pytester.makepyfile(test_async_app=textwrap.dedent('''
        import pytest
        from sqlalchemy import func, select, text
        import app

        pytestmark = pytest.mark.anyio

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        @pytest.mark.parametrize("n", range(3))
        async def test_only_rows(n, async_db_session, async_client):
            assert await async_db_session.scalar(select(func.count()).select_from(app.Thing)) == 0
            response = await async_client.post("/things/a")
            assert response.status_code == 201 and response.json() == {"count": 1}
            await app.background_write("b")
            assert await async_db_session.scalar(select(func.count()).select_from(app.Thing)) == 2

        @pytest.mark.db_commit
        async def test_commit(commit_db):
            await app.background_write("c")
            with commit_db.engine.connect() as conn:
                assert conn.execute(text("SELECT name FROM thing")).scalars().all() == ["c"]
    '''))
    run(pytester, "-p", "no:asyncio").assert_outcomes(passed=4)


def test_a_test_carries_only_the_fixture_layers_of_the_features_it_uses(pytester: pytest.Pytester) -> None:
    """Issue 18: each fixture layer costs pytest about 0.1 ms a test. The db_commit layer is on db_commit
    tests only, placed first among their function-scoped fixtures (where the suite's own fixtures already see
    the clone); the app-requests layer only where pgshard_app and pgshard_get_db are set; and what db_session
    and db_connection look up (the app's engine, its sessionmaker) is looked up once per process."""
    pytester.makepyfile(app=APP)
    pytester.makeini(INI.replace("pgshard_app = app:app\npgshard_get_db = app:get_db\n", "") % "")
    pytester.makeconftest(textwrap.dedent('''
        import pytest
        import app

        @pytest.fixture
        def suites_own():  # a db_commit test's own fixture lands on its clone already
            with app.engine.connect() as connection:
                return connection.exec_driver_sql("SELECT current_database()").scalar()

        def pytest_collection_modifyitems(items):  # a project's hook marking tests: seen, since ours runs last
            for item in items:
                if "marked_by_hook" in item.name:
                    item.add_marker(pytest.mark.db_commit)
    '''))
    pytester.makepyfile(test_layers=textwrap.dedent('''
        import pytest
        from sqlalchemy import text
        import app

        def test_plain(request, db_session, db_connection):
            assert "_pgshard_db_commit" not in request.fixturenames
            assert "_pgshard_app_requests" not in request.fixturenames
            assert db_session.connection().connection.dbapi_connection is db_connection.connection.dbapi_connection
            assert app.SessionLocal.kw["bind"] is db_connection  # the app's sessionmaker joins the test

        @pytest.mark.db_commit
        def test_commit(request, suites_own, commit_db):
            names = request.fixturenames
            assert names.index("_pgshard_db_commit") < names.index("suites_own")
            assert suites_own == commit_db.name

        def test_marked_by_hook(request, suites_own, commit_db):
            assert suites_own == commit_db.name

        def test_plain_again(db_session):
            assert db_session.execute(text("SELECT 1")).scalar() == 1
    '''))
    run(pytester, "-n", "2").assert_outcomes(passed=4)
    run(pytester).assert_outcomes(passed=4)
    pytester.makeini(INI % "")  # with the app's requests configured, the layer is there, on plain tests only
    pytester.makepyfile(test_layers=textwrap.dedent('''
        import pytest

        def test_plain(request):
            assert "_pgshard_app_requests" in request.fixturenames

        @pytest.mark.db_commit
        def test_commit(request, client):
            assert client.post("/things/x").status_code == 201
    '''))
    run(pytester).assert_outcomes(passed=2)
