"""Issue 11: what a warm run does before its first test. The speed itself is measured in benchmarks/
(`python -m benchmarks phases`); these tests pin down the behaviour that makes it: the controller of a warm
`-n 2` run connects to nothing (no driver even imported), and a warm run's database is cloned while pytest
collects, before any test asks for it."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import psycopg
import pytest

from pgshard.leases import wait_for
from pgshard.server.base import ServerInfo
from tests.conftest import Project, databases, remove_cache

TESTS = '''
def test_one(pg_database):
    pass

def test_two(pg_database):
    pass
'''

# Written by the inner session's controller (or solo process) at its end: what it imported, and whether its
# own database existed when collection finished.
PROBE = '''
import json, os, sys, time

import pytest


def _ours_exist():
    import psycopg
    from pgshard.server.base import to_libpq
    url = json.loads(os.environ["PGSHARD_HANDOFF"])["url"]
    with psycopg.connect(to_libpq(url), autocommit=True) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s "
                            "AND shobj_description(oid, 'pg_database') LIKE %s",
                            ("pgshard%main", '%"pid":' + str(os.getpid()) + ',%')).fetchall()
    return [r[0] for r in rows]


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    if os.environ.get("PROBE_CLONE") and not hasattr(session.config, "workerinput"):
        session.config._probe_psycopg_before = "psycopg" in sys.modules
        deadline = time.monotonic() + 30  # the start-up thread's clone, polled for: nothing here has asked for it
        found = []
        while not found and time.monotonic() < deadline:
            found = _ours_exist()
            time.sleep(0.05)
        session.config._probe_found = found


def pytest_unconfigure(config):
    if hasattr(config, "workerinput"):
        return
    out = {"psycopg": "psycopg" in sys.modules, "found": getattr(config, "_probe_found", None)}
    with open(os.environ["PROBE_OUT"], "w") as fh:
        json.dump(out, fh)
'''


@pytest.fixture
def probed(project: Project, monkeypatch: pytest.MonkeyPatch, pg_server: ServerInfo) -> Path:
    """The inner project, probed. The outer session holds the server (pg_server) as a lingering one would:
    the inner runs are warm runs of one and the same postmaster."""
    project.pytester.makepyfile(test_startup=TESTS)
    project.pytester.makeconftest(PROBE)
    out = project.root / "probe.json"
    monkeypatch.setenv("PROBE_OUT", str(out))
    return out


def test_the_controller_of_a_warm_n2_run_connects_to_nothing(project: Project, probed: Path) -> None:
    project.run("-n", "2").assert_outcomes(passed=2)  # builds the template, learns the server's facts
    warm = project.run("-n", "2")
    warm.assert_outcomes(passed=2)
    warm.stdout.fnmatch_lines(["*reused (cache hit); clone per worker (*): gw0 * ms, gw1 * ms*"])
    assert json.loads(probed.read_text())["psycopg"] is False, "the controller imported the driver"


def test_a_warm_run_clones_its_database_while_pytest_collects(
        project: Project, probed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project.run().assert_outcomes(passed=2)  # builds the template: a build is never done in the background
    monkeypatch.setenv("PROBE_CLONE", "1")
    warm = project.run()
    warm.assert_outcomes(passed=2)
    warm.stdout.fnmatch_lines(["*reused (cache hit); clone per worker (*): main * ms*"])
    probe = json.loads(probed.read_text())
    assert probe["found"] and len(probe["found"]) == 1, "no clone of this run existed when collection ended"


APP_MODELS = '''
import os, threading

from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

with open(os.environ["IMPORTED_IN"], "a") as fh:  # signal handlers and the like work in the main thread only
    fh.write(threading.current_thread().name + "\\n")


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "thing"
    id: Mapped[int] = mapped_column(primary_key=True)
'''


def test_an_app_imported_to_name_the_template_is_imported_in_the_main_thread(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, pg_server: ServerInfo) -> None:
    """metadata: (and python:) steps import the app to fingerprint the template: never in the start-up thread,
    and never before the conftests."""
    pytester.makepyfile(app_models=APP_MODELS, test_things=TESTS)
    pytester.makeini("[pytest]\npgshard_migrate = metadata:app_models:Base\n")
    imported_in = pytester.path / "imported-in.txt"
    monkeypatch.setenv("IMPORTED_IN", str(imported_in))
    for _ in range(2):  # cold, then warm
        pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider").assert_outcomes(passed=2)
    threads = imported_in.read_text().split()
    assert threads and set(threads) == {"MainThread"}, threads


@pytest.mark.parametrize("how", ["a conftest that fails to import", "an unknown option"])
def test_a_run_that_never_reaches_its_tests_leaves_no_clone(
        how: str, project: Project, admin_conn: psycopg.Connection) -> None:
    """The start-up thread clones while the conftests import; a run that stops there (pytest never gets to its
    session's end) still drops that clone, at exit."""
    prefix = "pgu" + uuid.uuid4().hex[:8]
    project.pytester.makepyfile(test_startup=TESTS)
    project.run("-o", f"pgshard_prefix={prefix}").assert_outcomes(passed=2)  # builds: the next one is warm
    if how == "an unknown option":
        result = project.run("-o", f"pgshard_prefix={prefix}", "--no-such-option")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
    else:
        project.pytester.makeconftest("raise RuntimeError('this conftest is broken')\n")
        result = project.run("-o", f"pgshard_prefix={prefix}")
        assert result.ret != pytest.ExitCode.OK
    left = [name for name in databases(admin_conn, prefix + "%") if "_tpl_" not in name]
    assert left == [], f"{how} left {left}"


# -- issue 18: a cold embedded server starts while pytest imports the conftests and collects ---------------------
# The conftest reads the URL pgshard_env gives it at import, as a settings module does, and records whether the
# server behind it was up yet; then it waits for that server (a condition, polled) as the app's first query would.
COLD_CONFTEST = '''
import json, os

import psycopg
from sqlalchemy.engine import make_url

from pgshard.server.base import to_libpq

URL = os.environ["DATABASE_URL"]  # this worker's database: made only once the server is up


def _up():
    try:
        psycopg.connect(to_libpq(make_url(URL).set(database="postgres").render_as_string(hide_password=False)),
                        connect_timeout=2).close()
        return True
    except psycopg.OperationalError:
        return False


UP_AT_IMPORT = _up()


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        with open(os.environ["PROBE_OUT"], "w") as fh:
            json.dump({"up_at_import": UP_AT_IMPORT}, fh)
'''

COLD_TESTS = '''
import os
from sqlalchemy import create_engine, text

def test_the_app_url_reaches_the_server(pg_database):
    with create_engine(os.environ["DATABASE_URL"]).connect() as conn:
        assert conn.execute(text("SELECT current_database()")).scalar() == pg_database.name
'''


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["serial", "n2"])
def test_a_cold_server_starts_while_the_conftests_import(
        workers: tuple[str, ...], project: Project, own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """initdb and the first start run beside pytest's start-up: the app's settings (pgshard_env) name the server
    before it is up, on the port it then comes up on, and the first test finds it."""
    project.pytester.makeini("[pytest]\npgshard_migrate = alembic:alembic.ini\npgshard_env = DATABASE_URL={url}\n")
    project.pytester.makeconftest(COLD_CONFTEST)
    project.pytester.makepyfile(test_cold=COLD_TESTS)
    out = project.root / "probe.json"
    monkeypatch.setenv("PROBE_OUT", str(out))
    result = project.run(*workers)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*server: embedded*ready in * s (waited for * s of it)*"])
    assert json.loads(out.read_text())["up_at_import"] is False, "the server was up before the conftests imported"


PARTS_TESTS = '''
import os
import psycopg

def test_the_app_logs_in_with_the_password_it_was_given(pg_database):
    # an app that builds its URL from parts (the FastAPI full-stack template's settings): no passfile for it
    with psycopg.connect(host=os.environ["DB_HOST"], port=os.environ["DB_PORT"], user=os.environ["DB_USER"],
                         password=os.environ["DB_PASSWORD"], dbname=os.environ["DB_NAME"],
                         passfile="/dev/null") as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == pg_database.name
'''


@pytest.mark.parametrize("cold", ["no-cluster", "passfile-gone"])
@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["serial", "n2"])
def test_a_password_given_to_the_app_before_the_server_is_up_is_the_one_that_opens_it(
        cold: str, workers: tuple[str, ...], project: Project, own_cache: Path) -> None:
    """pgshard_env's {password} is read while the cold server starts beside pytest's imports: the password the
    cluster then gets (initdb, or a stopped cluster whose passfile was lost) must be that one. Found on the FastAPI
    full-stack template: its serial cold run failed every test with "password authentication failed"."""
    project.pytester.makeini("[pytest]\npgshard_migrate = alembic:alembic.ini\npgshard_env =\n    DB_HOST={host}\n"
                             "    DB_PORT={port}\n    DB_USER={user}\n    DB_PASSWORD={password}\n"
                             "    DB_NAME={dbname}\n")
    project.pytester.makepyfile(test_parts=PARTS_TESTS)
    if cold == "passfile-gone":
        from pgshard.server.embedded import EmbeddedServer

        project.run().assert_outcomes(passed=1)  # a cluster, then stopped, its passfile then lost
        server = EmbeddedServer(cache_dir=own_cache)
        server.stop()
        server.passfile.unlink()
    result = project.run(*workers)
    result.assert_outcomes(passed=1)


def _bindir_with_initdb(root: Path, script: str) -> Path:
    """The system's server binaries with ``initdb`` replaced by a shell script (``{real}``: the real bindir)."""
    from pgshard.server.binaries import find_binaries

    real, _ = find_binaries()
    bindir = root / "bin"
    bindir.mkdir(parents=True)
    for tool in real.iterdir():
        (bindir / tool.name).symlink_to(tool)
    (bindir / "initdb").unlink()
    (bindir / "initdb").write_text(script.format(real=real))
    (bindir / "initdb").chmod(0o755)
    for path in (root, bindir):
        path.chmod(0o755)  # the server's account (pgshard runs as root here) reaches it
    return bindir


def _failing_bindir(root: Path) -> Path:
    """Server binaries whose initdb fails (the rest are the system's own): a start that breaks mid-way."""
    return _bindir_with_initdb(root, "#!/bin/sh\necho 'initdb: error: simulated failure for the test' >&2\nexit 1\n")


def test_a_cold_start_that_takes_long_says_so_when_it_begins_and_when_it_ends(
        project: Project, own_cache: Path) -> None:
    """A first start that the run waits for more than 2 s of (initdb on a busy machine; here an initdb made 3 s
    slower): the terminal is told, once as the wait begins and once as it ends, and the run is green."""
    project.pytester.makepyfile(test_startup=TESTS)
    bindir = _bindir_with_initdb(own_cache.with_name(own_cache.name + "-bin"),
                                 '#!/bin/sh\nsleep 3\nexec {real}/initdb "$@"\n')
    try:
        result = project.run("-o", f"pgshard_pg_bin={bindir}")
        text = result.stdout.str() + "\n" + result.stderr.str()  # (pytest 7.4 ends stdout without a newline)
        result.assert_outcomes(passed=2)
    finally:
        remove_cache(own_cache)  # its server runs binaries from the directory removed next
        shutil.rmtree(bindir.parent, ignore_errors=True)
    lines = text.splitlines()
    begins = "pgshard: waiting for the embedded server to start"
    ends = r"pgshard: the embedded server started in [\d.]+ s"
    waiting = [i for i, line in enumerate(lines) if line.startswith(begins)]
    started = [i for i, line in enumerate(lines) if re.fullmatch(ends, line)]
    assert len(waiting) == 1 and len(started) == 1 and waiting[0] < started[0], text
    assert float(lines[started[0]].split(" in ")[1].split()[0]) >= 3, lines[started[0]]


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["serial", "n2"])
def test_a_cold_start_that_fails_in_the_background_is_one_line_before_any_test(
        workers: tuple[str, ...], project: Project, own_cache: Path) -> None:
    project.pytester.makepyfile(test_startup=TESTS)
    bindir = _failing_bindir(own_cache.with_name(own_cache.name + "-bin"))
    try:
        result = project.run("-o", f"pgshard_pg_bin={bindir}", *workers)
    finally:
        shutil.rmtree(bindir.parent, ignore_errors=True)
    text = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text
    # (pytest 7.4 prints a usage error raised in the session right after its "no tests ran" line, unbroken)
    errors = [line for line in text.splitlines() if "ERROR: pgshard:" in line]
    assert len(errors) == 1 and "simulated failure for the test" in errors[0], text
    assert "Traceback" not in text and "passed" not in text, text


def test_a_run_stopped_during_a_cold_start_leaves_no_server_running(project: Project, own_cache: Path) -> None:
    """A conftest that fails while initdb runs in the background: the start is let finish, its lease given back
    (linger 0: the server stops), nothing is left running."""
    from pgshard.server.embedded import EmbeddedServer

    project.pytester.makepyfile(test_startup=TESTS)
    project.pytester.makeconftest("raise RuntimeError('this conftest is broken')\n")
    result = project.run()
    assert result.ret != pytest.ExitCode.OK
    assert "this conftest is broken" in result.stdout.str() + result.stderr.str()
    server = EmbeddedServer(cache_dir=own_cache)
    assert (server.datadir / "PG_VERSION").is_file(), "the background start did not get to initdb"
    wait_for(lambda: server.running_port() is None, 60, "the server of an interrupted cold start still runs")
    assert server._live_leases() == []


# -- issue 19 item 4: lazy for real --------------------------------------------------------------------------------
def _nothing_started(cache: Path) -> None:
    from pgshard.server.embedded import EmbeddedServer

    server = EmbeddedServer(cache_dir=cache)
    assert not (server.datadir / "PG_VERSION").exists(), "initdb ran"
    assert server.running_port() is None, "a server was started"
    assert not cache.exists(), f"the cache dir was created: {sorted(p.name for p in cache.rglob('*'))}"


def test_pgshard_variables_alone_start_no_server(
        pytester: pytest.Pytester, own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A project with no pgshard configuration and no pgshard fixture: PGSHARD_* variables set by a CI image or a
    shell profile do not make it start a server."""
    monkeypatch.setenv("PGSHARD_LINGER", "30")
    monkeypatch.setenv("PGSHARD_PREFIX", "pglazy")
    pytester.makepyfile(test_plain="def test_plain():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not [line for line in result.stdout.lines if line.strip("- ") == "pgshard"], "a pgshard summary"
    _nothing_started(own_cache)


@pytest.mark.parametrize("listing", ["--collect-only", "--markers", "--fixtures", "--fixtures-per-test"])
def test_a_run_that_only_lists_starts_no_server(listing: str, project: Project, own_cache: Path) -> None:
    """pytest lists and runs nothing: no initdb, no start, and the app's settings still get their URL at import
    (pgshard_env), so a settings module that requires it imports."""
    project.pytester.makeini("[pytest]\npgshard_migrate = alembic:alembic.ini\npgshard_env = DATABASE_URL={url}\n")
    project.pytester.makeconftest("import os\nassert os.environ['DATABASE_URL'].startswith('postgresql')\n")
    project.pytester.makepyfile(test_startup=TESTS)
    result = project.run(listing)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    _nothing_started(own_cache)


def _summary(result: pytest.RunResult) -> list[str]:
    """The lines of the pgshard section, up to pytest's own closing line."""
    section = result.stdout.str().split(" pgshard ", 1)[1].splitlines()[1:]
    return [line for line in section if line and not line.startswith("=")][:10]


def test_a_green_runs_summary_is_one_line_with_details_under_v_and_nothing_under_qq(project: Project) -> None:
    project.pytester.makepyfile(test_startup=TESTS)
    default = project.run()
    default.assert_outcomes(passed=2)
    lines = _summary(default)
    assert len(lines) == 1, lines  # server; template; clones
    assert re.fullmatch(r"server: embedded .*, ready in [\d.]+ s.* at postgresql\+psycopg://pgshard@127\.0\.0\.1:\d+/"
                        r"postgres; template pgshard_tpl_\w+: (built in [\d.]+ s \(cache miss\)|reused \(cache hit\)); "
                        r"clone per worker \(\w+\): main \d+ ms", lines[0]), lines[0]
    assert "%2F" not in lines[0] and "passfile" not in lines[0], lines[0]
    verbose = project.run("-v")
    verbose.assert_outcomes(passed=2)
    details = _summary(verbose)
    assert [line.split(" ", 1)[0] for line in details] == ["server:", "template", "clone"], details
    assert details[1].startswith("template pgshard_tpl_") and details[1].endswith(": reused (cache hit)"), details
    quiet = project.run("-qq")
    assert quiet.ret == pytest.ExitCode.OK, quiet.stdout.str()
    assert " pgshard " not in quiet.stdout.str() and "server: " not in quiet.stdout.str(), quiet.stdout.str()

