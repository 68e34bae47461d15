"""Issue 2, must show: migrations run once per fingerprint; a database per worker; nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from pgshard.server.base import ServerInfo, to_libpq
from tests.conftest import Project, databases, remove_cache

TWENTY_TESTS = '''
import json, os, pytest
from sqlalchemy import text

@pytest.mark.parametrize("i", range(20))
def test_record(i, pg_database, pg_engine, tmp_path_factory):
    with pg_engine.begin() as conn:
        db = conn.execute(text("SELECT current_database()")).scalar()
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        conn.execute(text("INSERT INTO item (worker) VALUES (:w)"), {"w": worker})
        seen = set(conn.execute(text("SELECT DISTINCT worker FROM item")).scalars())
    assert db == pg_database.name
    assert seen == {os.environ.get("PYTEST_XDIST_WORKER", "main")}, f"{db} sees rows of {seen}"
    out = os.environ["PGSHARD_TEST_OUT"]
    with open(out, "a") as fh:
        fh.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "db": db}) + "\\n")
'''


def _records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def out_file(project: Project, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = project.root / "records.jsonl"
    monkeypatch.setenv("PGSHARD_TEST_OUT", str(path))
    project.pytester.makepyfile(test_records=TWENTY_TESTS)
    return path


def test_migrations_run_once_then_zero_then_again_after_a_change(project: Project, out_file: Path) -> None:
    first = project.run("-n", "2")
    first.assert_outcomes(passed=20)
    assert project.migrations_ran() == 2  # 0001 and 0002, once: one worker built, the other waited
    first.stdout.fnmatch_lines(["*template pgshard_tpl_*: built in * s (cache miss)*"])

    second = project.run("-n", "2")
    second.assert_outcomes(passed=20)
    assert project.migrations_ran() == 2  # unchanged schema: not migrated again
    second.stdout.fnmatch_lines(["*reused (cache hit)*"])

    project.write_migration("0002", "0001", 'op.add_column("item", sa.Column("note2", sa.Text))')
    third = project.run("-n", "2")
    third.assert_outcomes(passed=20)
    assert project.migrations_ran() == 4  # the changed chain is migrated once more


def test_each_worker_works_in_its_own_database(project: Project, out_file: Path) -> None:
    result = project.run("-n", "2")
    result.assert_outcomes(passed=20)
    records = _records(out_file)
    by_worker: dict[str, set[str]] = {}
    for record in records:
        by_worker.setdefault(record["worker"], set()).add(record["db"])
    assert set(by_worker) == {"gw0", "gw1"}
    assert all(len(names) == 1 for names in by_worker.values())
    assert by_worker["gw0"] != by_worker["gw1"]
    result.stdout.fnmatch_lines(["*clone per worker (*): gw0 * ms, gw1 * ms*"])


def test_clones_are_dropped_after_a_green_and_a_red_run(project: Project, out_file: Path,
                                                       admin_conn: psycopg.Connection) -> None:
    project.pytester.makepyfile(test_red="def test_red(pg_database):\n    assert False\n")
    result = project.run("-n", "2")
    result.assert_outcomes(passed=20, failed=1)
    used = {record["db"] for record in _records(out_file)}
    assert len(used) == 2
    assert not used & set(databases(admin_conn))


def test_pg_keep_keeps_clones_and_prints_masked_urls(project: Project, out_file: Path,
                                                    admin_conn: psycopg.Connection) -> None:
    result = project.run("--pg-keep")
    result.assert_outcomes(passed=20)
    (kept,) = {record["db"] for record in _records(out_file)}
    try:
        assert kept in databases(admin_conn)
        result.stdout.fnmatch_lines([f"*kept (--pg-keep*postgresql+psycopg://pgshard@*/{kept}?passfile=*"])
        # the command the line names is the one that drops them (issue 17 item 7)
        line = next(line for line in result.stdout.lines if line.startswith("kept (--pg-keep"))
        command = line.split("`")[1].split()
        assert command[:2] == ["pgshard", "clean"], line
        cleaned = subprocess.run([sys.executable, "-m", "pgshard.cli", *command[1:]], cwd=project.root,
                                 capture_output=True, text=True, timeout=120, check=False)
        assert cleaned.returncode == 0 and f"dropped {kept}" in cleaned.stdout, cleaned.stdout + cleaned.stderr
        assert kept not in databases(admin_conn)
        assert any(name.startswith("pgshard_tpl_") for name in databases(admin_conn))  # templates stay
    finally:
        if kept in databases(admin_conn):
            admin_conn.execute(f'ALTER DATABASE "{kept}" WITH IS_TEMPLATE false')
            admin_conn.execute(f'DROP DATABASE "{kept}"')


def _postmasters_for(datadir_prefix: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split(" ")[0].endswith("postgres") and datadir_prefix in line]


def test_server_started_for_the_run_is_stopped_after_it(project: Project, out_file: Path,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Path("/dev/shm") / f"pgshard-test-{uuid.uuid4().hex[:8]}" if Path("/dev/shm").is_dir() else tmp_path / "c"
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache))
    try:
        cold = project.run("-n", "2")
        cold.assert_outcomes(passed=20)
        assert not _postmasters_for(str(cache)), "a PostgreSQL of pgshard's is still running"
        assert not list(cache.glob("*/data/postmaster.pid"))
        warm = project.run("-n", "2")  # restarts the same data directory: no initdb, cached template
        warm.assert_outcomes(passed=20)
        warm.stdout.fnmatch_lines(["*reused (cache hit)*"])
        assert project.migrations_ran() == 2
        assert not _postmasters_for(str(cache))
    finally:
        remove_cache(cache)


def test_external_server_by_url_never_touches_the_named_database(
        project: Project, out_file: Path, second_server: ServerInfo) -> None:
    with psycopg.connect(to_libpq(second_server.url), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS users_own_db")
        conn.execute("CREATE DATABASE users_own_db")
    user_url = make_url(second_server.url).set(database="users_own_db").render_as_string(hide_password=False)
    with psycopg.connect(to_libpq(user_url), autocommit=True) as conn:
        conn.execute("CREATE TABLE precious (v int); INSERT INTO precious VALUES (42)")
    result = project.run("-n", "2", "--pg-url", user_url)
    result.assert_outcomes(passed=20)
    result.stdout.fnmatch_lines(["*server: url (--pg-url)*"])
    assert "users_own_db" not in {record["db"] for record in _records(out_file)}
    with psycopg.connect(to_libpq(user_url), autocommit=True) as conn:
        assert conn.execute("SELECT v FROM precious").fetchall() == [(42,)]
    with psycopg.connect(to_libpq(second_server.url), autocommit=True) as conn:
        names = databases(conn)
        assert all(name.startswith("pgshard_tpl_") for name in names), names
        conn.execute("DROP DATABASE users_own_db")


def test_runs_as_root_with_the_server_as_an_unprivileged_user(pg_server: ServerInfo) -> None:
    if os.geteuid() != 0:
        pytest.fail("CI runs as root: this test must too")
    with psycopg.connect(to_libpq(pg_server.url)) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert pid is not None
        owner = subprocess.run(["ps", "-o", "user=", "-p", str(pid[0])], capture_output=True, text=True).stdout.strip()
    assert owner in ("postgres", "nobody")
