"""Issue 10 items 3, 4, 7, 11, 12 as plain objects against the real server: what a prefix claims, which templates
a project may evict, a rebuild under concurrent cloning, and pgshard_migrate lines checked before any run."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgshard.admin import Admin, Marker, NotOurs
from pgshard.cli import main
from pgshard.clones import Clones, drop_stale
from pgshard.faults import classify
from pgshard.server.base import ServerError, ServerInfo
from pgshard.settings import SettingsError
from pgshard.steps import parse_migrators
from pgshard.template import Template, project_key
from tests.test_cli import dead_pid


@pytest.fixture
def prefix() -> str:
    return "pgn" + uuid.uuid4().hex[:8]


@pytest.fixture
def cleanup(pg_server: ServerInfo, prefix: str) -> Iterator[Admin]:
    """An admin connection of ours; afterwards every database whose name starts with the test's prefix
    (whatever follows it) is dropped, including the neighbours the test planted."""
    admin = Admin(pg_server.url, prefix)
    yield admin
    rows = admin.conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",)).fetchall()
    for (name,) in rows:
        admin.conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name)))
        admin.conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    admin.close()


def _neighbour(url: str, name: str, prefix: str, kind: str) -> None:
    """A database of a neighbouring namespace carrying a (copied) pgshard marker of a dead run."""
    with Admin(url, prefix) as other:
        other.create(name, Marker(kind, "r9", pid=dead_pid(), fingerprint="f" * 16), template="template0")
        if kind == "template":
            other.seal(name)


def test_a_prefix_claims_only_prefix_underscore_names(pg_server: ServerInfo, cleanup: Admin, prefix: str,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    other_project = f"{prefix}x_tpl_{'f' * 16}"
    lookalike = f"{prefix}ed_prod"
    _neighbour(pg_server.url, other_project, prefix + "x", "template")
    _neighbour(pg_server.url, lookalike, prefix + "ed", "clone")
    ours = f"{prefix}_r1_gw0"
    cleanup.create(ours, Marker("clone", "r1", pid=dead_pid()), template="template0")

    assert [db.name for db in cleanup.databases()] == [ours]
    with pytest.raises(NotOurs):
        cleanup.drop(lookalike)
    with pytest.raises(ValueError, match="prefix"):
        cleanup.create(f"{prefix}ed_new", Marker("clone"))
    assert drop_stale(cleanup, ttl_hours=0).dropped == [ours]

    monkeypatch.chdir(tmp_path)
    assert main(["clean", "--all", "--pg-url", pg_server.url, "--prefix", prefix]) == 0
    assert main(["status", "--pg-url", pg_server.url, "--prefix", prefix]) == 0
    out = capsys.readouterr().out
    assert other_project not in out and lookalike not in out
    assert cleanup.exists(other_project) and cleanup.exists(lookalike)


@pytest.mark.parametrize(("line", "needle"), [
    ("flyway:db/", "must be one of"),
    ("alembic:missing/alembic.ini", "does not exist"),
    ("sql:no-such-dir/", "does not exist"),
])
def test_bad_migrate_lines_are_found_without_running_anything(tmp_path: Path, line: str, needle: str) -> None:
    with pytest.raises(SettingsError, match=needle) as info:
        parse_migrators([line], tmp_path)
    assert "pgshard_migrate line" in str(info.value)


def _sql_migrators(root: Path, body: str) -> list:  # type: ignore[type-arg]
    (root / "sql").mkdir(parents=True, exist_ok=True)
    (root / "sql" / "001.sql").write_text(body)
    return parse_migrators(["sql:sql/"], root)


def test_templates_of_one_project_do_not_evict_another_projects(pg_server: ServerInfo, cleanup: Admin,
                                                                tmp_path: Path) -> None:
    def build(project: Path, version: int, run: str) -> str:
        template = Template(cleanup, pg_server, _sql_migrators(project, f"CREATE TABLE a (v{version} int);"),
                            lock_dir=tmp_path / "locks", run_id=run, keep=0, project=project_key(project))
        return template.ensure().name

    first, second = tmp_path / "first", tmp_path / "second"
    assert project_key(first) != project_key(second)
    theirs = build(first, 0, "a")
    older = build(second, 1, "b")
    mine = build(second, 2, "c")  # keep=0: the second project's own older template goes, the first's stays
    assert {db.name for db in cleanup.databases()} == {theirs, mine}
    assert older != mine
    info = cleanup.info(theirs)
    assert info is not None and info.marker is not None and info.marker.project == project_key(first)


def test_a_rebuild_never_pulls_the_template_from_under_concurrent_clones(pg_server: ServerInfo, cleanup: Admin,
                                                                         tmp_path: Path) -> None:
    migrators = _sql_migrators(tmp_path, "CREATE TABLE a (id int); INSERT INTO a SELECT generate_series(1, 500);")
    name = Template(cleanup, pg_server, migrators, lock_dir=tmp_path / "locks", run_id="first").ensure().name
    clones = Clones(pg_server.url, pg_server, name, prefix=cleanup.prefix, run_id="live", worker_id="gw0")
    errors: list[BaseException] = []
    made = 0
    stop = threading.Event()

    def keep_cloning() -> None:  # a live run's db_commit pool: clones of the template, all the time
        nonlocal made
        admin = Admin(pg_server.url, cleanup.prefix)
        try:
            while not stop.is_set():
                clone = clones._next_name()
                clones._clone(admin, clone)
                admin.drop(clone, force=True)
                made += 1
        except Exception as exc:  # any failure is the finding
            errors.append(exc)
        finally:
            admin.close()

    cloner = threading.Thread(target=keep_cloning)
    cloner.start()
    try:
        with Admin(pg_server.url, cleanup.prefix) as admin:
            for run in range(8):  # eight --pg-rebuild runs, each dropping and renaming the template
                rebuilt = Template(admin, pg_server, migrators, lock_dir=tmp_path / "locks", run_id=f"re{run}",
                                   rebuild=True).ensure()
                assert rebuilt.built and rebuilt.name == name
                time.sleep(0.02)
    finally:
        stop.set()
        cloner.join(timeout=120)
    clones.close()
    assert errors == [] and made > 0


def test_a_template_lock_path_that_is_a_directory_is_one_line(pg_server: ServerInfo, cleanup: Admin,
                                                              tmp_path: Path) -> None:
    template = Template(cleanup, pg_server, _sql_migrators(tmp_path, "CREATE TABLE a (v int);"),
                        lock_dir=tmp_path / "locks", run_id="r")
    template._lock_path().mkdir()  # where the lock file belongs
    with pytest.raises(ServerError) as info:
        template.ensure()
    message = str(info.value)
    assert str(template._lock_path()) in message and "Is a directory" in message
    assert "pgshard_cache_dir" in message and "\n" not in message
    assert cleanup.databases() == []


@pytest.mark.parametrize(("error", "kind"), [
    (psycopg.errors.InsufficientPrivilege("permission denied to create database"), "privilege"),
    (psycopg.errors.DiskFull('could not extend file "base/1/2": No space left on device'), "disk"),
    (psycopg.OperationalError('connection failed: FATAL:  sorry, too many clients already'), "connections"),
    (psycopg.OperationalError("connection failed: Connection refused\n\tIs the server running on that host?"),
     "died"),
    (ConnectionRefusedError(111, "Connection refused"), "died"),  # asyncpg's connect raises the builtin
    # the moments of a crash recovery, as libpq reports them at connect time (no SQLSTATE)
    (psycopg.OperationalError("connection failed: FATAL:  the database system is not yet accepting connections\n"
                              "DETAIL:  Consistent recovery state has not been yet reached."), "died"),
    (psycopg.OperationalError("connection failed: FATAL:  the database system is starting up"), "died"),
    (psycopg.errors.DataCorrupted('invalid page in block 0 of relation base/16396/16386'), "corrupt"),
    (ConnectionError("redis: Connection refused"), None),  # another service's words are not the database's
    (ValueError("permission denied to create database"), None),
])
def test_foreign_faults_are_recognised_by_sqlstate_or_the_servers_words(error: BaseException,
                                                                        kind: str | None) -> None:
    from sqlalchemy.exc import OperationalError

    fault = classify(error)
    assert (fault.kind if fault else None) == kind
    wrapped = OperationalError("SELECT 1", {}, error)  # as SQLAlchemy raises it, "(psycopg...) " in front
    found = classify(wrapped)
    assert (found.kind if found else None) == kind
    if found is not None:
        assert not found.detail.startswith("(")


def test_a_template_dropped_before_this_run_clones_it_is_one_line(pg_server: ServerInfo, cleanup: Admin) -> None:
    gone = f"{cleanup.prefix}_tpl_{'0' * 16}"
    clones = Clones(pg_server.url, pg_server, gone, prefix=cleanup.prefix, run_id="r", worker_id="gw0")
    with pytest.raises(ServerError, match=f"cannot clone {gone}: it no longer exists") as info:
        clones.worker_database()
    assert "\n" not in str(info.value) and "run again" in str(info.value)
    clones.close()
    assert cleanup.databases() == []
