"""Issue 9: tests run on the app's own engine (its driver, connect_args, listeners), and every
combination of app kind x client fixture x session fixture either shares one connection (writes seen
both ways, nothing left after) or is refused at setup with one line naming the fixture to use.

One inner pytest session per app kind and driver runs all four cells, so the matrix costs four sessions.
"""

from __future__ import annotations

import textwrap
from importlib.metadata import version

import pytest

MODELS = '''
import os
from fastapi import APIRouter, Depends, FastAPI
from sqlalchemy import String, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

CONNECT_ARGS = {connect_args}


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "thing"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


def on_connect(dbapi_connection, record):  # an app listener: must run on the tests' connections too
    cursor = dbapi_connection.cursor()
    cursor.execute("SET statement_timeout = '42s'")
    cursor.close()
    dbapi_connection.commit()


router = APIRouter()
'''

SYNC_APP = MODELS + '''
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

engine = create_engine(os.environ["DATABASE_URL"], connect_args=CONNECT_ARGS)
event.listen(engine, "connect", on_connect)
SessionLocal = sessionmaker(bind=engine, expire_on_commit=False)


def get_db():
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


@router.post("/things/{name}", status_code=201)
def create(name: str, db: Session = Depends(get_db)):
    db.add(Thing(name=name))
    db.commit()
    return {"driver": db.connection().dialect.driver}


@router.get("/things")
def names(db: Session = Depends(get_db)):
    return sorted(db.scalars(select(Thing.name)))


def bulk_insert(db: Session, names: list[str]) -> None:  # psycopg2-only API, as apps on psycopg2 write it
    from psycopg2.extras import execute_values

    with db.connection().connection.cursor() as cursor:
        execute_values(cursor, "INSERT INTO thing (name) VALUES %s", [(name,) for name in names])


app = FastAPI()
app.include_router(router, prefix="/api")
'''

ASYNC_APP = MODELS + '''
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

engine = create_async_engine(os.environ["DATABASE_URL"], connect_args=CONNECT_ARGS)
event.listen(engine.sync_engine, "connect", on_connect)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


async def get_db():
    async with SessionLocal() as session:
        yield session


@router.post("/things/{name}", status_code=201)
async def create(name: str, db: AsyncSession = Depends(get_db)):
    db.add(Thing(name=name))
    await db.commit()
    return {"driver": (await db.connection()).dialect.driver}


@router.get("/things")
async def names(db: AsyncSession = Depends(get_db)):
    return sorted(await db.scalars(select(Thing.name)))


app = FastAPI()
app.include_router(router, prefix="/api")
'''

# Each cell: the client writes, the test's session sees it; the session writes, the client sees it; the
# session runs on the app's driver with the app's connect_args and listeners.
CELLS = '''
import pytest
from sqlalchemy import select, text
import app

DRIVER = "{driver}"
SETTINGS = "SELECT current_setting('application_name') || ' ' || current_setting('statement_timeout')"


def check_request(response):
    assert response.status_code == 201, response.text
    assert response.json() == {{"driver": DRIVER}}


def test_client_db_session(client, db_session):
    check_request(client.post("/things/from-client"))
    assert db_session.scalars(select(app.Thing.name)).all() == ["from-client"]
    db_session.add(app.Thing(name="from-test"))
    db_session.commit()
    with db_session.begin_nested():
        db_session.add(app.Thing(name="nested"))
    assert client.get("/things").json() == ["from-client", "from-test", "nested"]
    assert db_session.connection().dialect.driver == DRIVER
    assert db_session.connection().engine is getattr(app.engine, "sync_engine", app.engine)  # its pool, too
    assert db_session.scalar(text(SETTINGS)) == "matrix-app 42s"


{mark}
async def test_async_client_db_session(async_client, db_session):
    check_request(await async_client.post("/things/from-client"))
    assert db_session.scalars(select(app.Thing.name)).all() == ["from-client"]
    db_session.add(app.Thing(name="from-test"))
    db_session.commit()
    assert (await async_client.get("/things")).json() == ["from-client", "from-test"]
    assert db_session.connection().dialect.driver == DRIVER
    assert db_session.connection().engine is getattr(app.engine, "sync_engine", app.engine)  # its pool, too
    assert db_session.scalar(text(SETTINGS)) == "matrix-app 42s"


{mark}
async def test_client_async_db_session(client, async_db_session):
    check_request(client.post("/things/from-client"))
    assert (await async_db_session.scalars(select(app.Thing.name))).all() == ["from-client"]
    async_db_session.add(app.Thing(name="from-test"))
    await async_db_session.commit()
    async with async_db_session.begin_nested():
        async_db_session.add(app.Thing(name="nested"))
    assert client.get("/things").json() == ["from-client", "from-test", "nested"]


{mark}
async def test_async_client_async_db_session(async_client, async_db_session):
    check_request(await async_client.post("/things/from-client"))
    assert (await async_db_session.scalars(select(app.Thing.name))).all() == ["from-client"]
    async_db_session.add(app.Thing(name="from-test"))
    await async_db_session.commit()
    async with async_db_session.begin_nested():
        async_db_session.add(app.Thing(name="nested"))
    assert (await async_client.get("/things")).json() == ["from-client", "from-test", "nested"]
    assert (await async_db_session.connection()).dialect.driver == DRIVER
    assert (await async_db_session.connection()).sync_engine is app.engine.sync_engine
    assert await async_db_session.scalar(text(SETTINGS)) == "matrix-app 42s"


@pytest.mark.db_commit
def test_db_commit_every_request_works(client, commit_db):
    check_request(client.post("/things/one"))
    check_request(client.post("/things/two"))
    assert client.get("/things").json() == ["one", "two"]


def test_zz_nothing_left_in_the_worker_database(pg_engine):
    with pg_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM thing")).scalar() == 0
        assert conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%'")).scalar() == 0


@pytest.fixture
def anyio_backend():
    return "asyncio"
'''

INI = """
[pytest]
pgshard_migrate = metadata:app:Base
pgshard_env = DATABASE_URL={placeholder}
pgshard_app = app:app
pgshard_get_db = app:get_db
pgshard_sessionmaker = app:SessionLocal
pgshard_base_url = http://test/api
pythonpath = .
filterwarnings = error
    ignore::DeprecationWarning
{runner}
"""

LIBPQ_ARGS = {"options": "-c application_name=matrix-app"}
ASYNCPG_ARGS = {"server_settings": {"application_name": "matrix-app"}}

# (app kind, driver): the env placeholder its DATABASE_URL uses, the pytest runner of its async tests
# (between them: pytest-asyncio strict and auto, function and session loop scope, anyio), and the cells
# refused with the fixture to use instead. The two missing pairs have no driver: psycopg2 has no async
# dialect, asyncpg no sync one.
APPS = {
    ("sync", "psycopg2"): ("{psycopg2_url}", "strict-function", {
        "test_client_async_db_session": "async_db_session cannot share the sync app's connection*use db_session",
        "test_async_client_async_db_session": "async_db_session cannot share the sync app's connection*use db_session",
    }),
    ("sync", "psycopg"): ("{url}", "anyio", {
        "test_client_async_db_session": "async_db_session cannot share the sync app's connection*use db_session",
        "test_async_client_async_db_session": "async_db_session cannot share the sync app's connection*use db_session",
    }),
    ("async", "psycopg"): ("{async_url}", "auto-session", {}),
    ("async", "asyncpg"): ("{asyncpg_url}", "strict-function", {}),
}

# pytest-asyncio 0.23 (the last for pytest 7.4, our floor) has no loop-scope ini keys, and an unknown key is an
# error under filterwarnings = error: there the session loop is asked for by the marker instead.
_LOOP_SCOPE_KEYS = tuple(int(part) for part in version("pytest-asyncio").split(".")[:2]) >= (0, 24)
RUNNERS = {  # ini lines, marker of async tests, extra pytest arguments
    "strict-function": ("asyncio_mode = strict" + ("\nasyncio_default_fixture_loop_scope = function"
                                                    if _LOOP_SCOPE_KEYS else ""), "@pytest.mark.asyncio", ()),
    "auto-session": ("asyncio_mode = auto\nasyncio_default_fixture_loop_scope = session\n"
                     "asyncio_default_test_loop_scope = session", "", ()) if _LOOP_SCOPE_KEYS else
                    ("asyncio_mode = auto", '@pytest.mark.asyncio(scope="session")', ()),
    "anyio": ("", "@pytest.mark.anyio", ("-p", "no:asyncio")),
}


def make_app(pytester: pytest.Pytester, kind: str, driver: str, extra_ini: str = "") -> tuple[str, tuple[str, ...]]:
    placeholder, runner, _ = APPS[(kind, driver)]
    ini, mark, args = RUNNERS[runner]
    source = SYNC_APP if kind == "sync" else ASYNC_APP
    connect_args = ASYNCPG_ARGS if driver == "asyncpg" else LIBPQ_ARGS
    pytester.makepyfile(app=source.replace("{connect_args}", repr(connect_args)))
    pytester.makeini(INI.format(placeholder=placeholder, runner=ini + "\n" + extra_ini))
    return mark, args


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # -rfE -vv: the short summary names each refused cell with its whole line
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-rfE", "-vv", *args)


@pytest.mark.parametrize(("kind", "driver"), list(APPS), ids=[f"{k}-{d}" for k, d in APPS])
def test_every_cell_shares_the_apps_connection_or_is_refused_with_one_line(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, kind: str, driver: str) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # pytest 7.4 cuts summary lines to the terminal width even with -vv
    mark, args = make_app(pytester, kind, driver)
    pytester.makepyfile(test_matrix=CELLS.format(driver=driver, mark=mark))
    result = run(pytester, *args)
    refused = APPS[(kind, driver)][2]
    result.assert_outcomes(passed=6 - len(refused), errors=len(refused))
    result.stdout.fnmatch_lines_random([f"ERROR test_matrix.py::{test} - Failed: pgshard: {line}"
                                        for test, line in refused.items()])
    assert "Traceback" not in result.stdout.str()


def test_psycopg2_only_api_works_in_db_session_on_the_apps_driver(pytester: pytest.Pytester) -> None:
    make_app(pytester, "sync", "psycopg2")
    pytester.makepyfile(test_bulk=textwrap.dedent('''
        from sqlalchemy import func, select
        import app

        def test_execute_values(db_session, client):
            app.bulk_insert(db_session, ["a", "b", "c"])  # the app's helper, on the test's session
            with app.SessionLocal() as own:  # and on the app's own (rebound) session
                app.bulk_insert(own, ["d"])
                own.commit()
            assert db_session.connection().dialect.driver == "psycopg2"
            assert db_session.scalar(select(func.count()).select_from(app.Thing)) == 4
            assert client.get("/things").json() == ["a", "b", "c", "d"]

        def test_rolled_back(db_session):
            assert db_session.scalar(select(func.count()).select_from(app.Thing)) == 0
    '''))
    run(pytester).assert_outcomes(passed=2)


def test_client_fixtures_use_pgshard_base_url(pytester: pytest.Pytester) -> None:
    mark, args = make_app(pytester, "sync", "psycopg")  # the app is mounted under /api
    pytester.makepyfile(test_base=textwrap.dedent(f'''
        import pytest

        def test_client(client):
            assert client.post("/things/a").status_code == 201
            assert str(client.get("/things").url) == "http://test/api/things"

        {mark}
        async def test_async_client(async_client):
            assert (await async_client.post("/things/b")).status_code == 201
            response = await async_client.get("/things")
            assert response.json() == ["b"] and str(response.url) == "http://test/api/things"

        @pytest.fixture
        def anyio_backend():
            return "asyncio"
    '''))
    run(pytester, *args).assert_outcomes(passed=2)


def test_an_app_engine_built_for_another_database_lands_on_the_workers(pytester: pytest.Pytester) -> None:
    make_app(pytester, "async", "asyncpg")
    pytester.makeini(INI.format(placeholder="{url}", runner=RUNNERS["strict-function"][0]).replace(
        "pgshard_env = DATABASE_URL={url}",
        "pgshard_env = DATABASE_URL=postgresql+asyncpg://someone:pw@127.0.0.1:1/appdb"))
    pytester.makepyfile(test_one=textwrap.dedent('''
        from sqlalchemy import text

        def test_one(client, db_session, pg_database):
            assert client.post("/things/a").json() == {"driver": "asyncpg"}
            assert db_session.scalar(text("SELECT current_database()")) == pg_database.name
            assert db_session.scalar(text("SELECT current_setting('statement_timeout')")) == "42s"
            assert db_session.scalar(text("SELECT count(*) FROM thing")) == 1
    '''))
    run(pytester).assert_outcomes(passed=1)


def test_pgshard_async_driver_overrides_the_apps_async_driver(pytester: pytest.Pytester) -> None:
    make_app(pytester, "async", "psycopg", extra_ini="pgshard_async_driver = asyncpg")
    pytester.makepyfile(test_one=textwrap.dedent('''
        import pytest
        from sqlalchemy import text

        @pytest.mark.asyncio(loop_scope="session")
        async def test_one(async_db_session, async_client, pg_database):
            assert (await async_client.post("/things/a")).json() == {"driver": "asyncpg"}
            assert (await async_db_session.connection()).dialect.driver == "asyncpg"
            assert await async_db_session.scalar(text("SELECT current_database()")) == pg_database.name
    '''))
    run(pytester).assert_outcomes(passed=1)


LIFESPAN = '''
from contextlib import asynccontextmanager
from fastapi import Request


@asynccontextmanager
async def lifespan(app):
    app.state.started = True
    yield {"greeting": "ready"}
    app.state.started = False


@router.get("/health")
def health(request: Request):
    return {"started": request.app.state.started, "greeting": request.state.greeting}


app = FastAPI(lifespan=lifespan)
app.include_router(router, prefix="/api")
'''

# Issue 15, items 5 and 6: every cell again, on an app engine in AUTOCOMMIT (the test's connection leaves it for
# the outer transaction, the app's other connections keep it) with a lifespan that fills app and request state.
AUTOCOMMIT_AND_LIFESPAN = '''

{mark}
async def test_lifespan_async_client(async_client):
    assert (await async_client.get("/health")).json() == {{"started": True, "greeting": "ready"}}


def test_lifespan_client(client):
    assert client.get("/health").json() == {{"started": True, "greeting": "ready"}}


def test_db_connection_in_a_transaction_and_the_apps_other_connections_in_autocommit(db_connection):
    assert db_connection.in_transaction()
    db_connection.execute(text("INSERT INTO thing (name) VALUES ('via-connection')"))
    db_connection.execute(text("SAVEPOINT s1"))  # refused outside a transaction block
    engine = getattr(app.engine, "sync_engine", app.engine)
    if engine.dialect.driver != "asyncpg":  # a sync driver: look at another connection of the app's own pool
        with engine.connect() as other:
            assert other.connection.dbapi_connection.autocommit is True


def test_zz_the_pool_keeps_autocommit_and_nothing_is_left(pg_engine):
    engine = getattr(app.engine, "sync_engine", app.engine)
    if engine.dialect.driver != "asyncpg":
        with engine.connect() as conn:  # the test connections went back to the pool as the app made them
            assert conn.connection.dbapi_connection.autocommit is True
    with pg_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM thing")).scalar() == 0
'''


@pytest.mark.parametrize(("kind", "driver"), [("sync", "psycopg2"), ("sync", "psycopg"), ("async", "asyncpg")],
                         ids=["sync-psycopg2", "sync-psycopg", "async-asyncpg"])
def test_an_autocommit_app_engine_with_a_lifespan_works_in_every_fixture(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, kind: str, driver: str) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    mark, args = make_app(pytester, kind, driver)
    source = (pytester.path / "app.py").read_text()
    source = source.replace("connect_args=CONNECT_ARGS)", 'connect_args=CONNECT_ARGS, isolation_level="AUTOCOMMIT")')
    source = source.replace('app = FastAPI()\napp.include_router(router, prefix="/api")', LIFESPAN)
    assert 'isolation_level="AUTOCOMMIT"' in source and "lifespan=lifespan" in source
    (pytester.path / "app.py").write_text(source)
    cells = CELLS.format(driver=driver, mark=mark).replace("def test_zz_nothing_left", "def test_zy_nothing_left")
    pytester.makepyfile(test_matrix=cells + AUTOCOMMIT_AND_LIFESPAN.format(mark=mark))
    result = run(pytester, *args)
    refused = dict(APPS[(kind, driver)][2])
    if kind == "async":  # its savepoints are async_db_session's and db_session's: db_connection is refused
        refused["test_db_connection_in_a_transaction_and_the_apps_other_connections_in_autocommit"] = (
            "db_connection cannot share the async app's connection: use db_session")
    result.assert_outcomes(passed=10 - len(refused), errors=len(refused))
    result.stdout.fnmatch_lines_random([f"ERROR test_matrix.py::{test} - Failed: pgshard: {line}"
                                        for test, line in refused.items()])
    assert "Traceback" not in result.stdout.str()
