"""The fixtures users ask for (pytest-django's fixtures.py), each a thin call into the layers: the server,
the template and this worker's database (session scope), the per-test sandbox on the app's own engine,
db_commit's clone of its own and the query counter (the FastAPI clients are in clients.py). plugin.py, which
holds the hooks, re-exports them, so pytest finds them in the plugin pytest loads.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from pgshard import redirect
from pgshard.clones import Database
from pgshard.fastapi import is_async_callable
from pgshard.migrate import MigrationError
from pgshard.run import Run
from pgshard.sandbox import (
    AsyncSandbox,
    SandboxError,
    app_engine,
    is_async_engine,
    is_async_maker,
    rebind,
    rebind_class,
    sandbox,
)
from pgshard.server.base import ServerError, ServerInfo, own_engine
from pgshard.settings import SettingsError, import_object, temporary_env

if TYPE_CHECKING:  # imported by the fixture that uses it: a run that counts no query loads nothing of it
    from pgshard.queries import QueryCounter

RUN = pytest.StashKey[Run]()  # set by plugin.py's first hook, read by every fixture


def ready_database(run: Run) -> Database:
    """This worker's database, with the engines pgshard_redirect follows pointed at it."""
    database = run.ready_database()
    redirect.install(run.settings.redirect, database.url)  # followed engines land here outside db_commit tests
    return database


# -- fixtures: server, template, databases ----------------------------------------------------------------
def _run(request: pytest.FixtureRequest) -> Run:
    return request.config.stash[RUN]


def message_of(exc: Exception, config: pytest.Config) -> str:
    """What a run shows for one of pgshard's own errors: its line (a failed build step: with where it was
    raised, and the build's traceback under --tb=long); a libpq variable's doing: that variable's line."""
    from pgshard.faults import environment

    steered = environment(exc, os.environ)
    if steered is not None:
        return steered
    if isinstance(exc, MigrationError):
        return f"pgshard: {exc.describe(str(getattr(config.option, 'tbstyle', 'auto')))}"
    return f"pgshard: {exc}"


def _guard(func: Any, *args: Any, config: pytest.Config | None = None) -> Any:
    """Turn pgshard's own errors into one clear line instead of a traceback."""
    try:
        return func(*args)
    except (SettingsError, ServerError, MigrationError, SandboxError) as exc:
        from pgshard.faults import classify

        if classify(exc) is not None:  # a foreign fault behind ours: pytest_runtest_makereport explains it
            raise
        message = message_of(exc, config) if config is not None else f"pgshard: {exc}"
    pytest.fail(message, pytrace=False)  # outside the except: no chained traceback


def _session_step(request: pytest.FixtureRequest, func: Callable[[], Any]) -> Any:
    """A session fixture's failure would repeat for every later test: one line, then the session stops."""
    try:
        return _guard(func, config=request.config)
    except pytest.fail.Exception as exc:
        request.session.shouldstop = str(exc.msg).splitlines()[0]  # the first line: "Interrupted: ..." is one line
        raise


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> ServerInfo:
    """The PostgreSQL server of this run (``.url`` of its maintenance database, ``.version``)."""
    server: ServerInfo = _session_step(request, _run(request).start_server)
    return server


@pytest.fixture(scope="session")
def pg_template(request: pytest.FixtureRequest, pg_server: ServerInfo) -> Any:
    """The sealed template database (built once per fingerprint, under a lock)."""
    return _session_step(request, _run(request).ensure_template)


@pytest.fixture(scope="session")
def pg_database(request: pytest.FixtureRequest, pg_template: Any) -> Database:
    """This worker's own clone of the template: ``.name``, ``.url``."""
    database: Database = _session_step(request, lambda: ready_database(_run(request)))
    return database  # dropped in pytest_sessionfinish, after the project's own session fixtures are torn down


@pytest.fixture(scope="session")
def pg_engine(pg_database: Database) -> Iterator[Engine]:
    """One SQLAlchemy engine per worker on its database; disposed before the database is dropped."""
    engine: Engine = own_engine(pg_database.url, pool_size=5, max_overflow=10)
    yield engine
    engine.dispose()


# -- fixtures: per-test isolation ------------------------------------------------------------------------
# What a test's fixtures look up again and again is looked up once per process: the objects the ini names
# (imported once), the app's engine and pgshard's, and whether the app is async. A test pays for a fixture
# layer (pytest's own cost, about 0.1 ms each) only where it asks for the feature behind it.
_LOOKED_UP = pytest.StashKey[dict[str, Any]]()
COMMIT_TEST = pytest.StashKey[bool]()  # set by plugin.py at collection on every db_commit item


def _looked_up(request: pytest.FixtureRequest) -> dict[str, Any]:
    found = request.config.stash.get(_LOOKED_UP, None)
    if found is None:
        found = request.config.stash[_LOOKED_UP] = {}
    return found


def _app_object(request: pytest.FixtureRequest, option: str) -> Any:
    found = _looked_up(request)
    if option not in found:
        target = getattr(_run(request).settings, option)
        # it fails alike for all: one line, and the session stops
        found[option] = _session_step(request, lambda: import_object(target, f"pgshard_{option}")) if target else None
    return found[option]


def _session_value(request: pytest.FixtureRequest, name: str) -> Any:
    """A session fixture's value, fetched through pytest once per process (a failure is not kept: pytest
    keeps it and raises it again)."""
    found = _looked_up(request)
    if name not in found:
        found[name] = request.getfixturevalue(name)
    return found[name]


def is_commit_test(node: Any) -> bool:
    return node.stash.get(COMMIT_TEST, False) or (COMMIT_TEST not in node.stash
                                                   and node.get_closest_marker("db_commit") is not None)


def _refuse_in_commit_test(request: pytest.FixtureRequest, fixture: str) -> None:
    if is_commit_test(request.node):
        pytest.fail(f"pgshard: {fixture} wraps the test in a transaction that is rolled back, which a db_commit "
                    "test opted out of: use commit_db (its .engine) or the app's own sessionmaker instead",
                    pytrace=False)


def _is_async_test(request: pytest.FixtureRequest) -> bool:
    return inspect.iscoroutinefunction(getattr(request.node, "function", None))


@pytest.fixture(scope="session")
def _pgshard_app_engine(request: pytest.FixtureRequest, pg_database: Database) -> Any:
    """The app's own engine (pgshard_engine, else the bind of pgshard_sessionmaker), pointed at this
    worker's database; None when the app has none."""
    engine = _session_step(request, lambda: app_engine(_app_object(request, "engine"),
                                                       _app_object(request, "sessionmaker")))
    if engine is not None:
        # Followed even when its URL names this database already: each connection is then stamped with the
        # database it was made for, so a db_commit test's retarget never gets one made for another. An engine
        # built for another database keeps its driver and listeners and lands here.
        redirect.follow(engine)
        getattr(engine, "sync_engine", engine).dispose(close=False)  # connections made before are not stamped
    return engine


def _app_is_async(request: pytest.FixtureRequest) -> bool:
    """An async app: an async engine or sessionmaker, or an async get_db (its requests want an AsyncSession)."""
    found = _looked_up(request)
    if "is_async" not in found:
        engine = _session_value(request, "_pgshard_app_engine")
        maker = _app_object(request, "sessionmaker")
        get_db = _app_object(request, "get_db")
        found["is_async"] = (is_async_engine(engine) or (maker is not None and is_async_maker(maker))
                             or (get_db is not None and is_async_callable(get_db)))
    is_async: bool = found["is_async"]
    return is_async


_CLIENTS_AND_SESSIONS = {"client", "async_client", "db_session", "db_connection"}


def _refuse_unshared(request: pytest.FixtureRequest, fixture: str) -> None:
    """Fixtures of one test must share one connection, or a test would silently see nothing of what
    another wrote: where that cannot be, fail at setup with the fixture to use instead."""
    if is_commit_test(request.node):
        return
    advice = None
    if _app_is_async(request):
        if fixture == "db_connection":
            advice = "db_connection cannot share the async app's connection: use db_session"
        elif fixture == "async_db_session" and not _is_async_test(request):
            advice = "async_db_session needs an async test; in a sync test use db_session (it shares the app's)"
    elif fixture == "async_db_session" and _CLIENTS_AND_SESSIONS & set(request.fixturenames):
        advice = ("async_db_session cannot share the sync app's connection (its requests run on db_session's): "
                  "use db_session")
    if advice:
        pytest.fail(f"pgshard: {advice}", pytrace=False)


_TEST_CONNECTION = pytest.StashKey[Any]()  # the test's sandboxed connection, while it is open


@contextlib.contextmanager
def _test_connection(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The test's one connection from the app's own engine (pgshard's when it has none), inside an outer
    transaction rolled back at the end, with the app's sessionmaker bound to it in savepoint mode; made by
    whichever of db_connection and db_session comes first, and shared by the other."""
    shared = request.node.stash.get(_TEST_CONNECTION, None)
    if shared is not None:
        yield shared
        return
    engine = _session_value(request, "_pgshard_app_engine")
    if engine is None or is_async_engine(engine):
        engine = _session_value(request, "pg_engine")
    maker = _app_object(request, "sessionmaker")
    with sandbox(engine) as box, contextlib.ExitStack() as stack:
        if maker is not None and not is_async_maker(maker):
            stack.enter_context(rebind(maker, bind=box.connection, join_transaction_mode="create_savepoint"))
        request.node.stash[_TEST_CONNECTION] = box.connection
        try:
            yield box.connection
        finally:
            del request.node.stash[_TEST_CONNECTION]


@pytest.fixture
def db_connection(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The test's connection from the app's own engine (pgshard's when it has none), inside an outer
    transaction rolled back at teardown. The app's sessionmaker (pgshard_sessionmaker) is bound to it for
    the test, in savepoint mode."""
    _refuse_in_commit_test(request, "db_connection")
    _refuse_unshared(request, "db_connection")
    with _test_connection(request) as connection:
        yield connection


@pytest.fixture
def db_session(request: pytest.FixtureRequest) -> Iterator[Session]:
    """A Session on the test's connection: the app's commit() releases a savepoint; all rolled back after.
    With an async app (in a sync test) it runs on the app's async connection, which the client shares."""
    _refuse_in_commit_test(request, "db_session")
    if _app_is_async(request):
        _refuse_unshared(request, "db_session")
        box: AsyncSandbox = request.getfixturevalue("_pgshard_async_sandbox")
        session = box.sync_session(expire_on_commit=False)
        yield session
        session.close()
        return
    # a sync app: nothing to refuse (only async_db_session is refused there, by itself)
    with _test_connection(request) as connection:
        session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        yield session
        session.close()


_ASYNC_DRIVERS = {"psycopg": "postgresql+psycopg_async", "asyncpg": "postgresql+asyncpg"}


def _async_engine(request: pytest.FixtureRequest, database: Database) -> Any:
    """The app's async engine, or (when it has none, or pgshard_async_driver names another driver) one of
    ours on the worker's database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    engine = _session_value(request, "_pgshard_app_engine")
    settings = _run(request).settings
    if is_async_engine(engine):
        if "async_driver" not in settings.explicit or engine.dialect.driver == settings.async_driver:
            return engine
        url = engine.url
    else:
        url = make_url(database.url)
    url = url.set(drivername=_ASYNC_DRIVERS[settings.async_driver])
    return own_engine(url.render_as_string(hide_password=False), poolclass=NullPool)


_SYNC_SIDE = {"client", "db_session"}  # fixtures that reach an async app's connection from outside its loop


@pytest.fixture
def _pgshard_async_sandbox(request: pytest.FixtureRequest, pg_database: Database) -> Iterator[AsyncSandbox]:
    """The test's async connection: in the test's own loop for an async test, else in a loop of its own
    (a blocking portal) that the sync client and db_session share."""
    engine = _async_engine(request, pg_database)
    maker = _app_object(request, "sessionmaker")
    with contextlib.ExitStack() as stack:
        portal = None
        if _is_async_test(request) and not _SYNC_SIDE & set(request.fixturenames):
            _keep_test_loop_open(request, stack)
        else:  # a sync test, or an async one with a sync client or db_session: a loop they can reach
            from anyio.from_thread import start_blocking_portal

            portal = stack.enter_context(start_blocking_portal())
        box = AsyncSandbox(engine, portal)
        stack.callback(box.discard)
        if maker is not None and is_async_maker(maker):  # the app's own sessions join the sandbox too
            stack.enter_context(rebind_class(maker, box.session_class(maker.class_)))
        yield box


@pytest.fixture
def async_db_session(request: pytest.FixtureRequest) -> Any:
    """An AsyncSession in savepoint mode on the app's async engine (its driver; else psycopg async or
    pgshard_async_driver), rolled back after. A plain fixture on purpose: it connects on first use inside
    the test's own event loop, so it works under pytest-asyncio (strict or auto) and anyio alike."""
    _refuse_in_commit_test(request, "async_db_session")
    _refuse_unshared(request, "async_db_session")
    box: AsyncSandbox = request.getfixturevalue("_pgshard_async_sandbox")
    return box.session_class()(expire_on_commit=False)


def _keep_test_loop_open(request: pytest.FixtureRequest, stack: contextlib.ExitStack) -> None:
    """Make the test's event loop outlive this fixture, so its teardown can roll back and close the
    connection gracefully in that loop (anyio: hold a lease on its runner; pytest-asyncio: set up its
    function-scoped runner first, so it is torn down after us; pytest-asyncio 0.23, the last for pytest 7.4,
    has an ``event_loop`` fixture instead)."""
    if "anyio_backend" in request.fixturenames:
        from anyio.pytest_plugin import extract_backend_and_options, get_runner

        name, options = extract_backend_and_options(request.getfixturevalue("anyio_backend"))
        stack.enter_context(get_runner(name, options))
    elif request.node.get_closest_marker("asyncio") is not None:
        for name in ("_function_scoped_runner", "event_loop"):
            with contextlib.suppress(pytest.FixtureLookupError):
                request.getfixturevalue(name)
                return


@pytest.fixture
def query_counter() -> Iterator[QueryCounter]:
    """Counts the statements the test runs (``.count``, ``.statements``, ``assert_max(n)``)."""
    from pgshard.queries import QueryCounter

    with QueryCounter() as counter:
        yield counter


# -- db_commit --------------------------------------------------------------------------------------------
@pytest.fixture
def _pgshard_db_commit(request: pytest.FixtureRequest) -> Iterator[None]:
    """A db_commit test's clone, with the app's engines and sessionmaker pointed at it. Not autouse: plugin.py
    puts it first among the function-scoped fixtures of each db_commit test, so no other test pays for it."""
    if not is_commit_test(request.node):
        yield
        return
    run = _run(request)
    request.getfixturevalue("pg_database")
    assert run.clones is not None
    database = _guard(run.clones.take)
    engine = own_engine(database.url, pool_size=10, max_overflow=20)
    maker = _app_object(request, "sessionmaker")
    request.node.stash[_COMMIT_DB] = (database, engine)
    followed = _follow_app_engines(request, maker)
    try:
        with temporary_env(run.database_env(database.name)), redirect.retarget(database.url), \
                contextlib.ExitStack() as stack:
            if maker is not None and maker.kw.get("bind") in followed:
                pass  # the app's own engine behind its sessionmaker now lands on the clone
            elif maker is not None and is_async_maker(maker):
                from sqlalchemy.engine import make_url
                from sqlalchemy.pool import NullPool

                url = make_url(database.url).set(drivername=_ASYNC_DRIVERS[run.settings.async_driver])
                bind = own_engine(url.render_as_string(hide_password=False), poolclass=NullPool)
                stack.enter_context(rebind(maker, bind=bind))
            elif maker is not None:
                stack.enter_context(rebind(maker, bind=engine))
            yield
    finally:
        engine.dispose()
        run.clones.give_back(database)


_COMMIT_DB = pytest.StashKey[tuple[Database, Engine]]()


def _follow_app_engines(request: pytest.FixtureRequest, maker: Any) -> list[Any]:
    """The app's module-level engines (the bind of pgshard_sessionmaker, pgshard_engine) follow the
    test's clone in a db_commit test; engines pgshard_redirect covers follow it by name already."""
    engines = [maker.kw.get("bind")] if maker is not None and isinstance(getattr(maker, "kw", None), dict) else []
    engine = _app_object(request, "engine")
    if engine is not None and not isinstance(getattr(engine, "sync_engine", engine), Engine):
        pytest.fail(f"pgshard: pgshard_engine must name a SQLAlchemy Engine or AsyncEngine, got "
                    f"{type(engine).__name__}", pytrace=False)
    followed = []
    for candidate in [*engines, engine]:
        if candidate is not None and isinstance(getattr(candidate, "sync_engine", candidate), Engine):
            redirect.follow(candidate)
            followed.append(candidate)
    return followed


class _CommitDb:
    def __init__(self, database: Database, engine: Engine) -> None:
        self.name = database.name
        self.url = database.url
        self.engine = engine

    def __repr__(self) -> str:
        return f"CommitDb({self.name})"


@pytest.fixture
def commit_db(request: pytest.FixtureRequest, _pgshard_db_commit: None) -> _CommitDb:
    """In a ``@pytest.mark.db_commit`` test: its own database (``.name``, ``.url``, ``.engine``)."""
    found = request.node.stash.get(_COMMIT_DB, None)
    if found is None:
        pytest.fail("pgshard: commit_db is only for tests marked @pytest.mark.db_commit", pytrace=False)
    return _CommitDb(*found)
