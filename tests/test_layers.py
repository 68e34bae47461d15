"""The layers as plain objects (no pytest plugin machinery), against the real server: admin, migrate,
template, clones, sandbox, settings."""

from __future__ import annotations

import os
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from pgshard.admin import Admin, Marker, NotOurs
from pgshard.clones import Clones, clone_method, drop_stale, stale_databases
from pgshard.host import host_identity, process_identity
from pgshard.migrate import MigrationError
from pgshard.queries import QueryCounter
from pgshard.sandbox import rebind, sandbox
from pgshard.server.base import ServerInfo, to_libpq
from pgshard.settings import SettingsError, database_url, env_assignments, placeholders, resolve
from pgshard.steps import parse_migrators
from pgshard.template import Template


@pytest.fixture
def prefix() -> str:
    return "pgt" + uuid.uuid4().hex[:8]  # every test its own namespace on the shared server


@pytest.fixture
def admin(pg_server: ServerInfo, prefix: str) -> Iterator[Admin]:
    with Admin(pg_server.url, prefix) as admin:
        yield admin
        for db in admin.databases():
            if db.marker is not None:
                admin.drop(db.name, force=True)


def test_admin_refuses_databases_without_our_marker(admin: Admin, admin_conn: psycopg.Connection,
                                                    prefix: str) -> None:
    foreign = f"{prefix}_users_own"
    admin_conn.execute(f'CREATE DATABASE "{foreign}"')
    try:
        with pytest.raises(NotOurs, match="not created by pgshard"):
            admin.drop(foreign)
        with pytest.raises(NotOurs):
            admin.seal(foreign)
        with pytest.raises(NotOurs):
            admin.rename(foreign, f"{prefix}_other")
        assert admin.exists(foreign)
    finally:
        admin_conn.execute(f'DROP DATABASE "{foreign}"')
    with pytest.raises(ValueError, match="must start with the prefix"):
        admin.create("postgres2", Marker("clone"))


def test_admin_marks_and_drops_its_own(admin: Admin, prefix: str) -> None:
    name = f"{prefix}_mine"
    admin.create(name, Marker("clone", "run1"))
    (found,) = admin.databases()
    assert found.name == name and found.marker is not None
    assert (found.marker.kind, found.marker.run, found.marker.pid) == ("clone", "run1", os.getpid())
    assert admin.drop(name) is True
    assert admin.drop(name) is False


def _migrations(tmp_path: Path, body: str = "CREATE TABLE a (id int primary key);") -> list[str]:
    sql_dir = tmp_path / "sql"
    sql_dir.mkdir(exist_ok=True)
    (sql_dir / "001_schema.sql").write_text(body)
    (sql_dir / "002_seed.sql").write_text("INSERT INTO a VALUES (1), (2);")
    (tmp_path / "seed_mod.py").write_text(textwrap.dedent('''
        import psycopg
        def main(url):
            with psycopg.connect(url.replace("+psycopg", "")) as conn:
                conn.execute("INSERT INTO a VALUES (3)")
    '''))
    (tmp_path / "seed.py").write_text(textwrap.dedent('''
        import os, psycopg
        with psycopg.connect(os.environ["SEED_URL"]) as conn:
            conn.execute("INSERT INTO a VALUES (4)")
    '''))
    return ["sql:sql/", "python:seed_mod:main", "command:python seed.py"]


def test_sql_python_and_command_migrators_build_a_sealed_template(
        admin: Admin, pg_server: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    migrators = parse_migrators(_migrations(tmp_path), tmp_path)
    template = Template(admin, pg_server, migrators, lock_dir=tmp_path / "locks", run_id="r1",
                        env_lines=["SEED_URL={libpq_url}"])
    result = template.ensure()
    assert result.built and result.name == f"{admin.prefix}_tpl_{template.fingerprint()}"
    info = admin.info(result.name)
    assert info is not None and info.is_template and not info.allow_connections
    assert not admin.exists(f"{result.name}_build")
    again = Template(admin, pg_server, parse_migrators(_migrations(tmp_path), tmp_path),
                     lock_dir=tmp_path / "locks", run_id="r2", env_lines=["SEED_URL={libpq_url}"]).ensure()
    assert not again.built and again.name == result.name

    clones = Clones(pg_server.url, pg_server, result.name, prefix=admin.prefix, run_id="r2", worker_id="gw0")
    database = clones.worker_database()
    engine = create_engine(database.url, poolclass=NullPool)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT array_agg(id ORDER BY id) FROM a")).scalar() == [1, 2, 3, 4]
    engine.dispose()
    assert clones.close() == [] and not admin.exists(database.name)


def test_fingerprint_follows_the_sources(admin: Admin, pg_server: ServerInfo, tmp_path: Path) -> None:
    def fingerprint(body: str) -> str:
        _migrations(tmp_path, body)
        return Template(admin, pg_server, parse_migrators(["sql:sql/"], tmp_path), lock_dir=tmp_path,
                        run_id="r").fingerprint()

    first = fingerprint("CREATE TABLE a (id int primary key);")
    assert fingerprint("CREATE TABLE a (id int primary key);") == first
    assert fingerprint("CREATE TABLE a (id bigint primary key);") != first


def test_failing_step_is_named_and_nothing_usable_remains(admin: Admin, pg_server: ServerInfo,
                                                         tmp_path: Path) -> None:
    _migrations(tmp_path, "CREATE TABLE a (id int primary key); SELECT no_such_function();")
    template = Template(admin, pg_server, parse_migrators(["sql:sql/"], tmp_path), lock_dir=tmp_path, run_id="r")
    with pytest.raises(MigrationError, match=r"pgshard_migrate step 'sql:sql/' failed: 001_schema.sql"):
        template.ensure()
    assert admin.databases() == []


def test_metadata_migrator_and_rebuild_once_per_run(admin: Admin, pg_server: ServerInfo, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "meta_models.py").write_text(textwrap.dedent('''
        from sqlalchemy import Column, Integer, MetaData, Table
        metadata = MetaData()
        Table("m", metadata, Column("id", Integer, primary_key=True))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    migrators = parse_migrators(["metadata:meta_models:metadata"], tmp_path)
    first = Template(admin, pg_server, migrators, lock_dir=tmp_path, run_id="a").ensure()
    rebuilt = Template(admin, pg_server, migrators, lock_dir=tmp_path, run_id="b", rebuild=True).ensure()
    reused_in_same_run = Template(admin, pg_server, migrators, lock_dir=tmp_path, run_id="b", rebuild=True).ensure()
    assert first.built and rebuilt.built and not reused_in_same_run.built
    assert first.name == rebuilt.name


def test_old_templates_are_collected_beyond_keep(admin: Admin, pg_server: ServerInfo, tmp_path: Path) -> None:
    names = []
    for version in range(4):
        _migrations(tmp_path, f"CREATE TABLE a (id int primary key, v{version} int);")
        names.append(Template(admin, pg_server, parse_migrators(["sql:sql/"], tmp_path), lock_dir=tmp_path,
                              run_id="r", keep=1).ensure().name)
    remaining = {db.name for db in admin.databases()}
    assert remaining == {names[-1], names[-2]}  # the current one and the newest older one


def test_stale_clones_of_dead_runs_are_dropped_live_and_kept_ones_stay(admin: Admin, prefix: str) -> None:
    dead = Marker("clone", "dead", pid=2**22 + 12345)
    admin.create(f"{prefix}_dead_gw0", dead)
    admin.create(f"{prefix}_live_gw0", Marker("clone", "live"))
    admin.create(f"{prefix}_old_elsewhere", Marker("clone", "x", host="other-host", started=0.0))
    admin.create(f"{prefix}_new_elsewhere", Marker("clone", "y", host="other-host"))
    admin.create(f"{prefix}_kept", Marker("kept", "z", pid=2**22 + 12345))
    assert sorted(stale_databases(admin, ttl_hours=24)) == [f"{prefix}_dead_gw0", f"{prefix}_old_elsewhere"]
    assert sorted(drop_stale(admin, ttl_hours=24).dropped) == [f"{prefix}_dead_gw0", f"{prefix}_old_elsewhere"]
    assert {db.name for db in admin.databases()} == {f"{prefix}_live_gw0", f"{prefix}_new_elsewhere", f"{prefix}_kept"}


def test_another_hosts_old_database_with_a_live_session_is_kept_and_said(admin: Admin, prefix: str,
                                                                        pg_server: ServerInfo) -> None:
    """Issue 17 item 4: another host's clock may be days off, or its run may last over a day: past the TTL
    is no proof of death there, a live session is proof of life, and the DROP (no FORCE) ends no session."""
    name = f"{prefix}_old_elsewhere_gw0"
    admin.create(name, Marker("clone", "x", host="other-host", started=0.0))
    with psycopg.connect(to_libpq(database_url(pg_server.url, name)), autocommit=True) as live:
        done = drop_stale(admin, ttl_hours=24)
        assert done.live == [name] and name not in done.dropped
        assert live.execute("SELECT current_database()").fetchone() == (name,)  # that run's session lives on
    assert drop_stale(admin, ttl_hours=24).dropped == [name]  # its session gone, it is stale like any other
    assert not admin.exists(name)


KILLED_BETWEEN_CREATE_AND_COMMENT = """
import os, signal, sys
from pathlib import Path
from pgshard.admin import Admin, Marker
admin = Admin(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
admin.mark = lambda name, marker: os.kill(os.getpid(), signal.SIGKILL)  # the kill lands right after CREATE
admin.create(sys.argv[2] + "_deadrun_gw0", Marker("clone", "deadrun"))
"""


def test_a_database_left_unmarked_by_a_kill_between_create_and_comment_is_dropped(
        prefix: str, pg_server: ServerInfo, admin_conn: psycopg.Connection, tmp_path: Path) -> None:
    """Issue 17 item 7: the note written before CREATE names the database and its creator; a dead creator's
    unmarked database is claimed and dropped. Unmarked ones with no note, or a live creator's, are not."""
    import signal
    import subprocess
    import sys

    intents = tmp_path / "creating"
    child = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_CREATE_AND_COMMENT, pg_server.url, prefix,
                            str(intents)], capture_output=True, timeout=120, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr
    left = f"{prefix}_deadrun_gw0"
    with Admin(pg_server.url, prefix, intents) as admin:
        info = admin.info(left)
        assert info is not None and info.marker is None  # what a kill leaves: ours, but no marker says so
        admin_conn.execute(f'CREATE DATABASE "{prefix}_someone_elses"')  # unmarked, never noted by pgshard
        (intents / f"{prefix}_being_made").write_text(f"{host_identity()} {process_identity()}\n")  # alive
        admin_conn.execute(f'CREATE DATABASE "{prefix}_being_made"')
        try:
            assert admin.abandoned() == [left]
            assert not admin.exists(left) and not (intents / left).exists()
            assert admin.exists(f"{prefix}_someone_elses") and admin.exists(f"{prefix}_being_made")
            assert admin.info(f"{prefix}_someone_elses").marker is None  # type: ignore[union-attr]
            assert drop_stale(admin, ttl_hours=24).dropped == []  # nothing else is claimed at a run's start
        finally:
            admin_conn.execute(f'DROP DATABASE "{prefix}_someone_elses"')
            admin_conn.execute(f'DROP DATABASE "{prefix}_being_made"')


def test_commit_pool_hands_out_fresh_distinct_clones(admin: Admin, pg_server: ServerInfo, tmp_path: Path) -> None:
    _migrations(tmp_path)
    template = Template(admin, pg_server, parse_migrators(["sql:sql/"], tmp_path), lock_dir=tmp_path,
                        run_id="r").ensure()
    clones = Clones(pg_server.url, pg_server, template.name, prefix=admin.prefix, run_id="r", worker_id="gw3",
                    pool_size=2)
    clones.start_pool()
    taken = [clones.take() for _ in range(4)]
    assert len({db.name for db in taken}) == 4
    for db in taken:
        with psycopg.connect(to_libpq(db.url), autocommit=True) as conn:
            conn.execute("INSERT INTO a VALUES (99)")
        clones.give_back(db)
    clones.close()
    assert [db.name for db in admin.databases() if "_gw3" in db.name] == []
    assert clone_method(pg_server).strategy == ("WAL_LOG" if pg_server.fsync else "FILE_COPY")


def test_sandbox_rolls_back_commits_and_rebinds_a_sessionmaker(pg_server: ServerInfo, admin: Admin,
                                                              prefix: str) -> None:
    from sqlalchemy.orm import sessionmaker

    name = f"{prefix}_sandbox"
    admin.create(name, Marker("clone"))
    engine = create_engine(database_url(pg_server.url, name))
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (v int)"))
    maker = sessionmaker(bind=engine)
    with sandbox(engine) as box, rebind(maker, bind=box.connection, join_transaction_mode="create_savepoint"):
        with maker() as app_session, QueryCounter() as counter:
            app_session.execute(text("INSERT INTO t VALUES (1)"))
            app_session.commit()
        assert counter.count == 1  # the SAVEPOINT/RELEASE bookkeeping is not counted
        assert box.connection.execute(text("SELECT count(*) FROM t")).scalar() == 1
    assert maker.kw["bind"] is engine and "join_transaction_mode" not in maker.kw
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 0
    engine.dispose()


def test_settings_precedence_cli_over_env_over_ini(tmp_path: Path) -> None:
    ini = {"pgshard_url": "postgresql://ini/db", "pgshard_migrate": ["sql:a/", "sql:b/"], "pgshard_keep": "true"}
    settings = resolve({"url": None}, {"PGSHARD_URL": "postgresql://env/db"}, ini.get, tmp_path)
    assert settings.url == "postgresql://env/db" and settings.server == "url"
    assert settings.migrate == ("sql:a/", "sql:b/") and settings.keep
    settings = resolve({"url": "postgresql://cli/db"}, {"PGSHARD_URL": "postgresql://env/db"}, ini.get, tmp_path)
    assert settings.url == "postgresql://cli/db"
    assert not resolve({}, {}, lambda key: None, tmp_path).configured
    with pytest.raises(SettingsError, match="PGSHARD_KEEP must be true or false"):
        resolve({}, {"PGSHARD_KEEP": "maybe"}, lambda key: None, tmp_path)
    with pytest.raises(SettingsError, match="--pg-server url needs --pg-url"):
        resolve({"server": "url"}, {}, lambda key: None, tmp_path)


def test_env_placeholders() -> None:
    values = placeholders("postgresql+psycopg://u:p%40ss@127.0.0.1:5433/pgshard_ab_gw0")
    assert values["dbname"] == "pgshard_ab_gw0" and values["port"] == "5433" and values["password"] == "p@ss"
    assert values["asyncpg_url"].startswith("postgresql+asyncpg://")
    assert env_assignments(["DB={dbname}", "URL={libpq_url}"], values) == {
        "DB": "pgshard_ab_gw0", "URL": "postgresql://u:p%40ss@127.0.0.1:5433/pgshard_ab_gw0"}
    with pytest.raises(SettingsError, match="unknown placeholder"):
        env_assignments(["X={nope}"], values)


def test_alembic_env_with_fileconfig_leaves_the_callers_logging_alone(
        admin: Admin, pg_server: ServerInfo, tmp_path: Path) -> None:
    import logging

    (tmp_path / "alembic" / "versions").mkdir(parents=True)
    (tmp_path / "alembic" / "env.py").write_text(textwrap.dedent('''
        from logging.config import fileConfig
        from alembic import context
        from sqlalchemy import create_engine, pool
        fileConfig(context.config.config_file_name)  # what alembic's stock template does
        engine = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
        with engine.connect() as connection:
            context.configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
        engine.dispose()
    '''))
    (tmp_path / "alembic.ini").write_text(textwrap.dedent('''
        [alembic]
        script_location = %(here)s/alembic
        [loggers]
        keys = root
        [handlers]
        keys = console
        [formatters]
        keys = generic
        [logger_root]
        level = WARNING
        handlers = console
        [handler_console]
        class = StreamHandler
        args = (sys.stderr,)
        formatter = generic
        [formatter_generic]
        format = %(message)s
    '''))
    mine = logging.getLogger("pgshard-test-app")
    root_handlers = list(logging.getLogger().handlers)
    Template(admin, pg_server, parse_migrators(["alembic:alembic.ini"], tmp_path), lock_dir=tmp_path,
             run_id="r").ensure()
    assert not mine.disabled
    assert logging.getLogger().handlers == root_handlers


# -- issue 8: template steps in a clean child process ---------------------------------------------------
def test_python_steps_run_in_a_child_and_a_cached_template_spawns_none(
        admin: Admin, pg_server: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "seed_leaky.py").write_text(textwrap.dedent('''
        import os, psycopg
        def main(url):
            os.environ["PGSHARD_TEST_LEAK"] = str(os.getpid())  # in-process, this would reach the tests
            with psycopg.connect(url.replace("+psycopg", "")) as conn:
                conn.execute("CREATE TABLE t (pid int)")
                conn.execute("INSERT INTO t VALUES (%s)", (os.getpid(),))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PGSHARD_TEST_LEAK", raising=False)

    def template(run_id: str) -> Template:
        return Template(admin, pg_server, parse_migrators(["python:seed_leaky:main"], tmp_path), lock_dir=tmp_path,
                        run_id=run_id)

    built = template("a").ensure()
    assert built.built and "PGSHARD_TEST_LEAK" not in os.environ
    clones = Clones(pg_server.url, pg_server, built.name, prefix=admin.prefix, run_id="a", worker_id="gw0")
    with psycopg.connect(to_libpq(clones.worker_database().url)) as conn:
        (pid,) = conn.execute("SELECT pid FROM t").fetchone() or (None,)
    clones.close()
    assert pid not in (None, os.getpid())

    def no_spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a warm run spawned {args}")

    monkeypatch.setattr(subprocess, "run", no_spawn)
    assert not template("b").ensure().built


def test_a_step_that_kills_the_build_process_is_named_with_its_last_words(
        admin: Admin, pg_server: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "schema.sql").write_text("CREATE TABLE a (id int);")
    (tmp_path / "dying.py").write_text(textwrap.dedent('''
        import os, sys
        def main(url):
            print("disk quota exceeded on /data", file=sys.stderr, flush=True)
            os._exit(7)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    template = Template(admin, pg_server, parse_migrators(["sql:schema.sql", "python:dying:main"], tmp_path),
                        lock_dir=tmp_path, run_id="r")
    with pytest.raises(MigrationError, match=r"step 'python:dying:main' failed: the build process "
                                             r"\(python -m pgshard.build\) exited with 7: disk quota exceeded"):
        template.ensure()
    assert admin.databases() == []


def test_a_sealed_template_is_reused_while_another_process_holds_its_build_lock(
        admin: Admin, pg_server: ServerInfo, tmp_path: Path, admin_conn: psycopg.Connection) -> None:
    """The warm path: a sealed template is checked without the file and advisory locks, so a long build of
    another run (holding them) never delays a run whose template is ready."""
    import threading

    from pgshard.admin import lock_key

    _migrations(tmp_path, "CREATE TABLE a (id int primary key);")
    built = Template(admin, pg_server, parse_migrators(["sql:sql/"], tmp_path), lock_dir=tmp_path, run_id="a").ensure()
    admin_conn.execute("SELECT pg_advisory_lock(%s)", (lock_key(built.name),))  # "another run" holds it
    outcome: list[object] = []
    with Admin(pg_server.url, admin.prefix) as other:
        template = Template(other, pg_server, parse_migrators(["sql:sql/"], tmp_path), lock_dir=tmp_path, run_id="b")
        worker = threading.Thread(target=lambda: outcome.append(template.ensure()), daemon=True)
        worker.start()
        worker.join(timeout=120)  # generous: it must not wait for the lock at all, which would be forever
        still_waiting = worker.is_alive()
        admin_conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(built.name),))
        worker.join(timeout=120)
    assert not still_waiting
    assert len(outcome) == 1 and not outcome[0].built and outcome[0].name == built.name  # type: ignore[attr-defined]


def test_a_warm_start_opens_one_admin_connection_for_stale_cleanup_template_and_clone(
        pg_server: ServerInfo, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection costs a server backend's start: a warm run's start-up shares one (plus the server's
    own version check), instead of one for stale runs, one for the template and one for the clones."""
    from pgshard import admin as admin_module
    from pgshard.run import Run

    _migrations(tmp_path, "CREATE TABLE a (id int primary key);")
    settings = resolve({}, {}, lambda key: {"pgshard_migrate": ["sql:sql/"], "pgshard_prefix": prefix,
                                            "pgshard_url": pg_server.url}.get(key), tmp_path)
    Run(settings, "warm0000", "main", server=pg_server).ensure_template()  # the template exists: a warm start next
    opened: list[int] = []
    real_connect = admin_module.connect
    monkeypatch.setattr(admin_module, "connect", lambda url, **kw: opened.append(1) or real_connect(url, **kw))
    run = Run(settings, "warm0001", "main", server=pg_server)
    try:
        run.stale_dropped = drop_stale(run._admin(), settings.stale_ttl_hours).dropped  # as start_server does
        assert not run.ensure_template().built
        database = run.worker_database()
        assert database.name in {db.name for db in run.clones.admin.databases()}  # type: ignore[union-attr]
        assert len(opened) == 1
    finally:
        run.finish()
        with Admin(pg_server.url, prefix) as cleanup:
            for db in cleanup.databases():
                if db.marker is not None:
                    cleanup.drop(db.name, force=True)
