"""pytest hooks and fixtures only: this module wires the layers together and holds no SQL.

Roles: the controller (xdist's main process, or the one process without xdist) acquires the server once
and hands it to the workers through the environment; each worker builds or reuses the template and
clones its own database; each test gets a sandbox. See docs in README.md and DESIGN.md.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from pgshard import redirect
from pgshard.clones import Database
from pgshard.fastapi import make_async_client, make_client, override_dependency
from pgshard.lockfile import set_announcer
from pgshard.migrate import MigrationError
from pgshard.queries import QueryCounter
from pgshard.run import HANDOFF, Run, summary_lines
from pgshard.sandbox import AsyncSandbox, SandboxError, is_async_maker, rebind, rebind_class, sandbox
from pgshard.server.base import ServerError, ServerInfo
from pgshard.settings import OPTIONS, Settings, SettingsError, import_object, resolve, temporary_env
from pgshard.sharding import DurationsRecorder, ShardError, load_durations, parse_shard, split

RUN = pytest.StashKey[Run]()
WORKER_STATS = pytest.StashKey[list[dict[str, Any]]]()


# -- options -----------------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgshard", "real PostgreSQL per xdist worker (pgshard)")
    for opt in OPTIONS:
        if opt.cli:
            if opt.kind == "bool":
                group.addoption(opt.cli, dest=f"pgshard_{opt.name}", action="store_true", default=None, help=opt.help)
            elif opt.name == "server":
                group.addoption(opt.cli, dest=f"pgshard_{opt.name}", choices=["embedded", "url", "docker"],
                                default=None, help=opt.help)
            else:
                group.addoption(opt.cli, dest=f"pgshard_{opt.name}", default=None, help=opt.help)
        if opt.ini:
            if opt.kind == "lines":
                parser.addini(opt.ini, opt.help, type="linelist", default=None)
            else:
                parser.addini(opt.ini, opt.help, type="string", default=None)


def _settings(config: pytest.Config, namespace: Any) -> Settings:
    cli = {opt.name: getattr(namespace, f"pgshard_{opt.name}", None) for opt in OPTIONS if opt.cli}
    return resolve(cli, os.environ, config.getini, config.rootpath)


def _is_worker_process() -> bool:
    return bool(os.environ.get("PYTEST_XDIST_WORKER"))


def _announce_through(config: pytest.Config) -> None:
    """Lines like "waiting for pid N (building template X)" reach the terminal even while pytest captures
    output (and from xdist workers, whose stderr is the terminal's)."""
    capture = config.pluginmanager.getplugin("capturemanager")

    def announce(line: str) -> None:
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    set_announcer(announce)


def _fail_usage(exc: Exception) -> pytest.UsageError:
    return pytest.UsageError(f"pgshard: {exc}")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """Before any conftest imports the app: know the server and point pgshard_env at our database."""
    namespace = early_config.known_args_namespace
    if getattr(namespace, "help", False) or getattr(namespace, "version", False):
        return
    _announce_through(early_config)
    try:
        settings = _settings(early_config, namespace)
        if settings.shard:  # a bad --shard is a usage error before any server starts
            parse_shard(settings.shard)
        worker_id = os.environ.get("PYTEST_XDIST_WORKER", "main") if _is_worker_process() else "main"
        run = Run.from_handoff(settings, worker_id) if _is_worker_process() else None
        if run is None:
            run = Run(settings, Run.new_run_id(), "main")
            if settings.configured:
                run.start_server()
                os.environ[HANDOFF] = run.handoff()
        os.environ.update(run.database_env())
        if settings.redirect:  # before any conftest builds an engine or overwrites os.environ
            if run.server is None:
                raise SettingsError("pgshard_redirect needs pgshard's server in every worker; "
                                    "load pgshard as a plugin (not late with -p) and run pytest-xdist >= 3.5")
            redirect.install(settings.redirect, run.database_url())
            redirect.handle_ddl(run)
    except (SettingsError, ServerError, ShardError) as exc:
        raise _fail_usage(exc) from None
    early_config.stash[RUN] = run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "db_commit: run on a fresh database clone of its own with real commits and several connections")
    if RUN not in config.stash:  # loaded late (-p pgshard.plugin): no early hook ran
        try:
            settings = _settings(config, config.option)
        except SettingsError as exc:
            raise _fail_usage(exc) from None
        config.stash[RUN] = Run(settings, Run.new_run_id(), "main")
    run = config.stash[RUN]
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and run.server is None:  # a worker without hand-off: lazy, keyed by run uid
        run.run_id = str(workerinput["testrunuid"])[:8]
        run.worker_id = str(workerinput["workerid"])
    config.stash[WORKER_STATS] = []
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(config), "pgshard-xdist")
    if run.settings.shard or run.settings.store_durations:
        try:
            config.pluginmanager.register(_ShardHooks(config, run.settings), "pgshard-shard")
        except ShardError as exc:
            raise _fail_usage(exc) from None


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(RUN, None)
    if run is not None:
        run.finish()
        run.stop_server()


class _XdistHooks:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        stats = getattr(node, "workeroutput", {}).get("pgshard")
        if stats:
            self.config.stash[WORKER_STATS].append(stats)


# -- sharding ------------------------------------------------------------------------------------------
class _ShardHooks:
    """--shard K/N selection (identical in every xdist worker: the split is deterministic) and
    --pg-store-durations recording (in the controller, which sees every worker's reports)."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.shard = parse_shard(settings.shard) if settings.shard else None
        self.recorder = DurationsRecorder() if settings.store_durations else None

    def _warn(self, text: str | None) -> None:
        # Under xdist only workers collect; gw0 speaks for all (xdist forwards its warning to the summary).
        workerinput = getattr(self.config, "workerinput", None)
        if text and (workerinput is None or workerinput.get("workerid") == "gw0"):
            self.config.issue_config_time_warning(pytest.PytestWarning(f"pgshard: {text}"), stacklevel=2)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if self.shard is None:
            return
        path = self.settings.durations_file
        durations, warning = load_durations(path)
        self._warn(warning)
        selected, warning = split([item.nodeid for item in items], *self.shard, durations,
                                  source=f"durations file {path}")
        self._warn(warning)
        keep = set(selected)
        deselected = [item for item in items if item.nodeid not in keep]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if item.nodeid in keep]
            config.stash[RUN].shard_emptied = not items

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.recorder is not None:
            self.recorder.add(report.nodeid, report.duration)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.recorder is not None and not hasattr(self.config, "workerinput"):
            self._warn(self.recorder.write(self.settings.durations_file))
        emptied = self.config.stash[RUN].shard_emptied or any(
            stats.get("shard_emptied") for stats in self.config.stash.get(WORKER_STATS, []))
        if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and emptied:
            session.exitstatus = pytest.ExitCode.OK  # more shards than tests: an empty shard is not a failure


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run = config.stash[RUN]
    run.wants_commit_pool = any(item.get_closest_marker("db_commit") for item in items)


def _ready_database(run: Run) -> Database:
    database = run.ready_database()
    redirect.install(run.settings.redirect, database.url)  # followed engines land here outside db_commit tests
    return database


@pytest.hookimpl(tryfirst=True)  # before the runner sets up any fixture of the first test
def pytest_runtest_setup(item: pytest.Item) -> None:
    """When the project's own code uses pgshard's database (pgshard_migrate, pgshard_env, pgshard_redirect),
    it must exist before the project's first fixture: a session-scoped autouse fixture of its conftest
    knows nothing of pgshard's fixtures. Only a test about to run builds anything (an empty shard does
    not); a failure is one line, once, and stops the run instead of failing every test the same way."""
    run = item.config.stash[RUN]
    if not run.settings.eager or run.database is not None:
        return
    try:
        _ready_database(run)
        return
    except (SettingsError, ServerError, MigrationError) as exc:
        message = f"pgshard: {exc}"
        elsewhere = isinstance(exc, MigrationError) and exc.elsewhere
    item.session.shouldstop = message
    if elsewhere:  # another worker's test already shows this error: one line, once
        pytest.skip("pgshard: the template build failed in another worker of this run (its error is above)")
    pytest.fail(message, pytrace=False)  # outside the except: no chained traceback


@pytest.hookimpl(trylast=True)  # after the runner has torn down the session fixtures
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    run = config.stash[RUN]
    run.finish()
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["pgshard"] = run.stats()
    else:
        config.stash[WORKER_STATS].append(run.stats())


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = config.stash.get(RUN, None)
    if run is None or hasattr(config, "workerinput"):
        return
    stats = config.stash.get(WORKER_STATS, [])
    if run.server is None and not stats:
        return
    lines = summary_lines(run.server, stats, run.stale_dropped, run.timings.get("server"), run.notes)
    if lines:
        terminalreporter.write_sep("-", "pgshard")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A SandboxError is advice, not a bug: show its one line instead of SQLAlchemy's stack. And no report
    (terminal, -rA, junit XML) shows a password of ours: URLs carry none, but a driver that reads the
    passfile itself (asyncpg) keeps the password in objects that --showlocals prints."""
    report = yield
    if call.excinfo is not None and call.excinfo.errisinstance(SandboxError):
        report.longrepr = f"pgshard: {call.excinfo.value}"
    if report.longrepr is not None or report.sections:
        _scrub(report, item.config.stash[RUN].secrets())
    return report


def _scrub(report: pytest.TestReport, secrets: list[str]) -> None:
    if not secrets:
        return
    if report.longrepr is not None:
        text = str(report.longrepr)
        if any(secret in text for secret in secrets):
            for secret in secrets:
                text = text.replace(secret, "***")
            report.longrepr = text
    sections = []
    for title, content in report.sections:
        for secret in secrets:
            content = content.replace(secret, "***")
        sections.append((title, content))
    report.sections = sections


# -- fixtures: server, template, databases ----------------------------------------------------------------
def _run(request: pytest.FixtureRequest) -> Run:
    return request.config.stash[RUN]


def _guard(func: Any, *args: Any) -> Any:
    """Turn pgshard's own errors into one clear line instead of a traceback."""
    try:
        return func(*args)
    except (SettingsError, ServerError, MigrationError, SandboxError) as exc:
        message = f"pgshard: {exc}"
    pytest.fail(message, pytrace=False)  # outside the except: no chained traceback


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> ServerInfo:
    """The PostgreSQL server of this run (``.url`` of its maintenance database, ``.version``)."""
    server: ServerInfo = _guard(_run(request).start_server)
    return server


@pytest.fixture(scope="session")
def pg_template(request: pytest.FixtureRequest, pg_server: ServerInfo) -> Any:
    """The sealed template database (built once per fingerprint, under a lock)."""
    return _guard(_run(request).ensure_template)


@pytest.fixture(scope="session")
def pg_database(request: pytest.FixtureRequest, pg_template: Any) -> Database:
    """This worker's own clone of the template: ``.name``, ``.url``."""
    database: Database = _guard(_ready_database, _run(request))
    return database  # dropped in pytest_sessionfinish, after the project's own session fixtures are torn down


@pytest.fixture(scope="session")
def pg_engine(pg_database: Database) -> Iterator[Engine]:
    """One SQLAlchemy engine per worker on its database; disposed before the database is dropped."""
    engine = create_engine(pg_database.url, pool_size=5, max_overflow=10)
    yield engine
    engine.dispose()


# -- fixtures: per-test isolation ------------------------------------------------------------------------
def _app_object(request: pytest.FixtureRequest, option: str) -> Any:
    settings = _run(request).settings
    target = getattr(settings, option)
    if not target:
        return None
    return _guard(import_object, target, f"pgshard_{option}")


def _refuse_in_commit_test(request: pytest.FixtureRequest, fixture: str) -> None:
    if request.node.get_closest_marker("db_commit") is not None:
        pytest.fail(f"pgshard: {fixture} wraps the test in a transaction that is rolled back, which a db_commit "
                    "test opted out of: use commit_db (its .engine) or the app's own sessionmaker instead",
                    pytrace=False)


@pytest.fixture
def db_connection(request: pytest.FixtureRequest, pg_engine: Engine) -> Iterator[Any]:
    """The test's connection, inside an outer transaction rolled back at teardown. The app's
    sessionmaker (pgshard_sessionmaker) is bound to it for the test, in savepoint mode."""
    _refuse_in_commit_test(request, "db_connection")
    maker = _app_object(request, "sessionmaker")
    with sandbox(pg_engine) as box:
        if maker is not None and not is_async_maker(maker):
            with rebind(maker, bind=box.connection, join_transaction_mode="create_savepoint"):
                yield box.connection
        else:
            yield box.connection


@pytest.fixture
def db_session(request: pytest.FixtureRequest) -> Iterator[Session]:
    """A Session on the test's connection: the app's commit() releases a savepoint; all rolled back after."""
    _refuse_in_commit_test(request, "db_session")
    connection = request.getfixturevalue("db_connection")
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    yield session
    session.close()


def _async_url(run: Run, database: Database) -> str:
    from sqlalchemy.engine import make_url

    driver = "postgresql+asyncpg" if run.settings.async_driver == "asyncpg" else "postgresql+psycopg_async"
    return make_url(database.url).set(drivername=driver).render_as_string(hide_password=False)


@pytest.fixture
def async_db_session(request: pytest.FixtureRequest, pg_database: Database) -> Iterator[Any]:
    """An AsyncSession in savepoint mode (psycopg async or asyncpg: pgshard_async_driver), rolled back
    after. A plain fixture on purpose: it connects on first use inside the test's own event loop, so it
    works under pytest-asyncio (strict or auto) and anyio alike."""
    _refuse_in_commit_test(request, "async_db_session")
    maker = _app_object(request, "sessionmaker")
    with contextlib.ExitStack() as stack:
        _keep_test_loop_open(request, stack)
        box = AsyncSandbox(_async_url(_run(request), pg_database))
        stack.callback(box.discard)
        if maker is not None and is_async_maker(maker):  # the app's own sessions join the sandbox too
            stack.enter_context(rebind_class(maker, box.session_class(maker.class_)))
        yield box.session_class()(expire_on_commit=False)


def _keep_test_loop_open(request: pytest.FixtureRequest, stack: contextlib.ExitStack) -> None:
    """Make the test's event loop outlive this fixture, so its teardown can roll back and close the
    connection gracefully in that loop (anyio: hold a lease on its runner; pytest-asyncio: set up its
    function-scoped runner first, so it is torn down after us)."""
    if "anyio_backend" in request.fixturenames:
        from anyio.pytest_plugin import extract_backend_and_options, get_runner

        name, options = extract_backend_and_options(request.getfixturevalue("anyio_backend"))
        stack.enter_context(get_runner(name, options))
    elif request.node.get_closest_marker("asyncio") is not None:
        with contextlib.suppress(pytest.FixtureLookupError):
            request.getfixturevalue("_function_scoped_runner")


@pytest.fixture
def query_counter() -> Iterator[QueryCounter]:
    """Counts the statements the test runs (``.count``, ``.statements``, ``assert_max(n)``)."""
    with QueryCounter() as counter:
        yield counter


# -- db_commit --------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _pgshard_db_commit(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("db_commit") is None:
        yield
        return
    run = _run(request)
    request.getfixturevalue("pg_database")
    assert run.clones is not None
    database = _guard(run.clones.take)
    engine = create_engine(database.url, pool_size=10, max_overflow=20)
    maker = _app_object(request, "sessionmaker")
    request.node.stash[_COMMIT_DB] = (database, engine)
    followed = _follow_app_engines(request, maker)
    try:
        with temporary_env(run.database_env(database.name)), redirect.retarget(database.url), \
                contextlib.ExitStack() as stack:
            if maker is not None and maker.kw.get("bind") in followed:
                pass  # the app's own engine behind its sessionmaker now lands on the clone
            elif maker is not None and is_async_maker(maker):
                from sqlalchemy.ext.asyncio import create_async_engine
                from sqlalchemy.pool import NullPool

                stack.enter_context(rebind(maker, bind=create_async_engine(_async_url(run, database),
                                                                           poolclass=NullPool)))
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


# -- FastAPI ----------------------------------------------------------------------------------------------
def _app(request: pytest.FixtureRequest) -> Any:
    app = _app_object(request, "app")
    if app is None:
        pytest.fail("pgshard: the client fixtures need pgshard_app = package.module:app in your pytest ini",
                    pytrace=False)
    return app


def _app_client(request: pytest.FixtureRequest, make: Callable[[Any], Any]) -> Iterator[Any]:
    """The app's get_db yields the test's sandbox session; in a db_commit test, a real session per
    request on the test's own clone (the app's sessionmaker, rebound, already points there)."""
    app = _app(request)
    get_db = _app_object(request, "get_db")
    if get_db is None:
        pytest.fail("pgshard: the client fixtures need pgshard_get_db = package.module:get_db in your pytest ini; "
                    "without it the app's requests would commit to the database for real", pytrace=False)
    is_async = inspect.isasyncgenfunction(get_db) or inspect.iscoroutinefunction(get_db)
    if request.node.get_closest_marker("db_commit") is not None:
        engine = request.getfixturevalue("commit_db").engine
        if _app_object(request, "sessionmaker") is not None:  # rebound to the clone: the app's get_db is right
            yield make(app)
        elif is_async:
            pytest.fail("pgshard: an async get_db in a db_commit test needs pgshard_sessionmaker (the app's "
                        "async_sessionmaker), which pgshard points at the test's clone", pytrace=False)
        else:
            with override_dependency(app, get_db, lambda: Session(bind=engine, expire_on_commit=False)):
                yield make(app)
    else:
        session = request.getfixturevalue("async_db_session" if is_async else "db_session")
        with override_dependency(app, get_db, lambda: session, close=False):
            yield make(app)


@pytest.fixture
def client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A FastAPI TestClient whose pgshard_get_db dependency yields the test's session."""
    yield from _app_client(request, make_client)


@pytest.fixture
def async_client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An httpx.AsyncClient on the app (ASGITransport), same dependency override as ``client``."""
    yield from _app_client(request, make_async_client)
