"""Issue 17 items 1 and 2: libpq's environment (PGPASSWORD, PGOPTIONS, ...) never steers pgshard's own
connections nor makes it re-create its server; where it breaks the app's connections, one line names the
variable. Every URL form (a socket directory in the query, a service, an unknown parameter) reaches the one
server it names or gets one line.

Real servers and whole inner pytest sessions throughout; the variables are exported for the inner
processes only (this session's own connections are pgshard's and would not mind, but the helpers' are not).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from pgshard.server.base import ServerInfo
from tests.conftest import Project, secret_of

# Each one, as a CI job or a developer's shell might export it, would send a libpq connection elsewhere,
# as someone else, read-only, over SSL, or to a service that does not exist.
HOSTILE = {"PGPASSWORD": "not-the-password", "PGUSER": "nobody", "PGHOST": "/nonexistent", "PGPORT": "1",
           "PGDATABASE": "nowhere", "PGSERVICE": "nosuch", "PGOPTIONS": "-c default_transaction_read_only=on",
           "PGSSLMODE": "require", "PGTARGETSESSIONATTRS": "read-only"}

SCHEMA = "CREATE TABLE item (id serial PRIMARY KEY, note text NOT NULL);\n"

OWN_CONNECTIONS = '''
import os
import pytest
from sqlalchemy import text

@pytest.mark.parametrize("i", range(20))
def test_session(i, db_session):
    assert db_session.execute(text("SHOW default_transaction_read_only")).scalar() == "off"
    if "EXPECTED_PORT" in os.environ:  # the server the URL names, not libpq's default
        assert db_session.execute(text("SHOW port")).scalar() == os.environ["EXPECTED_PORT"]
    db_session.execute(text("INSERT INTO item (note) VALUES ('x')"))
    assert db_session.execute(text("SELECT current_user")).scalar() == "pgshard"

@pytest.mark.db_commit
def test_commit(commit_db):
    with commit_db.engine.begin() as conn:
        conn.execute(text("INSERT INTO item (note) VALUES ('y')"))
    with commit_db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM item")).scalar() == 1
'''

APP_CONNECTIONS = '''
import os
import pytest
from sqlalchemy import create_engine, text

@pytest.fixture(scope="session")
def app_engine():
    engine = create_engine(os.environ["DATABASE_URL"])  # the app's own engine, from its settings
    yield engine
    engine.dispose()

@pytest.mark.parametrize("i", range(100))
def test_item(i, app_engine, pg_database):
    with app_engine.begin() as conn:
        conn.execute(text("INSERT INTO item (note) VALUES ('x')"))
        assert conn.execute(text("SELECT current_database()")).scalar() == pg_database.name
'''


def _text(result: pytest.RunResult) -> str:
    return result.stdout.str() + result.stderr.str()


@pytest.fixture
def own_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An embedded server of these runs' own: what a variable could make pgshard do to it is what we check."""
    cache = Path("/dev/shm") / f"pgshard-env-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache))
    yield cache
    subprocess.run([sys.executable, "-m", "pgshard.cli", "server", "stop", "--cache-dir", str(cache)],
                   capture_output=True, check=False, timeout=120)
    shutil.rmtree(cache, ignore_errors=True)


def _sql_project(pytester: pytest.Pytester, tests: str, ini: str = "") -> None:
    pytester.makefile(".sql", schema=SCHEMA)
    pytester.makeini(f"[pytest]\npgshard_migrate = sql:schema.sql\n{ini}\n")
    pytester.makepyfile(test_it=tests)


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str
         ) -> pytest.RunResult:
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *args)


def _data_dir_identity(cache: Path) -> tuple[int, int]:
    """What initdb would change: the cluster's PG_VERSION file is written anew (inode, mtime)."""
    version = next(cache.glob("pg*-*/data/PG_VERSION"))
    stat = version.stat()
    return stat.st_ino, stat.st_mtime_ns


def test_exported_libpq_variables_steer_none_of_pgshards_own_connections(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, own_cache: Path) -> None:
    _sql_project(pytester, OWN_CONNECTIONS)
    _run(pytester, monkeypatch, {}, "-n", "2").assert_outcomes(passed=21)
    before = _data_dir_identity(own_cache)

    result = _run(pytester, monkeypatch, HOSTILE, "-n", "2")
    result.assert_outcomes(passed=21)
    text = _text(result)
    assert "reused (cache hit)" in text, text  # the template of the first run: nothing was re-created
    assert "re-created" not in text and "new password" not in text, text
    assert _data_dir_identity(own_cache) == before

    status = subprocess.run([sys.executable, "-m", "pgshard.cli", "status"], capture_output=True, text=True,
                            env={**os.environ, **HOSTILE}, timeout=120, check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "running:" in status.stdout and "new password" not in status.stderr
    assert _data_dir_identity(own_cache) == before


@pytest.mark.parametrize(("name", "value", "says"), [
    ("PGPASSWORD", "not-the-password", "password authentication failed"),
    ("PGOPTIONS", "-c default_transaction_read_only=on", "read-only transaction"),
])
def test_a_variable_that_breaks_the_apps_own_connections_is_named_in_one_line(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, own_cache: Path,
        name: str, value: str, says: str) -> None:
    _sql_project(pytester, APP_CONNECTIONS, "pgshard_env = DATABASE_URL={url}")
    _run(pytester, monkeypatch, {}, "-n", "2").assert_outcomes(passed=100)
    before = _data_dir_identity(own_cache)

    result = _run(pytester, monkeypatch, {name: value}, "-n", "2")
    text = _text(result)
    assert result.ret != 0
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    assert len(text.splitlines()) < 40, text
    line = next(line for line in text.splitlines() if f"pgshard: {name}" in line)
    assert says in line and f"env -u {name}" in line, line
    assert "not-the-password" not in text
    assert _data_dir_identity(own_cache) == before

    again = _run(pytester, monkeypatch, {}, "-n", "2")  # as the line says: without it, green, nothing rebuilt
    again.assert_outcomes(passed=100)
    assert "reused (cache hit)" in _text(again)


def test_pgpassword_breaking_a_migration_is_named_in_one_line(
        project: Project, monkeypatch: pytest.MonkeyPatch, own_cache: Path) -> None:
    project.pytester.makepyfile(test_it="def test_it(db_session):\n    pass\n")
    result = _run(project.pytester, monkeypatch, {"PGPASSWORD": "not-the-password"}, "-n", "2")
    text = _text(result)
    assert result.ret != 0
    assert "Traceback" not in text, text
    assert any(line.startswith(("E   pgshard: PGPASSWORD", "pgshard: PGPASSWORD", "ERROR: pgshard: PGPASSWORD"))
               or "pgshard: PGPASSWORD is exported" in line for line in text.splitlines()), text
    assert "re-created" not in text and "new password" not in text
    _run(project.pytester, monkeypatch, {}, "-n", "2").assert_outcomes(passed=1)


def _socket_url(server: ServerInfo, database: str) -> str:
    """The user's URL in libpq's socket-directory form: no host in the authority, host and port in the query."""
    url = make_url(server.url)
    passfile = url.query["passfile"]
    assert isinstance(passfile, str)
    sockdir = Path(passfile).parent / "run"
    return (f"postgresql+psycopg://{url.username}:{secret_of(server.url)}@/{database}"
            f"?host={sockdir}&port={url.port}")


REDIRECTED = '''
import os
import pytest
from sqlalchemy import create_engine, text

engine = create_engine(os.environ["APP_DATABASE_URL"])  # a module-level engine, read at import

@pytest.mark.parametrize("i", range(10))
def test_item(i, pg_database):
    with engine.connect() as conn:
        assert conn.execute(text("SELECT current_database()")).scalar() == pg_database.name
        assert conn.execute(text("SHOW port")).scalar() == os.environ["EXPECTED_PORT"]
'''


def test_a_socket_directory_url_reaches_the_server_it_names(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, second_server: ServerInfo,
        pg_server: ServerInfo) -> None:
    assert make_url(second_server.url).port != make_url(pg_server.url).port
    _sql_project(pytester, REDIRECTED, "pgshard_redirect = appdb")
    port = str(make_url(second_server.url).port)
    env = {"APP_DATABASE_URL": _socket_url(second_server, "appdb"), "EXPECTED_PORT": port}
    result = _run(pytester, monkeypatch, env, "-n", "2", "--pg-url", _socket_url(second_server, "postgres"))
    result.assert_outcomes(passed=10)
    assert secret_of(second_server.url) not in _text(result)


def test_a_service_url_reaches_the_server_its_service_file_names(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, second_server: ServerInfo) -> None:
    url = make_url(second_server.url)
    services = pytester.path / "pg_service.conf"
    services.write_text(textwrap.dedent(f"""\
        [pgshard-test]
        host=127.0.0.1
        port={url.port}
        user={url.username}
        password={secret_of(second_server.url)}
        dbname=postgres
        """))
    _sql_project(pytester, OWN_CONNECTIONS)
    result = _run(pytester, monkeypatch, {"PGSERVICEFILE": str(services), "EXPECTED_PORT": str(url.port)},
                  "-n", "2", "--pg-url", "postgresql://?service=pgshard-test")
    result.assert_outcomes(passed=21)  # every test on the server the service file names (SHOW port)
    assert secret_of(second_server.url) not in _text(result)


def test_an_unknown_url_parameter_is_one_line(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                             second_server: ServerInfo) -> None:
    _sql_project(pytester, OWN_CONNECTIONS)
    url = make_url(second_server.url).set(password=secret_of(second_server.url), query={"pgbouncer": "true"})
    result = _run(pytester, monkeypatch, {}, "-n", "2", "--pg-url", url.render_as_string(hide_password=False))
    text = _text(result)
    assert result.ret != 0
    assert "Traceback" not in text and len(text.splitlines()) < 10, text
    assert 'invalid URI query parameter: "pgbouncer"; remove it from the URL' in text, text
    assert secret_of(second_server.url) not in text
