"""Issue 15: an existing suite adopted right on the first try, with the lines a user copies from the guides.

The project under test is tests/projects/from_parts: the full-stack FastAPI template's shape (settings from
``POSTGRES_*`` parts read at import, ``alembic upgrade head`` and a seed script before the run, an app with a
lifespan, the suite's own module-scoped ``client``), configured with docs/from-shared-database.md's lines.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from pgshard.server.base import ServerInfo
from tests.conftest import databases, secret_of, with_password

PROJECT = Path(__file__).parents[1] / "projects" / "from_parts"
SUITE_SIZE = 9  # tests in tests/projects/from_parts/tests

# docs/from-shared-database.md, "An app that builds its URL from parts", verbatim
GUIDE_LINES = """\
[pytest]
pythonpath = .
pgshard_migrate =
    command:alembic upgrade head
    command:python scripts/initial_data.py
pgshard_env =
    POSTGRES_SERVER={host}
    POSTGRES_PORT={port}
    POSTGRES_USER={user}
    POSTGRES_PASSWORD={password}
    POSTGRES_DB={dbname}
pgshard_app = app.main:app
pgshard_get_db = app.deps:get_db
"""


class FromParts:
    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.root = pytester.path
        shutil.copytree(PROJECT, self.root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        with (self.root / "alembic" / "versions" / "0001_initial.py").open("a") as fh:
            fh.write(f"# token: {uuid.uuid4().hex}\n")  # a template of its own
        (self.root / "pytest.ini").write_text(GUIDE_LINES)

    def run(self, *args: str, cache: bool = False) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess(*(() if cache else ("-p", "no:cacheprovider")), *args)


@pytest.fixture
def from_parts(pytester: pytest.Pytester) -> FromParts:
    return FromParts(pytester)


def _no_secret_anywhere(project: FromParts, result: pytest.RunResult, secret: str) -> None:
    assert len(secret) >= 8
    assert secret not in result.stdout.str() + result.stderr.str()
    for path in project.root.rglob("*"):  # the junit XML, any cache pytest or the steps left
        if path.is_file() and "__pycache__" not in path.parts:
            assert secret.encode() not in path.read_bytes(), f"the password is in {path}"


def test_a_project_built_from_parts_is_green_on_the_embedded_server_and_leaks_no_password(
        from_parts: FromParts) -> None:
    result = from_parts.run("-n", "2", "-p", "randomly", "--junitxml=report.xml", "-rA", "--showlocals",
                            cache=True)
    result.assert_outcomes(passed=SUITE_SIZE)
    result.stdout.fnmatch_lines(["*template pgshard_tpl_*: built in *"])
    assert any(line.startswith("server: embedded") for line in result.stdout.lines)
    # the summary shows no passfile: the password is read from the embedded server's own (the suite's cache dir)
    from pgshard.server.embedded import EmbeddedServer

    server = EmbeddedServer(cache_dir=Path(os.environ["PGSHARD_CACHE_DIR"]))
    _no_secret_anywhere(from_parts, result, secret_of(server.url(1)))


def test_a_project_built_from_parts_is_green_on_pg_url_and_leaks_no_password(
        from_parts: FromParts, second_server: ServerInfo) -> None:
    url = with_password(second_server.url)
    result = from_parts.run("-n", "2", "-p", "randomly", "--pg-url", url, "--junitxml=report.xml", "-rA")
    result.assert_outcomes(passed=SUITE_SIZE)
    _no_secret_anywhere(from_parts, result, str(make_url(url).password))


def test_the_suites_own_client_sees_only_its_tests_writes_under_randomly(from_parts: FromParts) -> None:
    for seed in ("1", "2"):
        result = from_parts.run("-n", "2", "-p", "randomly", f"--randomly-seed={seed}")
        result.assert_outcomes(passed=SUITE_SIZE)


BROKEN = {  # step kind: (ini line, the file that breaks, what it becomes, the line pgshard must point at)
    "alembic": ("alembic:alembic.ini", "alembic/versions/0002_broken.py", None, "alembic/versions/0002_broken.py:14"),
    "command": ("command:alembic upgrade head", "alembic/versions/0002_broken.py", None, None),
    "python": ("python:app.seed:main", "app/seed.py",
               "def main(url):\n    from sqlalchemy import create_engine, text\n\n"
               "    with create_engine(url).begin() as conn:\n"
               "        conn.execute(text('INSERT INTO nowhere VALUES (1)'))\n", "app/seed.py:5"),
    "metadata": ("metadata:app.broken_models:Base", "app/broken_models.py",
                 "from sqlalchemy.orm import DeclarativeBase\n\n\nclass Base(DeclarativeBase):\n    pass\n\n\n"
                 "Base.metadata.tables_by_name['x']\n", "app/broken_models.py:8"),
}
BROKEN_REVISION = '''"""a broken revision"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "item",
        sa.Column("note", sa.Integr),
    )


def downgrade() -> None:
    pass
'''


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_step_says_what_failed_and_where_in_under_30_lines(from_parts: FromParts, kind: str) -> None:
    line, path, source, where = BROKEN[kind]
    (from_parts.root / path).write_text(BROKEN_REVISION if source is None else source)
    ini = GUIDE_LINES.replace("    command:alembic upgrade head\n    command:python scripts/initial_data.py\n",
                              f"    command:alembic upgrade head\n    {line}\n" if kind in ("python", "metadata")
                              else f"    {line}\n")
    (from_parts.root / "pytest.ini").write_text(ini)
    result = from_parts.run("-n", "2", "-p", "no:randomly")
    out = result.stdout.str()
    failed = [row for row in result.stdout.lines if f"pgshard_migrate step '{line}' failed" in row]
    assert failed, out
    first = failed[0]
    if kind == "python":
        assert "UndefinedTable" in first and 'relation "nowhere" does not exist' in first
    elif kind == "metadata":
        assert "AttributeError" in first and "tables_by_name" in first
    else:
        assert "AttributeError: module 'sqlalchemy' has no attribute 'Integr'" in out
    if where is not None:
        assert f"at {where}" in first
    else:  # a command: the exception line of its own output, and the file with all of it
        kept = [row.split("whole output: ", 1)[1].strip() for row in result.stdout.lines if "whole output: " in row]
        assert kept and "Integr" in Path(kept[0]).read_text()
        assert "Background on this error" not in out
    block = out[out.index(first):out.index("short test summary") if "short test summary" in out else None]
    assert len(block.splitlines()) < 30, block
    if kind in ("alembic", "python"):  # raised in the build's child process, whose traceback is kept
        assert "(the build's whole traceback: --tb=long)" in out
    assert "Interrupted: " in out


def test_tb_long_shows_the_builds_whole_traceback(from_parts: FromParts) -> None:
    (from_parts.root / "alembic" / "versions" / "0002_broken.py").write_text(BROKEN_REVISION)
    (from_parts.root / "pytest.ini").write_text(GUIDE_LINES.replace(
        "    command:alembic upgrade head\n    command:python scripts/initial_data.py\n",
        "    alembic:alembic.ini\n"))
    result = from_parts.run("-p", "no:randomly", "--tb=long")
    result.stdout.fnmatch_lines(["*the build's traceback:*", "*Traceback (most recent call last):*",
                                 '*File "*0002_broken.py", line 14, in upgrade*'])


# -- item 3: the README's block keeps the app's own driver -------------------------------------------------------
README_BLOCK = '''
[tool.pytest.ini_options]
pythonpath = ["."]                                # only if myapp/ is a directory, not pip-installed
pgshard_migrate = ["alembic:alembic.ini"]          # how to build the template, in order
pgshard_env = ["DATABASE_URL={url}"]              # set before your app is imported
pgshard_app = "myapp.main:app"                    # for the client / async_client fixtures
pgshard_get_db = "myapp.database:get_db"          # the dependency that yields a Session
pgshard_sessionmaker = "myapp.database:SessionLocal"  # rebound to the test's connection
'''

SYNC_DATABASE = '''
import os
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

engine = create_engine(os.environ["DATABASE_URL"])
SessionLocal = sessionmaker(bind=engine)


def get_db():
    with SessionLocal() as session:
        yield session
'''
ASYNC_DATABASE = '''
import os
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine(os.environ["DATABASE_URL"])
SessionLocal = async_sessionmaker(engine)


async def get_db():
    async with SessionLocal() as session:
        yield session
'''
MAIN = '''
from fastapi import Depends, FastAPI
from sqlalchemy import text
from myapp.database import get_db

app = FastAPI()


@app.get("/driver")
{async_}def driver(db=Depends(get_db)):
    conn = {await_}db.connection()
    return {{"driver": conn.dialect.driver, "one": ({await_}db.execute(text("SELECT 1"))).scalar()}}
'''
ENV_PY_SYNC = '''
import os
from alembic import context
from sqlalchemy import create_engine, pool

engine = create_engine(os.environ["DATABASE_URL"], poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
'''
ENV_PY_ASYNC = '''
import asyncio
import os
from alembic import context
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine


def migrate(connection):
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def main():
    engine = create_async_engine(os.environ["DATABASE_URL"], poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(migrate)
    await engine.dispose()


asyncio.run(main())
'''
REVISION = '''
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("thing", sa.Column("id", sa.Integer, primary_key=True))  # {token}
'''
DRIVER_TEST = '''
from myapp.database import engine


def test_the_app_runs_on_its_own_driver(client):
    assert getattr(engine, "sync_engine", engine).dialect.driver == "{driver}"
    assert client.get("/driver").json() == {{"driver": "{driver}", "one": 1}}
'''


def _driver_app(pytester: pytest.Pytester, driver: str, dependencies: list[str]) -> None:
    is_async = driver == "asyncpg"
    root = pytester.path
    (root / "myapp").mkdir()
    (root / "myapp" / "__init__.py").write_text("")
    (root / "myapp" / "database.py").write_text(ASYNC_DATABASE if is_async else SYNC_DATABASE)
    (root / "myapp" / "main.py").write_text(MAIN.format(async_="async " if is_async else "",
                                                        await_="await " if is_async else ""))
    (root / "alembic" / "versions").mkdir(parents=True)
    (root / "alembic" / "env.py").write_text(ENV_PY_ASYNC if is_async else ENV_PY_SYNC)
    (root / "alembic" / "versions" / "0001.py").write_text(REVISION.format(token=uuid.uuid4().hex))
    (root / "alembic.ini").write_text("[alembic]\nscript_location = alembic\n")
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "myapp"\nversion = "0"\ndependencies = {dependencies!r}\n'.replace("'", '"')
        + README_BLOCK)
    (root / "test_driver.py").write_text(DRIVER_TEST.format(driver=driver))


@pytest.mark.parametrize(("driver", "dependencies"), [
    ("psycopg2", ["fastapi", "sqlalchemy", "psycopg2-binary>=2.9"]),
    ("asyncpg", ["fastapi", "sqlalchemy[asyncio]", "asyncpg"]),
])
def test_the_readme_block_keeps_the_apps_declared_driver(pytester: pytest.Pytester, driver: str,
                                                         dependencies: list[str]) -> None:
    _driver_app(pytester, driver, dependencies)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=1)
    assert "carries psycopg 3" not in result.stdout.str() + result.stderr.str()


def test_two_declared_drivers_and_no_url_say_once_which_placeholder_keeps_the_apps(
        pytester: pytest.Pytester) -> None:
    _driver_app(pytester, "psycopg2", ["psycopg2-binary", "asyncpg"])
    (pytester.path / "test_driver.py").write_text("def test_one(pg_database):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=1)
    said = [line for line in result.stderr.lines if "carries psycopg 3" in line]
    assert len(said) == 1, result.stderr.str()
    assert "{psycopg2_url}" in said[0] and "pyproject.toml: psycopg2-binary" in said[0]


# -- item 4: a suite that makes its own per-worker databases ---------------------------------------------------
OWN_DATABASES = '''
import os
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, text
from sqlalchemy.engine import make_url

BASE = os.environ["DATABASE_URL"]  # the suite's "maintenance" URL: pgshard_env points it at the worker's database
NAME = f"{stem}_{{os.environ.get('PYTEST_XDIST_WORKER', 'main')}}"
metadata = MetaData()
thing = Table("thing", metadata, Column("id", Integer, primary_key=True))


@pytest.fixture(scope="session", autouse=True)
def engine():
    admin = create_engine(BASE, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {{NAME}}"))
        conn.execute(text(f"CREATE DATABASE {{NAME}}"))
    engine = create_engine(make_url(BASE).set(database=NAME))
    metadata.create_all(engine)
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {{NAME}}"))
    admin.dispose()


@pytest.fixture
def conn(engine):
    with engine.connect() as conn:
        with conn.begin():
            yield conn


@pytest.mark.parametrize("n", range(6))
def test_writes_land_where_pgshard_says(conn, n):
    conn.execute(thing.insert())
    database = conn.scalar(text("SELECT current_database()"))
    with open(Path(os.environ["OWN_DB_LOG"]) / f"{{os.getpid()}}-{{n}}", "w") as fh:
        fh.write(database)
    assert conn.scalar(text("SELECT count(*) FROM thing")) >= 1
'''


def _own_databases(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ini: str, stem: str) -> Path:
    """A suite that makes ``<stem>_<worker>`` itself (each test its own stem: they may run at once)."""
    log = pytester.path / "ran-on"
    log.mkdir()
    monkeypatch.setenv("OWN_DB_LOG", str(log))
    pytester.makeconftest(OWN_DATABASES.format(stem=stem))
    pytester.makepyfile(test_own="from conftest import *  # noqa\n")
    pytester.makeini(f"[pytest]\npgshard_env = DATABASE_URL={{url}}\n{ini}")
    return log


def test_a_suite_creating_test_db_per_worker_lands_on_pgshards_clones_by_a_glob(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, admin_conn: Any) -> None:
    log = _own_databases(pytester, monkeypatch, "pgshard_redirect = test_db_*\n", "test_db")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=6)
    ran_on = {path.read_text() for path in log.iterdir()}
    assert len(list(log.iterdir())) == 6 and len(ran_on) == 2, ran_on  # one clone per worker
    assert all(name.startswith("pgshard_") and name.endswith(("_gw0", "_gw1")) for name in ran_on), ran_on
    assert databases(admin_conn, "test_db_%") == []
    assert not set(databases(admin_conn)) & ran_on  # and pgshard dropped its clones at the end
    assert "connection was closed" not in result.stdout.str()


def test_a_suite_creating_its_own_databases_is_named_in_the_summary_with_the_line_to_add(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, admin_conn: Any) -> None:
    log = _own_databases(pytester, monkeypatch, "", "own_db")
    conftest = pytester.path / "conftest.py"
    conftest.write_text(conftest.read_text().replace(  # it keeps its databases, as suites that crash do
        '    with admin.connect() as conn:\n        conn.execute(text(f"DROP DATABASE IF EXISTS {NAME}"))\n'
        '    admin.dispose()', "    admin.dispose()"))
    try:
        result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-n", "2")
        result.assert_outcomes(passed=6)
        assert {path.read_text() for path in log.iterdir()} == {"own_db_gw0", "own_db_gw1"}
        result.stdout.fnmatch_lines(["*the suite created 2 database(s) of its own on pgshard's server*"
                                     "own_db_gw0, own_db_gw1; put them on the template's clones with: "
                                     "pgshard_redirect = own_db_*"])
    finally:
        for name in databases(admin_conn, "own_db_%"):
            admin_conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


# -- item 7: config mistakes are one line before the first test (exit 4) ---------------------------------------
@pytest.mark.parametrize(("ini", "line"), [
    ("[pytest]\npgshard_migrates = sql:schema.sql\n",
     "*pytest.ini sets pgshard_migrates, which pgshard does not know; did you mean pgshard_migrate?*"),
    ("[pytest]\npgshard_app = app:ap\npgshard_get_db = app:get_db\n", "*pgshard_app = app:ap: *app.py defines no ap; "
                                                                       "did you mean app:app?*"),
    ("[pytest]\npgshard_get_db = nowhere:get_db\n", "*pgshard_get_db = nowhere:get_db: no module nowhere*"),
])
def test_a_config_mistake_is_one_line_before_any_test_and_exit_4(pytester: pytest.Pytester, ini: str,
                                                                  line: str) -> None:
    pytester.makepyfile(app="raise RuntimeError('imported')\napp = object()\ndef get_db():\n    yield\n",
                        test_one="def test_one():\n    pass\n")
    (pytester.path / "schema.sql").write_text("SELECT 1;\n")
    (pytester.path / "pytest.ini").write_text(ini)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pgshard: {line.lstrip('*')}"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert len(result.stderr.lines) < 5, result.stderr.str()


def test_pgshard_lines_added_to_pyproject_beside_tox_ini_stop_the_run(pytester: pytest.Pytester) -> None:
    (pytester.path / "tox.ini").write_text("[pytest]\nfilterwarnings = error\n")
    (pytester.path / "pyproject.toml").write_text('[tool.pytest.ini_options]\npgshard_migrate = ["sql:s.sql"]\n')
    (pytester.path / "s.sql").write_text("SELECT 1;\n")
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    said = ("ERROR: pgshard: pyproject.toml's [tool.pytest.ini_options] holds pgshard's lines and makes pytest "
            "ignore tox.ini [pytest] (its filterwarnings): put the pgshard lines in tox.ini [pytest]")
    assert said in result.stderr.str()


def test_a_get_db_that_fails_at_import_stops_the_run_after_one_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app="import nonexistent_module_xyz\napp = None\nget_db = None\n", test_many="""
        import pytest

        @pytest.mark.parametrize("n", range(5))
        def test_n(n):
            pass
    """)
    pytester.makeini("[pytest]\npgshard_app = app:app\npgshard_get_db = app:get_db\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*pgshard_app: cannot import app:app (ModuleNotFoundError: No module named "
                                 "'nonexistent_module_xyz' at app.py:1)*"])


def test_a_suite_client_pgshard_cannot_reach_is_named_once(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app='''
        import os
        from fastapi import Depends, FastAPI
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
        from sqlalchemy.pool import NullPool

        engine = create_async_engine(os.environ["DATABASE_URL"], poolclass=NullPool)  # a loop per TestClient
        SessionLocal = async_sessionmaker(engine)
        app = FastAPI()


        async def get_db():
            async with SessionLocal() as session:
                yield session


        @app.get("/one")
        async def one(db=Depends(get_db)):
            return (await db.execute(text("SELECT 1"))).scalar()
    ''', test_own='''
        import pytest
        from fastapi.testclient import TestClient
        from app import app


        @pytest.fixture
        def client():
            with TestClient(app) as c:
                yield c


        @pytest.mark.parametrize("n", range(3))
        def test_one(client, n):
            assert client.get("/one").json() == 1
    ''')
    pytester.makeini("[pytest]\npythonpath = .\npgshard_env = DATABASE_URL={asyncpg_url}\npgshard_app = app:app\n"
                     "pgshard_get_db = app:get_db\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    said = [line for line in result.stdout.lines if "the suite's own fixture client" in line]
    assert len(said) == 1 and "test_own.py" in said[0] and "use pgshard's client fixture" in said[0], said
