"""pytest hooks only: this module wires the layers together and holds no SQL.

Roles: the controller (xdist's main process, or the one process without xdist) acquires the server once
and hands it to the workers through the environment; each worker builds or reuses the template and
clones its own database; each test gets a sandbox. The fixtures live in fixtures.py (re-exported here,
where pytest looks for them), --shard's hooks in sharding.py. See README.md and DESIGN.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Generator
from typing import Any

import pytest

from pgshard import redirect
from pgshard.clients import AppRequests, async_client, client  # noqa: F401  (re-exported, as below)
from pgshard.fixtures import (  # noqa: F401  (re-exported: pytest collects fixtures from the plugin module)
    COMMIT_TEST,
    RUN,
    _pgshard_app_engine,
    _pgshard_async_sandbox,
    _pgshard_db_commit,
    async_db_session,
    commit_db,
    db_connection,
    db_session,
    message_of,
    pg_database,
    pg_engine,
    pg_server,
    pg_template,
    query_counter,
    ready_database,
)
from pgshard.lockfile import set_announcer
from pgshard.migrate import MigrationError
from pgshard.run import Run
from pgshard.run_server import HANDOFF
from pgshard.sandbox import SandboxError
from pgshard.server.base import ServerError
from pgshard.settings import OPTIONS, Settings, SettingsError, resolve
from pgshard.steps import parse_migrators
from pgshard.summary import summary_lines

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
            default = "" if "default" in opt.help or opt.default is None else f"; default: {opt.default}"
            text = f"{opt.help} (env {opt.env}{str(default).lower()})" if opt.env else opt.help
            try:
                parser.addini(opt.ini, text, type=_INI_TYPES[opt.kind], default=None)
            except (AssertionError, ValueError):  # pytest < 8.4 has no int type: read as a string
                parser.addini(opt.ini, text, type="string", default=None)


_INI_TYPES: dict[str, Any] = {"lines": "linelist", "bool": "bool", "int": "int", "str": "string"}
_INI_WANTS = {"bool": "true or false", "int": "a whole number"}


def _settings(config: pytest.Config, namespace: Any) -> Settings:
    cli = {opt.name: getattr(namespace, f"pgshard_{opt.name}", None) for opt in OPTIONS if opt.cli}

    def ini(name: str) -> Any:
        try:
            return config.getini(name)
        except (ValueError, TypeError, pytest.UsageError) as exc:  # pytest's conversion of a bool or int key
            kind = next(opt.kind for opt in OPTIONS if opt.ini == name)
            raise SettingsError(f"{name} must be {_INI_WANTS.get(kind, 'text')} ({exc})") from None

    return resolve(cli, os.environ, ini, config.rootpath)


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
            _check_config(early_config, settings)
            run = Run(settings, Run.new_run_id(), "main")
            if settings.eager and _runs_no_tests(namespace) and not distributes:
                run.name_server()  # the app's settings get their URL; no server is started to list or collect
            elif settings.eager:  # else lazy: the first pgshard fixture starts it (PGSHARD_* variables alone do not)
                # start_background below cleans up, or worker gw0 does; a cold embedded server starts in a
                # thread while pytest imports and collects (its URL is known now: waited for at session start
                # by xdist's controller, which hands it to the workers, after collection by a serial run)
                run.start_server(clean_up=False, overlap=True)
                run.cleans_up = not distributes
                if run.server is not None:
                    os.environ[HANDOFF] = run.handoff(clean_up=distributes)
                else:  # handed to the workers at session start, however soon the thread is done
                    run.handoff_later = distributes
        os.environ.update(run.database_env())
        if settings.redirect:  # before any conftest builds an engine or overwrites os.environ
            if run.server_url is None:
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


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """xdist's controller starts its workers at session start: the server they are handed must be up."""
    run = session.config.stash.get(RUN, None)
    if run is not None and run.handoff_later:
        run.handoff_later = False
        _server_ready(run)
        os.environ[HANDOFF] = run.handoff(clean_up=True)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """A serial run's overlapped server start, waited for before the first test: its failure is one line."""
    run = session.config.stash.get(RUN, None)
    if run is not None and run.starting:
        _server_ready(run)


def _server_ready(run: Run) -> None:
    try:
        run.start_server()
    except ServerError as exc:
        raise _fail_usage(exc) from None


def _check_config(config: pytest.Config, settings: Settings) -> None:
    """Mistakes a first try makes, each one line before anything starts (checks.py): once, in the process
    that starts the run (its xdist workers read the same files)."""
    from pgshard import checks

    inipath = getattr(config, "inipath", None)
    if inipath is not None:
        checks.unknown_keys(checks.keys_of(inipath), inipath.name)
    checks.config_files(inipath)
    roots = [str(config.rootpath), *(str(p) for p in config.getini("pythonpath") or ())]
    for option in checks.TARGETS:
        value = getattr(settings, option)
        if value:
            checks.target(option, value, roots)


def _runs_no_tests(namespace: Any) -> bool:
    """--collect-only, --markers, --fixtures, --fixtures-per-test: pytest lists, it runs nothing."""
    return any(getattr(namespace, name, False) for name in ("collectonly", "markers", "showfixtures",
                                                            "show_fixtures_per_test"))


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
    run.say = lambda line: _say(config, line)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and run.server is None:  # a worker without hand-off: lazy, keyed by run uid
        run.run_id = str(workerinput["testrunuid"])[:8]
        run.worker_id = str(workerinput["workerid"])
    config.stash[WORKER_STATS] = []
    if workerinput is None:
        config.pluginmanager.register(_CommitTests(run), "pgshard-commit-tests")
    if run.settings.app and run.settings.get_db:
        config.pluginmanager.register(AppRequests(), "pgshard-app-requests")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(config), "pgshard-xdist")
    if run.settings.shard or run.settings.store_durations:
        from pgshard.sharding import ShardHooks

        try:
            hooks = ShardHooks(config, run, lambda: config.stash.get(WORKER_STATS, []))
        except SettingsError as exc:  # a bad --shard
            raise _fail_usage(exc) from None
        config.pluginmanager.register(hooks, "pgshard-shard")


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



@pytest.hookimpl(trylast=True)  # after the project's own hooks, which may mark tests db_commit
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each db_commit test gets its clone's fixture first among its function-scoped fixtures (where an
    autouse one of ours would be), and no other test gets it: a test pays only for what it uses."""
    run = config.stash[RUN]
    run.wants_commit_pool = False
    for item in items:
        commit = item.stash[COMMIT_TEST] = item.get_closest_marker("db_commit") is not None
        names = getattr(item, "fixturenames", None)
        run.wants_commit_pool |= commit
        if commit and isinstance(names, list):  # there already when the test asks for commit_db: moved up
            with contextlib.suppress(ValueError):
                names.remove("_pgshard_db_commit")
            names.insert(_first_function_scoped(item, names), "_pgshard_db_commit")


def _first_function_scoped(item: pytest.Item, names: list[str]) -> int:
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for index, name in enumerate(names):
        found = definitions.get(name)
        if found and getattr(found[-1], "scope", "function") == "function":
            return index
    return len(names)


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
        ready_database(run)
        return
    except (SettingsError, ServerError, MigrationError) as exc:
        from pgshard.faults import classify

        if classify(exc) is not None:  # a foreign fault (no CREATEDB, disk full...): makereport's one line
            raise
        message = message_of(exc, item.config)
        elsewhere = isinstance(exc, MigrationError) and exc.elsewhere
    item.session.shouldstop = message.splitlines()[0]
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
                          run.notes, server_waited=run.timings.get("server_wait"),
                          verbose=config.getoption("verbose") > 0)
    if config.getoption("verbose") <= -2:  # -qq: only what the user must act on (a repair, a clone kept live...)
        lines = list(dict.fromkeys([*run.notes, *(note for s in stats for note in s.get("notes", []))]))
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
    if run is not None and run.startup_charge and call.when == "setup":
        # the run's start-up is not this test's: durations files (pytest-split's, --pg-store-durations) and
        # --durations get the test's own setup time; the summary reports the start-up
        report.duration = max(0.0, report.duration - run.startup_charge)
        run.startup_charge = 0.0
    if call.excinfo is not None and call.excinfo.errisinstance(SandboxError):
        report.longrepr = f"pgshard: {call.excinfo.value}"
    elif call.excinfo is not None and not call.excinfo.errisinstance(pytest.fail.Exception):
        line = run.explain(call.excinfo.value) if run is not None else None
        if line is not None:
            report.longrepr = line
            item.session.shouldstop = line
    if run is not None and (report.longrepr is not None or report.sections):
        _scrub(report, run.secrets())


def _say(config: pytest.Config, line: str) -> None:
    """A line to the terminal while a test or fixture runs (a template build's progress): past the output
    capture, on the process's own stderr (an xdist worker's is its controller's)."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


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


