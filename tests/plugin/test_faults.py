"""Issue 10 items 3, 4, 11, 13: faults that are not pgshard's own are one line for the whole run, not one
traceback per test; a --pg-rebuild never breaks a concurrent run; bad pgshard_migrate lines stop the run
before it starts; the db_commit summary line is there in every run that had db_commit tests.

Real processes throughout: a role without CREATEDB on a real server, a postmaster killed mid-run, whole
inner pytest sessions with ``-n 2``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from pgshard.server.base import ServerInfo, to_libpq
from tests.conftest import Project, databases

MANY_TESTS = '''
import pytest
from sqlalchemy import text

@pytest.mark.parametrize("i", range({count}))
def test_item(i, db_session):
    assert db_session.execute(text("SELECT 1")).scalar() == 1
'''

KILLS_THE_SERVER = '''
import glob, os, signal, pytest
from sqlalchemy import text

HERE = os.path.dirname(__file__)

@pytest.mark.parametrize("i", range(120))
def test_item(i, db_session):
    assert db_session.execute(text("SELECT 1")).scalar() == 1
    with open(os.path.join(HERE, "ran.txt"), "a") as fh:
        fh.write("x\\n")
    if len(open(os.path.join(HERE, "ran.txt")).read().split()) >= 10:  # whichever worker gets there first
        try:
            open(os.path.join(HERE, "killed"), "x").close()
        except FileExistsError:
            return
        # an immediate shutdown of the postmaster, as an OOM kill or a crash would leave it
        pidfile = glob.glob(os.environ["PGSHARD_CACHE_DIR"] + "/pg*/data/postmaster.pid")[0]
        os.kill(int(open(pidfile).readline()), signal.SIGQUIT)
'''


def _text(result: pytest.RunResult) -> str:
    return result.stdout.str() + result.stderr.str()


def _one_line_for_the_run(result: pytest.RunResult, needle: str, *, workers: int = 2) -> str:
    """The cause is said in one line per worker at most (each worker meets it once), with no traceback,
    and the session stopped instead of failing every remaining test."""
    text = _text(result)
    assert result.ret != 0
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    errors = result.parseoutcomes()
    failures = errors.get("errors", errors.get("error", 0)) + errors.get("failed", 0)
    assert 1 <= failures <= 2 * workers, text  # at most a setup and a teardown report per worker
    assert any(needle in line for line in text.splitlines()), text
    assert len(text.splitlines()) < 80, text
    return text


@pytest.fixture
def prefix() -> str:
    return "pgf" + uuid.uuid4().hex[:8]


def test_a_role_without_createdb_is_one_line_for_the_whole_run(project: Project, second_server: ServerInfo,
                                                               prefix: str) -> None:
    role, password = f"nocreate_{uuid.uuid4().hex[:8]}", f"Pw-{uuid.uuid4().hex}"
    with psycopg.connect(to_libpq(second_server.url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOCREATEDB PASSWORD {}").format(sql.Identifier(role),
                                                                                 sql.Literal(password)))
        try:
            url = make_url(second_server.url).set(username=role, password=password)
            project.pytester.makepyfile(test_many=MANY_TESTS.format(count=200))
            result = project.run("-n", "2", "--pg-url", url.render_as_string(hide_password=False),
                                 "-o", f"pgshard_prefix={prefix}")
            text = _one_line_for_the_run(result, "the role needs CREATEDB")
            assert f"ALTER ROLE {role} CREATEDB" in text and password not in text
            assert databases(conn, prefix + "%") == []

            conn.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(role)))  # as the line says
            again = project.run("-n", "2", "--pg-url", url.render_as_string(hide_password=False),
                                "-o", f"pgshard_prefix={prefix}")
            again.assert_outcomes(passed=200)
        finally:
            for name in databases(conn, prefix + "%"):  # the template the second run built, owned by the role
                conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _postmasters_of(cache: Path) -> list[int]:
    """Live processes whose command line names the cache dir (the postmaster runs with -D <cache>/...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if str(cache) in cmdline and "postgres" in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


@pytest.fixture
def own_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An embedded server of the inner runs' own (the shared one must not die): a cache dir on /dev/shm,
    which the server account can traverse."""
    cache = Path("/dev/shm") / f"pgshard-faults-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache))
    monkeypatch.setenv("PGSHARD_LINGER", "0")  # stopped when the run ends: we check no postmaster is left
    yield cache
    for pidfile in glob.glob(f"{cache}/pg*/data/postmaster.pid"):  # a failed test must not leave it running
        subprocess.run([sys.executable, "-m", "pgshard.cli", "server", "stop", "--cache-dir", str(cache)],
                       capture_output=True, check=False, timeout=120)
        del pidfile
    shutil.rmtree(cache, ignore_errors=True)


def test_a_server_that_dies_mid_run_is_one_line_naming_its_log_and_the_next_run_is_green(
        project: Project, own_cache: Path) -> None:
    project.pytester.makepyfile(test_kill=KILLS_THE_SERVER)
    result = project.run("-n", "2")
    text = _one_line_for_the_run(result, "the server died mid-run")
    log = re.search(r"see its log at (\S+)", text)
    assert log is not None and log.group(1).startswith(str(own_cache)) and Path(log.group(1)).is_file(), text
    assert result.parseoutcomes().get("passed", 0) < 60  # stopped after the kill, not 110 tracebacks
    assert _postmasters_of(own_cache) == []

    (project.root / "test_kill.py").unlink()
    project.pytester.makepyfile(test_many=MANY_TESTS.format(count=4))
    again = project.run("-n", "2")
    again.assert_outcomes(passed=4)
    assert _postmasters_of(own_cache) == []


def test_a_lock_path_that_is_not_a_directory_is_one_line(project: Project, second_server: ServerInfo,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "locks").write_text("not a directory")
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache))
    project.pytester.makepyfile(test_many=MANY_TESTS.format(count=50))
    result = project.run("-n", "2", "--pg-url", second_server.url)
    text = _one_line_for_the_run(result, "pgshard_cache_dir")
    assert f"{cache / 'locks'}: File exists" in text


@pytest.mark.parametrize(("line", "needle"), [
    ("flyway:db/", "must be one of"),
    ("alembic:no-such/alembic.ini", "does not exist"),
    ("sql:no-such-dir/", "does not exist"),
])
def test_a_bad_migrate_line_is_a_usage_error_before_any_test(pytester: pytest.Pytester, line: str,
                                                             needle: str) -> None:
    pytester.makeini(f"[pytest]\npgshard_migrate = {line}\n")
    pytester.makepyfile(test_many=MANY_TESTS.format(count=30))
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = _text(result)
    assert "Traceback" not in text and "test_item" not in text
    assert [line for line in text.splitlines() if needle in line and "pgshard_migrate line" in line]
    assert len(text.splitlines()) < 5, text


COMMITTING_TESTS = '''
import os, pytest
from sqlalchemy import text

@pytest.mark.db_commit
@pytest.mark.parametrize("i", range(40))
def test_commit(i, commit_db):
    with commit_db.engine.begin() as conn:
        conn.execute(text("INSERT INTO item (worker) VALUES ('x')"))
        assert conn.execute(text("SELECT count(*) FROM item")).scalar() == 1
'''


def test_a_rebuild_in_one_run_never_breaks_a_concurrent_run(project: Project, prefix: str,
                                                            admin_conn: psycopg.Connection) -> None:
    project.pytester.makepyfile(test_commit=COMMITTING_TESTS)
    first = project.run("-o", f"pgshard_prefix={prefix}")  # the template exists before both runs
    first.assert_outcomes(passed=40)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project.root), *sys.path])}
    args = [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-q",
            "-o", f"pgshard_prefix={prefix}"]
    live = subprocess.Popen([*args, "-n", "2"], cwd=project.root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    rebuilds = []
    while live.poll() is None and len(rebuilds) < 6:  # rebuild again and again while the live run clones
        rebuild = subprocess.run([*args, "--pg-rebuild", "-k", "test_commit and 0"], cwd=project.root, env=env,
                                 capture_output=True, text=True, timeout=300)
        rebuilds.append(rebuild.returncode)
    out, _ = live.communicate(timeout=600)
    assert live.returncode == 0, out
    assert "40 passed" in out and "does not exist" not in out
    assert rebuilds and set(rebuilds) == {0}
    left = databases(admin_conn, prefix + "%")  # the inner runs used this session's embedded server
    assert [name for name in left if "_tpl_" not in name] == []
    for name in left:
        admin_conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name)))
        admin_conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))


def test_the_db_commit_summary_line_is_in_every_run_that_had_db_commit_tests(project: Project,
                                                                             prefix: str) -> None:
    project.pytester.makepyfile(test_commit=COMMITTING_TESTS.replace("range(40)", "range(3)"),
                                test_many=MANY_TESTS.format(count=6))
    for _ in range(4):
        result = project.run("-n", "2", "-o", f"pgshard_prefix={prefix}")
        result.assert_outcomes(passed=9)
        result.stdout.fnmatch_lines(["*; db_commit clones: 3, median wait * ms"])


FILLS_THE_DISK = '''
import pytest
from sqlalchemy import text

@pytest.mark.parametrize("i", range(60))
def test_item(i, db_session):
    if i == 5:  # unlogged: the heap grows until the disk is full, without a WAL segment that would PANIC
        db_session.execute(text("CREATE UNLOGGED TABLE filler (pad text)"))
        db_session.execute(text("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 400000)"))
    assert db_session.execute(text("SELECT 1")).scalar() == 1
'''


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a tmpfs of limited size needs root and unshare (a mount namespace of its own)")
def test_a_full_disk_is_one_line_naming_the_cache_dir_and_the_next_run_is_green(project: Project,
                                                                                tmp_path: Path) -> None:
    mount = Path("/dev/shm") / f"pgshard-full-{uuid.uuid4().hex[:8]}"  # the server account can traverse it
    mount.mkdir()
    project.pytester.makepyfile(test_fill=FILLS_THE_DISK, test_after=MANY_TESTS.format(count=4))
    script = tmp_path / "run.sh"
    script.write_text(f"""
        mount -t tmpfs -o size=150m,mode=1777 tmpfs {mount} || exit 97
        export PGSHARD_CACHE_DIR={mount}/cache PGSHARD_LINGER=0
        cd {project.root}
        {sys.executable} -m pytest -p no:randomly -p no:cacheprovider -n 2 test_fill.py > {tmp_path}/full.txt 2>&1
        echo $? > {tmp_path}/full.rc
        {sys.executable} -m pytest -p no:randomly -p no:cacheprovider -n 2 test_after.py > {tmp_path}/after.txt 2>&1
        echo $? > {tmp_path}/after.rc
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project.root), *sys.path])}
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", str(script)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        full, after = (tmp_path / "full.txt").read_text(), (tmp_path / "after.txt").read_text()
        assert (tmp_path / "full.rc").read_text().strip() != "0"
        assert "Traceback" not in full and "INTERNALERROR" not in full, full
        assert any("the server's disk is full" in line and f"free space in the cache dir {mount}/cache" in line
                   and "pgshard_cache_dir" in line for line in full.splitlines()), full
        assert len(full.splitlines()) < 80, full
        assert (tmp_path / "after.rc").read_text().strip() == "0", after
        assert _postmasters_of(mount) == []
    finally:
        shutil.rmtree(mount, ignore_errors=True)


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["-o", "pgshard_rebuild=maybe"], {}, "pgshard_rebuild must be true or false"),
    ([], {"PGSHARD_REBUILD": "perhaps"}, "PGSHARD_REBUILD must be true or false"),
    (["-o", "pgshard_keep_templates=-1"], {}, "pgshard_keep_templates must not be negative"),
    (["-o", "pgshard_commit_pool=lots"], {}, "pgshard_commit_pool must be a whole number"),
    (["-o", "pgshard_async_driver=aiopg"], {}, "pgshard_async_driver must be psycopg or asyncpg"),
    (["-o", "pgshard_env=NO_EQUALS_SIGN"], {}, "pgshard_env lines look like NAME=template"),
    (["-o", "pgshard_server=podman"], {}, "--pg-server (PGSHARD_SERVER) must be one of"),
    (["--pg-server", "url"], {}, "--pg-server url needs --pg-url"),
    (["-o", "pgshard_prefix=" + "p" * 21], {}, "pgshard_prefix must be lowercase"),
])
def test_each_bad_option_value_is_one_line_naming_it_before_any_test(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str],
        needle: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(test_many=MANY_TESTS.format(count=30))
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = _text(result)
    assert "Traceback" not in text and "test_item" not in text, text
    assert [line for line in text.splitlines() if needle in line and line.startswith("ERROR: pgshard:")], text


def test_a_server_lock_path_that_is_a_directory_is_one_usage_line(project: Project, own_cache: Path) -> None:
    from pgshard.server.embedded import EmbeddedServer

    lock = Path(EmbeddedServer(cache_dir=own_cache).cluster.lock.path)
    lock.mkdir(parents=True)
    project.pytester.makepyfile(test_many=MANY_TESTS.format(count=20))
    result = project.run("-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = _text(result)
    assert "Traceback" not in text and "test_item" not in text, text
    assert [line for line in text.splitlines()
            if "Is a directory" in line and str(lock) in line and "pgshard_cache_dir" in line], text
