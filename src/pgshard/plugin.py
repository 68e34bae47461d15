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
import warnings
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from pgshard import redirect
from pgshard.clones import Database
from pgshard.fastapi import is_async_callable, make_async_client, make_client, override_dependency
from pgshard.lockfile import set_announcer
from pgshard.migrate import MigrationError, parse_migrators
from pgshard.run import HANDOFF, Run, summary_lines
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
from pgshard.server.base import ServerError, ServerInfo
from pgshard.settings import OPTIONS, Settings, SettingsError, import_object, resolve, temporary_env

if TYPE_CHECKING:  # imported by the fixture that uses it: a run that counts no query loads nothing of it
    from pgshard.queries import QueryCounter

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


def _quiet_our_parse_time_errors() -> None:
    """pytest 7 parses options inside an old-style hookwrapper (helpconfig's pytest_cmdline_parse), and
    pluggy >= 1.4 prints a PluggyTeardownRaisedWarning block above any error raised there, so our one
    usage line would come after five lines of noise. Silence that warning only when its cause is our own
    UsageError; set at import, because pytest restores the warning filters after each early hook."""
    if int(pytest.__version__.split(".")[0]) >= 8:  # pytest 8 uses a new-style wrapper: no warning
        return
    with contextlib.suppress(ImportError):
        from pluggy import PluggyTeardownRaisedWarning

        warnings.filterwarnings("ignore", category=PluggyTeardownRaisedWarning, message=(
            r"A plugin raised an exception during an old-style hookwrapper teardown\.\n"
            r"Plugin: helpconfig, Hook: pytest_cmdline_parse\nUsageError: pgshard: "))


_quiet_our_parse_time_errors()


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
            from pgshard.sharding import parse_shard

            parse_shard(settings.shard)
        parse_migrators(settings.migrate, settings.rootdir)  # likewise a bad pgshard_migrate line
        worker_id = os.environ.get("PYTEST_XDIST_WORKER", "main") if _is_worker_process() else "main"
        run = Run.from_handoff(settings, worker_id) if _is_worker_process() else None
        distributes = _distributes(namespace)
        if run is None:
            run = Run(settings, Run.new_run_id(), "main")
            if settings.configured:
                run.start_server(clean_up=False)  # start_background below cleans up, or worker gw0 does
                run.cleans_up = not distributes
                os.environ[HANDOFF] = run.handoff(clean_up=distributes)
        os.environ.update(run.database_env())
        if settings.redirect:  # before any conftest builds an engine or overwrites os.environ
            if run.server is None:
                raise SettingsError("pgshard_redirect needs pgshard's server in every worker; "
                                    "load pgshard as a plugin (not late with -p) and run pytest-xdist >= 3.5")
            redirect.install(settings.redirect, run.database_url())
            redirect.handle_ddl(run)
    except (SettingsError, ServerError) as exc:  # ShardError is a SettingsError
        raise _fail_usage(exc) from None
    early_config.stash[RUN] = run
    # while pytest imports the conftests and collects: the dead runs' databases, and this process's clone
    # when it will run tests itself (a warm run's first test then finds its database made)
    runs_tests = _is_worker_process() or not distributes
    run.start_background(clone=settings.eager and runs_tests and not getattr(namespace, "collectonly", False))


def _distributes(namespace: Any) -> bool:
    """Whether xdist will run the tests in workers (-n N, -n auto): then this process clones nothing. A
    wrong guess costs time only: a clone made in vain is dropped at the end, one not made is made later."""
    workers = getattr(namespace, "numprocesses", None)
    return workers not in (None, 0, "0") and not getattr(namespace, "usepdb", False)


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
    if workerinput is None:
        config.pluginmanager.register(_CommitTests(run), "pgshard-commit-tests")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(config), "pgshard-xdist")
    if run.settings.shard or run.settings.store_durations:
        try:
            config.pluginmanager.register(_ShardHooks(config, run.settings), "pgshard-shard")
        except SettingsError as exc:  # a bad --shard
            raise _fail_usage(exc) from None


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(RUN, None)
    if run is not None:
        run.finish()
        run.stop_server()


class _CommitTests:
    """Counts the db_commit tests that ran, from the reports the controller itself receives: the summary's
    "db_commit clones" line must not hinge on every worker's statistics arriving."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "setup" and report.passed and "db_commit" in report.keywords:
            self.run.commit_tests += 1


class _XdistHooks:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_xdist_setupnodes(self, config: pytest.Config, specs: Any) -> None:
        """The controller hands the template and clones to its workers: its start-up connection is done
        (or will be, closed by the start-up thread itself, which the workers need not wait for)."""
        run = self.config.stash[RUN]
        if not run.busy:
            run.close_admin()

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        stats = getattr(node, "workeroutput", {}).get("pgshard")
        if stats:
            self.config.stash[WORKER_STATS].append(stats)


# -- sharding ------------------------------------------------------------------------------------------
class _ShardHooks:
    """--shard K/N selection (identical in every xdist worker: the split is deterministic) and
    --pg-store-durations recording (in the controller, which sees every worker's reports)."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        from pgshard.sharding import DurationsRecorder, parse_shard

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
        from pgshard.sharding import load_durations, split

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
        from pgshard.faults import classify

        if classify(exc) is not None:  # a foreign fault (no CREATEDB, disk full...): makereport's one line
            raise
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
    lines = summary_lines(run.server, stats, run.stale_dropped, run.timings.get("server"), run.commit_tests,
                          run.notes)
    if lines:
        terminalreporter.write_sep("-", "pgshard")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.hookimpl(hookwrapper=True)  # not wrapper=True: pytest 7.4 (our floor) may run with a pluggy without it
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A SandboxError is advice, not a bug: show its one line instead of SQLAlchemy's stack. A fault that
    is not pgshard's own and that every later test would hit too (no CREATEDB, disk full, the server died,
    no free connection slot: faults.py) becomes one line that says what to do, and the session stops. And
    no report (terminal, -rA, junit XML) shows a password of ours: URLs carry none, but a driver that reads the
    passfile itself (asyncpg) keeps the password in objects that --showlocals prints."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    run = item.config.stash.get(RUN, None)
    if call.excinfo is not None and call.excinfo.errisinstance(SandboxError):
        report.longrepr = f"pgshard: {call.excinfo.value}"
    elif call.excinfo is not None and not call.excinfo.errisinstance(pytest.fail.Exception):
        line = run.explain(call.excinfo.value) if run is not None else None
        if line is not None:
            report.longrepr = line
            item.session.shouldstop = line
    if run is not None and (report.longrepr is not None or report.sections):
        _scrub(report, run.secrets())


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
        from pgshard.faults import classify

        if classify(exc) is not None:  # a foreign fault behind ours: pytest_runtest_makereport explains it
            raise
        message = f"pgshard: {exc}"
    pytest.fail(message, pytrace=False)  # outside the except: no chained traceback


def _session_step(request: pytest.FixtureRequest, func: Callable[[], Any]) -> Any:
    """A session fixture's failure would repeat for every later test: one line, then the session stops."""
    try:
        return _guard(func)
    except pytest.fail.Exception as exc:
        request.session.shouldstop = str(exc.msg)
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
    database: Database = _session_step(request, lambda: _ready_database(_run(request)))
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
    engine = request.getfixturevalue("_pgshard_app_engine")
    maker = _app_object(request, "sessionmaker")
    get_db = _app_object(request, "get_db")
    return (is_async_engine(engine) or (maker is not None and is_async_maker(maker))
            or (get_db is not None and is_async_callable(get_db)))


_CLIENTS_AND_SESSIONS = {"client", "async_client", "db_session", "db_connection"}


def _refuse_unshared(request: pytest.FixtureRequest, fixture: str) -> None:
    """Fixtures of one test must share one connection, or a test would silently see nothing of what
    another wrote: where that cannot be, fail at setup with the fixture to use instead."""
    if request.node.get_closest_marker("db_commit") is not None:
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


@pytest.fixture
def db_connection(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The test's connection from the app's own engine (pgshard's when it has none), inside an outer
    transaction rolled back at teardown. The app's sessionmaker (pgshard_sessionmaker) is bound to it for
    the test, in savepoint mode."""
    _refuse_in_commit_test(request, "db_connection")
    _refuse_unshared(request, "db_connection")
    engine = request.getfixturevalue("_pgshard_app_engine")
    if engine is None or is_async_engine(engine):
        engine = request.getfixturevalue("pg_engine")
    maker = _app_object(request, "sessionmaker")
    with sandbox(engine) as box:
        if maker is not None and not is_async_maker(maker):
            with rebind(maker, bind=box.connection, join_transaction_mode="create_savepoint"):
                yield box.connection
        else:
            yield box.connection


@pytest.fixture
def db_session(request: pytest.FixtureRequest) -> Iterator[Session]:
    """A Session on the test's connection: the app's commit() releases a savepoint; all rolled back after.
    With an async app (in a sync test) it runs on the app's async connection, which the client shares."""
    _refuse_in_commit_test(request, "db_session")
    _refuse_unshared(request, "db_session")
    if _app_is_async(request):
        box: AsyncSandbox = request.getfixturevalue("_pgshard_async_sandbox")
        session = box.sync_session(expire_on_commit=False)
    else:
        connection = request.getfixturevalue("db_connection")
        session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    yield session
    session.close()


_ASYNC_DRIVERS = {"psycopg": "postgresql+psycopg_async", "asyncpg": "postgresql+asyncpg"}


def _async_engine(request: pytest.FixtureRequest, database: Database) -> Any:
    """The app's async engine, or (when it has none, or pgshard_async_driver names another driver) one of
    ours on the worker's database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    engine = request.getfixturevalue("_pgshard_app_engine")
    settings = _run(request).settings
    if is_async_engine(engine):
        if "async_driver" not in settings.explicit or engine.dialect.driver == settings.async_driver:
            return engine
        url = engine.url
    else:
        url = make_url(database.url)
    url = url.set(drivername=_ASYNC_DRIVERS[settings.async_driver])
    return create_async_engine(url, poolclass=NullPool)


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
                from sqlalchemy.engine import make_url
                from sqlalchemy.ext.asyncio import create_async_engine
                from sqlalchemy.pool import NullPool

                url = make_url(database.url).set(drivername=_ASYNC_DRIVERS[run.settings.async_driver])
                stack.enter_context(rebind(maker, bind=create_async_engine(url, poolclass=NullPool)))
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


def _app_client(request: pytest.FixtureRequest, fixture: str, make: Callable[..., Any]) -> Iterator[Any]:
    """The app's get_db yields the test's sandbox session; in a db_commit test, a real session per
    request on the test's own clone (the app's sessionmaker, rebound, already points there)."""
    app = _app(request)
    get_db = _app_object(request, "get_db")
    if get_db is None:
        pytest.fail("pgshard: the client fixtures need pgshard_get_db = package.module:get_db in your pytest ini; "
                    "without it the app's requests would commit to the database for real", pytrace=False)
    base_url = _run(request).settings.base_url
    is_async = is_async_callable(get_db)
    if request.node.get_closest_marker("db_commit") is not None:
        engine = request.getfixturevalue("commit_db").engine
        maker = _app_object(request, "sessionmaker")
        if maker is not None and is_async and not _is_async_test(request):
            yield from _one_loop_client(app, base_url, maker.kw.get("bind"), make)
        elif maker is not None:  # pointed at the clone: the app's get_db is right
            yield make(app, base_url)
        elif is_async:
            pytest.fail("pgshard: an async get_db in a db_commit test needs pgshard_sessionmaker (the app's "
                        "async_sessionmaker), which pgshard points at the test's clone", pytrace=False)
        else:
            with override_dependency(app, get_db, lambda: Session(bind=engine, expire_on_commit=False)):
                yield make(app, base_url)
        return
    _refuse_unshared(request, fixture)
    if is_async and (fixture == "client" or not _is_async_test(request)):
        # A sync client, or a sync test, on an async app: every request runs in the sandbox's own loop (the
        # one db_session reaches too), each with a session of its own that joins the sandbox's connection.
        box: AsyncSandbox = request.getfixturevalue("_pgshard_async_sandbox")
        maker = _app_object(request, "sessionmaker")
        new_session = maker if maker is not None and is_async_maker(maker) else box.session_class()
        with override_dependency(app, get_db, lambda: new_session(expire_on_commit=False)):
            yield make(app, base_url, box.portal)
    else:
        session = request.getfixturevalue("async_db_session" if is_async else "db_session")
        with override_dependency(app, get_db, lambda: session, close=False):
            yield make(app, base_url)


def _one_loop_client(app: Any, base_url: str, engine: Any, make: Callable[..., Any]) -> Iterator[Any]:
    """A sync client whose requests all run in one event loop, since the async engine pools connections
    that belong to the loop they were made in; they are closed in that loop after the test."""
    from anyio.from_thread import start_blocking_portal

    with start_blocking_portal() as portal:
        try:
            yield make(app, base_url, portal)
        finally:
            if is_async_engine(engine):
                portal.call(engine.dispose)


@pytest.fixture
def client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A FastAPI TestClient (base URL pgshard_base_url) whose pgshard_get_db dependency yields the test's
    session; with an async app, every request of the test runs in one event loop."""
    yield from _app_client(request, "client", make_client)


@pytest.fixture
def async_client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An httpx.AsyncClient on the app (ASGITransport), same dependency override as ``client``."""
    yield from _app_client(request, "async_client", make_async_client)
