"""Issue 17 items 5, 6 and 7: a template damaged on disk, the walls that became one line (a read-only
checkout, the cache dir deleted mid-run, a hung migration), and the small truths (a db_commit pool after
its backends were terminated, the .failed lock file, the --pg-keep line).

Each fault is made for real: a page overwritten in the template's file with the server stopped, a checkout
made read-only, a migration that sleeps past the build timeout.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgshard.server.base import to_libpq
from pgshard.server.embedded import EmbeddedServer
from tests.conftest import Project, remove_cache
from tests.plugin.test_faults import _postmasters_of

SCHEMA = """
CREATE TABLE item (id serial PRIMARY KEY, note text NOT NULL);
INSERT INTO item (note) SELECT 'row ' || g FROM generate_series(1, 50) g;
"""

READS_THE_TABLE = '''
import pytest
from sqlalchemy import text

@pytest.mark.parametrize("i", range(30))
def test_count(i, db_session):
    assert db_session.execute(text("SELECT count(*) FROM item")).scalar() == 50
'''


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An embedded server of these runs' own (it stops when a run ends: linger 0)."""
    path = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/var/tmp") / f"pgshard-r3-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(path))
    yield path
    remove_cache(path)


def _text(result: pytest.RunResult) -> str:
    return result.stdout.str() + result.stderr.str()


def _sql_project(pytester: pytest.Pytester, tests: str, ini: str = "") -> None:
    pytester.makefile(".sql", schema=SCHEMA)
    pytester.makeini(f"[pytest]\npgshard_migrate = sql:schema.sql\n{ini}\n")
    pytester.makepyfile(test_it=tests)


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *args)


def _template_table_file(cache: Path) -> tuple[str, Path]:
    """The template's name and the file of its table ``item`` (the server is started for the asking)."""
    server = EmbeddedServer(cache_dir=cache)
    info = server.acquire()
    try:
        with psycopg.connect(to_libpq(info.url), autocommit=True) as conn:
            row = conn.execute("SELECT datname, oid FROM pg_database WHERE datname LIKE 'pgshard\\_tpl\\_%'"
                               ).fetchone()
            assert row is not None
            name, oid = str(row[0]), int(row[1])
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        with psycopg.connect(to_libpq(info.url.replace("/postgres?", f"/{name}?"))) as conn:
            relfile = conn.execute("SELECT pg_relation_filenode('item')").fetchone()
        with psycopg.connect(to_libpq(info.url), autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        assert relfile is not None
        return name, server.datadir / "base" / str(oid) / str(relfile[0])
    finally:
        server.release()
        server.stop_unless_used()


def test_a_template_page_damaged_on_disk_is_one_line_naming_the_template_and_the_fix(
        pytester: pytest.Pytester, cache: Path) -> None:
    _sql_project(pytester, READS_THE_TABLE)
    _run(pytester, "-n", "2").assert_outcomes(passed=30)
    template, table = _template_table_file(cache)
    with table.open("r+b") as handle:  # one page of garbage where the table's first page was
        handle.write(secrets.token_bytes(8192))

    result = _run(pytester, "-n", "2")
    text = _text(result)
    assert result.ret != 0
    assert "Traceback" not in text and "DataCorrupted" not in text, text
    assert len(text.splitlines()) < 40, text
    line = next(line for line in text.splitlines() if "damaged page" in line)
    assert template in line and "pytest --pg-rebuild" in line and "invalid page in block 0" in line, line

    rebuilt = _run(pytester, "-n", "2", "--pg-rebuild")  # as the line says
    rebuilt.assert_outcomes(passed=30)
    _run(pytester, "-n", "2").assert_outcomes(passed=30)


@pytest.fixture
def read_only(pytester: pytest.Pytester) -> Iterator[Path]:
    """The inner project's directory made read-only for real (a read-only bind mount: root writes anywhere
    else); where mounting is not permitted, a durations file under /proc, which nobody can create."""
    where = pytester.path / "checkout"
    mounted = subprocess.run(["mount", "--bind", str(where), str(where)], capture_output=True, check=False)
    if mounted.returncode != 0:
        yield Path("/proc/self/.test_durations")
        return
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(where)], capture_output=True, check=True)
        yield where / ".test_durations"
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, check=False)


def test_store_durations_in_a_read_only_checkout_is_one_line_and_the_run_stays_green(
        pytester: pytest.Pytester, cache: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = pytester.mkdir("checkout")
    (checkout / "schema.sql").write_text(SCHEMA)
    (checkout / "pytest.ini").write_text("[pytest]\npgshard_migrate = sql:schema.sql\n")
    (checkout / "test_it.py").write_text(READS_THE_TABLE)
    durations: Path = request.getfixturevalue("read_only")  # from here on the checkout cannot be written
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    if durations.parent != checkout:
        monkeypatch.setenv("PGSHARD_DURATIONS_FILE", str(durations))
    result = _run(pytester, "-n", "2", "--pg-store-durations", str(checkout))
    text = _text(result)
    assert result.ret == 0, text
    result.assert_outcomes(passed=30)
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    lines = [line for line in text.splitlines() if "could not write the durations file" in line]
    assert lines and all("pgshard_durations_file" in line for line in lines), text
    assert not durations.exists()


DELETES_THE_CACHE = '''
import os, shutil, pytest
from sqlalchemy import text

@pytest.mark.parametrize("i", range(20))
def test_item(i, db_session):
    if i == 5 and os.environ.get("DELETE_THE_CACHE"):
        shutil.rmtree(os.environ["PGSHARD_CACHE_DIR"], ignore_errors=True)
    assert db_session.execute(text("SELECT 1")).scalar() == 1
'''


def test_the_cache_dir_deleted_mid_run_is_one_line_and_its_server_is_stopped(
        pytester: pytest.Pytester, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_it=DELETES_THE_CACHE)
    with monkeypatch.context() as patch:
        patch.setenv("DELETE_THE_CACHE", "1")
        result = _run(pytester)  # one process: the test that deletes the cache is the one using its server
    text = _text(result)
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    # The open connection may go on serving (PostgreSQL keeps its files open) or the server may crash on the
    # next file it cannot open: either way one line says what happened, the same line in the summary.
    said = [line for line in text.splitlines() if f"the cache dir {cache} was deleted while this run used it" in line]
    assert said, text
    outcomes = result.parseoutcomes()
    stopped = outcomes.get("failed", 0) + outcomes.get("errors", 0) == 1 and result.ret != 0
    assert outcomes.get("passed") == 20 or stopped, text
    from pgshard.leases import wait_for

    wait_for(lambda: not _postmasters_of(cache), 60, "the orphaned postmaster stopped")
    _run(pytester).assert_outcomes(passed=20)  # the next run starts a new server (and deletes it again)


CRASHES_A_BACKEND = '''
import os, signal, time, pytest
from sqlalchemy import text

HERE = os.path.dirname(__file__)

@pytest.mark.parametrize("i", range(200))
def test_item(i, db_session, pg_engine):
    assert db_session.execute(text("SELECT 1")).scalar() == 1
    if i == 20:
        try:
            open(os.path.join(HERE, "crashed"), "x").close()
        except FileExistsError:
            return
        # another backend killed by the OOM killer: the postmaster ends every session and recovers
        with pg_engine.connect() as victim:
            os.kill(victim.execute(text("SELECT pg_backend_pid()")).scalar(), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until the crash reaches this test's own session
                db_session.execute(text("SELECT 1"))
'''


def test_a_worker_that_had_not_cloned_yet_still_tells_a_crash_from_a_test_ending_sessions(cache: Path) -> None:
    """A worker's first setup may meet the crash (seen in a CI run: the other worker's 25 tests each printed a
    traceback): it has no statistics of its own to compare yet, so the reset time is compared with when it
    took the server over. A real backend killed by SIGKILL: the postmaster ends every session and recovers."""
    import os
    import signal
    from datetime import datetime, timezone

    from pgshard.leases import wait_for
    from pgshard.run import Run
    from pgshard.settings import Settings

    server = EmbeddedServer(cache_dir=cache)
    info = server.acquire()
    try:
        settings = Settings(server="embedded", cache_dir=cache)
        worker = Run(settings, "r", "gw1", server=info)
        worker._adopted_at = datetime.now(timezone.utc)
        assert worker._server_state() == "up"  # nothing happened: a died-looking error is the test's own
        with psycopg.connect(to_libpq(info.url), autocommit=True) as victim:
            os.kill(int(victim.execute("SELECT pg_backend_pid()").fetchone()[0]), signal.SIGKILL)  # type: ignore[index]

        def answers() -> bool:
            try:
                with psycopg.connect(to_libpq(info.url), connect_timeout=3) as conn:
                    return conn.execute("SELECT 1").fetchone() == (1,)
            except psycopg.OperationalError:
                return False

        wait_for(answers, 60, "the server to recover from the crash")
        assert worker._server_state() == "crashed"
        later = Run(settings, "r", "gw2", server=info)  # a worker that took it over after the crash
        later._adopted_at = datetime.now(timezone.utc)
        assert later._server_state() == "up"
    finally:
        server.release()
        server.stop_unless_used()


def test_a_server_that_crashed_and_recovered_mid_run_is_one_line_not_a_traceback_per_test(
        pytester: pytest.Pytester, cache: Path) -> None:
    """The server answers again a moment later, yet every session of the run was cut: each worker says so
    in one line and stops, instead of a traceback for each of its remaining tests."""
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_it=CRASHES_A_BACKEND)
    result = _run(pytester, "-n", "2")
    text = _text(result)
    assert result.ret != 0
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    assert len(text.splitlines()) < 60, text
    outcomes = result.parseoutcomes()
    assert 1 <= outcomes.get("failed", 0) + outcomes.get("errors", 0) <= 4, text
    assert any(line.startswith("pgshard: the server died mid-run") and "server.log" in line
               for line in text.splitlines()), text
    _run(pytester, "-n", "2").assert_outcomes(passed=200)  # the next run: green on the recovered server


HANGS = '''
import os, time

def main(url):
    with open(os.environ["HANG_PIDFILE"], "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(3600)  # a migration waiting on a lock that never comes
'''


def test_a_hung_migration_is_stopped_at_the_build_timeout_in_one_line(
        pytester: pytest.Pytester, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(seed=HANGS, test_it="def test_it(db_session):\n    pass\n")
    pytester.makeini("[pytest]\npgshard_migrate = python:seed:main\npgshard_build_timeout = 3\n")
    pidfile = pytester.path / "hang.pid"
    monkeypatch.setenv("HANG_PIDFILE", str(pidfile))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(pytester.path), os.environ.get("PYTHONPATH")])))
    result = _run(pytester, "-n", "2")
    text = _text(result)
    assert result.ret != 0
    assert "Traceback" not in text and len(text.splitlines()) < 40, text
    line = next(line for line in text.splitlines() if "did not finish within pgshard_build_timeout (3 s)" in line)
    assert "'python:seed:main'" in line and "PGSHARD_BUILD_TIMEOUT" in line, line
    from pgshard.host import pid_alive

    assert not pid_alive(int(pidfile.read_text()))  # the step's process was stopped with the build


def test_a_running_step_says_so_every_interval_and_is_killed_with_its_children_at_the_timeout(
        tmp_path: Path) -> None:
    """run_watched (pure process logic): the progress lines and the kill of the whole process group."""
    from pgshard.host import pid_alive
    from pgshard.migrate import MigrationError, Watch, run_watched, watching

    said: list[str] = []
    script = f"sleep 3600 & echo $! > {tmp_path}/child; wait"
    # ticks every 0.25 s for 5 s: at least two of them before the deadline even on a machine that stalls us
    with watching(Watch(timeout=5, progress=said.append, every=0.25)), \
            pytest.raises(MigrationError, match=r"step 'command:seed' failed: did not finish within "
                                                r"pgshard_build_timeout \(5 s\)"):
        run_watched(["sh", "-c", script], lambda: "command:seed")
    assert len(said) >= 2 and all("step 'command:seed' running for" in line for line in said), said
    assert "(pgshard_build_timeout 5 s)" in said[0]
    child = int((tmp_path / "child").read_text())
    from pgshard.leases import wait_for

    wait_for(lambda: not pid_alive(child), 30, "the step's own child was killed")


TERMINATES_EVERY_OTHER_BACKEND = '''
import pytest
from sqlalchemy import text

@pytest.mark.db_commit
@pytest.mark.parametrize("i", range(30))
def test_commit(i, commit_db):
    with commit_db.engine.begin() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
        if i % 10 == 5:  # every worker's admin and pool connections (the tests' own run on their clones)
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = 'postgres' AND backend_type = 'client backend'"))
'''


def test_the_db_commit_pool_recovers_after_a_test_terminates_every_other_backend(
        pytester: pytest.Pytester, cache: Path) -> None:
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_it=TERMINATES_EVERY_OTHER_BACKEND)
    result = _run(pytester, "-n", "2")
    result.assert_outcomes(passed=30)  # every later test got its fresh clone: the pool made them anew
    assert "db_commit clones: 30" in _text(result)


def test_a_fixed_migration_removes_the_failure_file_of_the_broken_one(project: Project, cache: Path) -> None:
    """The .failed file tells a run's other workers not to build a broken template again; a later run that
    builds the fixed chain (a new fingerprint) removes it."""
    project.write_migration("0002", "0001", 'raise RuntimeError("migration 0002 is broken")')
    project.pytester.makepyfile(test_it="def test_it(db_session):\n    pass\n")
    assert project.run("-n", "2").ret != 0
    failed = list(cache.rglob("*.failed"))
    assert len(failed) == 1, failed
    project.write_migration("0002", "0001", 'op.add_column("item", sa.Column("note", sa.Text))')
    project.run("-n", "2").assert_outcomes(passed=1)
    assert list(cache.rglob("*.failed")) == []


SLOW = '''
import time

def main(url):
    time.sleep(3)  # a build longer than the 2 s after which pgshard says it is building
'''


def test_a_slow_build_says_so_early_and_when_it_ends(
        pytester: pytest.Pytester, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(seed=SLOW, test_it="def test_it(db_session):\n    pass\n")
    pytester.makeini("[pytest]\npgshard_migrate = python:seed:main\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(pytester.path), os.environ.get("PYTHONPATH")])))
    result = _run(pytester)
    result.assert_outcomes(passed=1)
    lines = _text(result).splitlines()
    running = [line for line in lines if "pgshard: building the template: step 'python:seed:main' running for" in line]
    built = [line for line in lines if re.fullmatch(r"pgshard: template pgshard_tpl_\w+ built in [\d.]+ s", line)]
    assert running and len(built) == 1, "\n".join(lines)
    assert lines.index(running[0]) < lines.index(built[0])


def test_pytest_split_durations_do_not_charge_the_start_up_to_the_first_test(
        pytester: pytest.Pytester, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest-split beside pgshard: the first test's recorded duration is its own, not the 3 s build's (which
    the pgshard summary reports), so that test is not put in a group alone."""
    import json

    pytest.importorskip("pytest_split", reason="pytest-split is a dev dependency: pip install -e '.[dev]'")
    pytester.makepyfile(seed=SLOW, test_it="def test_a(db_session):\n    pass\n\ndef test_b(db_session):\n    pass\n")
    pytester.makeini("[pytest]\npgshard_migrate = python:seed:main\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(pytester.path), os.environ.get("PYTHONPATH")])))
    durations = pytester.path / ".test_durations"
    result = _run(pytester, "--store-durations", "--durations-path", str(durations))
    result.assert_outcomes(passed=2)
    build = re.search(r"built in ([\d.]+) s \(cache miss\)", result.stdout.str())
    assert build is not None and float(build.group(1)) >= 3, result.stdout.str()
    stored = json.loads(durations.read_text())
    seconds = dict(stored) if isinstance(stored, list) else stored
    assert set(seconds) == {"test_it.py::test_a", "test_it.py::test_b"}, seconds
    assert seconds["test_it.py::test_a"] < float(build.group(1)) / 2, seconds  # the build is not in it
    # pgshard's --shard reads that same file (its default, .test_durations in the rootdir): one file for both
    shards = [_run(pytester, "--shard", f"{k}/2") for k in (1, 2)]
    for sharded in shards:
        sharded.assert_outcomes(passed=1)
        assert "durations file" not in _text(sharded), _text(sharded)
