"""redirect.py as a plain object against the real server: engines on every driver that name a redirected
database land on the target whatever their URL says, others are untouched, followed engines and retarget
move with a db_commit clone, and the app's own CREATE/DROP DATABASE act on the target only."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy_utils import create_database, database_exists, drop_database

from pgshard import redirect
from pgshard.admin import Admin, Marker
from pgshard.run import Run
from pgshard.server.base import ServerError, ServerInfo
from pgshard.settings import Settings, database_url

NOWHERE = "app:secret@db.example.invalid:5432"  # a host that does not exist: only a redirect can reach a server


class AdminLifecycle:
    """The smallest DatabaseLifecycle: marked databases through admin.Admin (the run's is tested in plugin/)."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.calls: list[str] = []

    def create_database(self, name: str) -> bool:
        self.calls.append(f"create {name}")
        if self.admin.exists(name):
            return False
        self.admin.create(name, Marker("clone"))
        return True

    def drop_database(self, name: str) -> bool:
        self.calls.append(f"drop {name}")
        return self.admin.drop(name, force=True)


@pytest.fixture
def admin(pg_server: ServerInfo) -> Iterator[Admin]:
    with Admin(pg_server.url, "pgr" + uuid.uuid4().hex[:8]) as admin:
        yield admin
        for db in admin.databases():
            if db.marker is not None:
                admin.drop(db.name, force=True)


def _ours(admin: Admin, suffix: str) -> str:
    name = f"{admin.prefix}_{suffix}"
    admin.create(name, Marker("clone"))
    return name


@pytest.fixture
def app_name() -> str:
    return "app_" + uuid.uuid4().hex[:8]  # the app's hard-coded database name, unique to the test


@pytest.fixture
def target(admin: Admin, pg_server: ServerInfo, app_name: str) -> Iterator[str]:
    """This worker's database (a marked one of our own) with ``app_name`` redirected to it."""
    name = _ours(admin, "worker")
    redirect.install([app_name], database_url(pg_server.url, name))
    redirect.handle_ddl(AdminLifecycle(admin))
    yield name
    redirect.reset()


def _current(url: str, **kw: object) -> str:
    engine = create_engine(url, poolclass=NullPool, **kw)  # type: ignore[arg-type]
    try:
        with engine.connect() as conn:
            return str(conn.scalar(text("SELECT current_database()")))
    finally:
        engine.dispose()


async def _current_async(url: str) -> str:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return str(await conn.scalar(text("SELECT current_database()")))
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2", "asyncpg", "psycopg_async"])
def test_engines_on_every_driver_land_on_the_target_whatever_their_url_says(
        driver: str, target: str, app_name: str) -> None:
    url = f"postgresql+{driver}://{NOWHERE}/{app_name}?connect_timeout=3"
    if driver in ("asyncpg", "psycopg_async"):
        url = url.split("?")[0]
        assert asyncio.run(_current_async(url)) == target
    else:
        assert _current(url) == target


def test_the_apps_own_do_connect_listeners_still_run_on_a_redirected_connection(
        target: str, app_name: str) -> None:
    engine = create_engine(f"postgresql+psycopg2://{NOWHERE}/{app_name}", poolclass=NullPool)

    @event.listens_for(engine, "do_connect")
    def name_the_app(dialect: object, record: object, cargs: object, cparams: dict[str, str]) -> None:
        cparams["application_name"] = "the-app"

    with engine.connect() as conn:
        assert conn.scalar(text("SELECT current_database()")) == target
        assert conn.scalar(text("SHOW application_name")) == "the-app"


def test_an_engine_built_before_install_is_redirected(admin: Admin, pg_server: ServerInfo, app_name: str) -> None:
    built_at_import = create_engine(f"postgresql+psycopg2://{NOWHERE}/{app_name}", poolclass=NullPool)
    name = _ours(admin, "late")
    redirect.install([app_name], database_url(pg_server.url, name))
    try:
        with built_at_import.connect() as conn:
            assert conn.scalar(text("SELECT current_database()")) == name
    finally:
        redirect.reset()


def test_an_engine_to_another_database_name_is_untouched(admin: Admin, pg_server: ServerInfo, target: str) -> None:
    other = _ours(admin, "other")
    assert _current(database_url(pg_server.url, other)) == other
    with pytest.raises(OperationalError, match=r"db\.example\.invalid"):
        _current(f"postgresql+psycopg2://{NOWHERE}/unrelated_name", connect_args={"connect_timeout": 3})


def test_a_followed_engine_connects_to_the_current_target(admin: Admin, pg_server: ServerInfo, target: str) -> None:
    other = _ours(admin, "elsewhere")
    engine = create_engine(database_url(pg_server.url, other), pool_size=1)
    try:
        with engine.connect() as conn:  # pooled before it was followed
            assert conn.scalar(text("SELECT current_database()")) == other
        redirect.follow(engine)
        for _ in range(2):
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT current_database()")) == target
        assert _sessions_on(admin, other) == 0
    finally:
        engine.dispose()


def test_an_engine_no_longer_followed_connects_by_its_own_url_again(
        admin: Admin, pg_server: ServerInfo, app_name: str) -> None:
    own, worker = _ours(admin, "own"), _ours(admin, "w")
    engine = create_engine(database_url(pg_server.url, own), pool_size=1)
    redirect.install([app_name], database_url(pg_server.url, worker))
    try:
        redirect.follow(engine)
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT current_database()")) == worker
        redirect.reset()
        redirect.install([app_name], database_url(pg_server.url, worker))
        for _ in range(2):
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT current_database()")) == own
    finally:
        redirect.reset()
        engine.dispose()


def _sessions_on(admin: Admin, name: str) -> int:
    """Sessions left on a database, once closed ones had time to end (a backend exits just after its client)."""
    deadline = time.monotonic() + 30
    while True:
        row = admin.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()
        assert row is not None
        if int(row[0]) == 0 or time.monotonic() > deadline:
            return int(row[0])
        time.sleep(0.05)


def test_retarget_moves_engines_and_leaves_no_pooled_connection_behind(
        admin: Admin, pg_server: ServerInfo, target: str, app_name: str) -> None:
    engine = create_engine(f"postgresql+psycopg://{NOWHERE}/{app_name}", pool_size=2)
    try:
        with engine.connect() as conn:  # pooled, made for the worker's database
            assert conn.scalar(text("SELECT current_database()")) == target
        clone = _ours(admin, "t1")
        with redirect.retarget(database_url(pg_server.url, clone)):
            for _ in range(3):
                with engine.connect() as conn:
                    assert conn.scalar(text("SELECT current_database()")) == clone
            assert _sessions_on(admin, target) == 0  # the worker's idle one was closed, not kept
        assert _sessions_on(admin, clone) == 0
        admin.drop(clone)  # without FORCE: nobody may be left on it
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT current_database()")) == target
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg_async"])
def test_retarget_moves_async_engines_and_never_hands_out_a_stale_connection(
        driver: str, admin: Admin, pg_server: ServerInfo, target: str, app_name: str) -> None:
    clone = _ours(admin, "t1")

    async def main() -> list[str]:
        engine = create_async_engine(f"postgresql+{driver}://{NOWHERE}/{app_name}", pool_size=2)

        async def current() -> str:
            async with engine.connect() as conn:
                return str(await conn.scalar(text("SELECT current_database()")))

        try:
            seen = [await current()]
            with redirect.retarget(database_url(pg_server.url, clone)):
                seen.append(await current())
            if driver == "asyncpg":  # closed at once (a non-blocking terminate); psycopg's at the next checkout
                assert _sessions_on(admin, clone) == 0
            seen.append(await current())
        finally:
            await engine.dispose()
        return seen

    assert asyncio.run(main()) == [target, clone, target]


def test_sqlalchemy_utils_create_drop_and_exists_act_on_the_target_only(
        admin: Admin, target: str, app_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"postgresql+psycopg2://{NOWHERE}/{app_name}"
    monkeypatch.setenv("DATABASE_URL", url)  # how the app's maintenance server is recognised before any connect
    assert database_exists(url)
    drop_database(url)
    assert not admin.exists(target)
    assert not database_exists(url)
    create_database(url)
    created = admin.info(target)
    assert created is not None and created.marker is not None
    assert database_exists(url)
    assert not admin.exists(app_name)


def test_plain_sql_through_the_maintenance_database_acts_on_the_target(
        admin: Admin, target: str, app_name: str) -> None:
    with create_engine(f"postgresql+psycopg://{NOWHERE}/{app_name}", poolclass=NullPool).connect() as conn:
        conn.scalar(text("SELECT 1"))  # the server a redirected URL names is now known
    maintenance = create_engine(f"postgresql+psycopg://{NOWHERE}/postgres", isolation_level="AUTOCOMMIT",
                                poolclass=NullPool)
    with maintenance.connect() as conn:
        assert conn.scalar(text("SELECT current_database()")) == "postgres"
        conn.execute(text(f"DROP DATABASE {app_name}"))
        assert not admin.exists(target)
        with pytest.raises(ProgrammingError, match=f'database "{app_name}" does not exist'):
            conn.execute(text(f'DROP DATABASE "{app_name}"'))
        conn.execute(text(f"DROP DATABASE IF EXISTS {app_name}"))
        conn.execute(text(f"CREATE DATABASE {app_name.upper()} TEMPLATE template0"))  # unquoted: folded
        assert admin.exists(target)
        with pytest.raises(ProgrammingError, match="already exists"):
            conn.execute(text(f"CREATE DATABASE {app_name}"))
    assert not admin.exists(app_name)


def test_a_database_pgshard_did_not_create_is_never_dropped(
        admin: Admin, pg_server: ServerInfo, app_name: str) -> None:
    foreign = f"{admin.prefix}_users_own"
    admin.conn.execute(f'CREATE DATABASE "{foreign}"')  # no ownership marker
    redirect.install([app_name], database_url(pg_server.url, foreign))
    redirect.handle_ddl(AdminLifecycle(admin))
    try:
        maintenance = create_engine(f"postgresql+psycopg://{NOWHERE}/{app_name}", isolation_level="AUTOCOMMIT",
                                    poolclass=NullPool)
        with maintenance.connect() as conn, pytest.raises(DBAPIError, match="not created by pgshard"):
            conn.execute(text(f"DROP DATABASE {app_name}"))
        assert admin.exists(foreign)
    finally:
        redirect.reset()
        admin.conn.execute(f'DROP DATABASE "{foreign}"')


def test_a_real_database_of_the_redirected_name_is_never_touched(
        admin: Admin, pg_server: ServerInfo, target: str, app_name: str) -> None:
    admin.conn.execute(f'CREATE DATABASE "{app_name}"')  # the user's own database of that name, on a server
    try:
        # a maintenance connection that is not redirected (pgshard's server is no URL of the app's)
        with create_engine(pg_server.url, isolation_level="AUTOCOMMIT", poolclass=NullPool).connect() as conn:
            conn.execute(text(f"DROP DATABASE {app_name}"))
            assert conn.scalar(text("SELECT current_database()")) == "postgres"
        assert admin.exists(app_name) and not admin.exists(target)
    finally:
        admin.conn.execute(f'DROP DATABASE "{app_name}"')


def test_pgshards_own_connections_are_never_rewritten(admin: Admin, pg_server: ServerInfo, target: str) -> None:
    with psycopg.connect(make_url(pg_server.url).set(drivername="postgresql").render_as_string(False)) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("postgres",)
    assert _current(pg_server.url) == "postgres"  # a SQLAlchemy engine on pgshard's own maintenance database


@pytest.mark.parametrize("name", ["app_test", "pgshard_0000_gw1", "pgshard_other_gw0", "postgres"])
def test_the_run_creates_and_drops_only_this_workers_databases(name: str) -> None:
    run = Run(Settings(), "0000", "gw0")  # no server: a refusal must come before anything is touched
    for action in (run.create_database, run.drop_database):
        with pytest.raises(ServerError, match="only on this worker's databases"):
            action(name)
