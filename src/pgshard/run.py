"""One pytest process's view of a run, without pytest: which server, which template, which databases.

plugin.py only translates pytest's hooks and fixtures into calls on a ``Run``; keeping the sequencing
here lets it be used (and tested) from plain Python, and keeps plugin.py free of SQL and subprocesses.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.engine import make_url

from pgshard.admin import Admin, intents_dir
from pgshard.build import BuildLifecycle, build_fingerprint
from pgshard.clones import Clones, CloneTimes, Database, drop_stale
from pgshard.host import default_cache_dir
from pgshard.migrate import MetadataMigrator, Migrator, Watch
from pgshard.run_server import RunServer
from pgshard.server.base import ServerError, connect
from pgshard.settings import mask_url
from pgshard.steps import blind_commands, hash_globs, parse_migrators
from pgshard.summary import median, server_line
from pgshard.template import Template, TemplateResult, project_key
from pgshard.verify import check_fingerprint


@dataclass
class Run(RunServer):
    """RunServer's server and names, with what this process makes on that server: its start-up thread
    (stale runs dropped, a warm clone), the template, the worker's clone and db_commit clones."""

    template: TemplateResult | None = None
    clones: Clones | None = None
    database: Database | None = None
    stale_dropped: list[str] = field(default_factory=list)
    kept: list[Database] = field(default_factory=list)
    clone_times: CloneTimes | None = None
    wants_commit_pool: bool = False
    admin: Admin | None = None  # shared by the start-up checks, closed once the template is known
    shard_emptied: bool = False  # --shard deselected every collected test
    finished: set[str] = field(default_factory=set)  # databases this worker made and has dropped at its end
    failure: Exception | None = None  # the worker's database could not be made
    commit_tests: int = 0  # db_commit tests whose setup passed, counted from reports (controller)
    startup_charge: float = 0.0  # seconds of this process's one-time start-up inside a test's setup, not yet taken
    fault: str | None = None  # the first foreign fault's one line (faults.py): later ones repeat it
    finish_error: str | None = None  # why this worker's clones could not be dropped
    _others_at_start: set[str] | None = field(default=None, repr=False)  # databases not ours when it began
    foreign: list[str] = field(default_factory=list)  # databases the suite created on our server meanwhile
    _maker: Template | None = field(default=None, repr=False)
    _background: threading.Thread | None = field(default=None, repr=False)  # start_background's work
    _background_done: threading.Event | None = field(default=None, repr=False)
    say: Callable[[str], None] | None = field(default=None, repr=False)  # a line to the terminal, now
    _stats_reset: object = field(default=None, repr=False)  # the server's, when this worker cloned its database
    _abandoned: bool = False  # the start-up thread hung (an interrupted run): not waited for again

    # -- start-up work beside pytest's own (stale runs dropped, a warm clone) ----------------------
    def _drop_stale(self) -> None:
        done = drop_stale(self._admin(), self.settings.stale_ttl_hours)
        self.stale_dropped = done.dropped
        if done.live:
            self.notes.append(f"kept {len(done.live)} database(s) of runs on other hosts, older than "
                              f"pgshard_stale_ttl_hours ({self.settings.stale_ttl_hours:g} h), that still have "
                              f"live sessions: {', '.join(done.live)}")

    def start_background(self, *, clone: bool) -> None:
        """Start-up work that nothing needs before the first test, done in a thread while pytest imports the
        conftests and collects: dropping the databases of dead runs (when this process ``cleans_up``) and, on
        the warm path only (a sealed template: no lock, no build), cloning this process's database
        (``clone``). Whatever fails here is done again, in the foreground, by the first step that
        needs it, and fails there as it always did; every method that touches the admin connection or the
        clones waits for this thread first. A template named by importing the app is left to the main thread.

        The thread only talks to the server: everything it needs is imported, and the template named, here
        in the main thread. (A Ctrl-C can leave the interpreter's import lock held by the main thread; a
        thread that then imports waits for ever.) Its clone is dropped at exit even when pytest never gets
        to unconfigure (a conftest that fails to import, a usage error)."""
        clean_up, runs_tests = self.cleans_up, clone
        starting = self.starting  # start_server's overlapped start, not waited for yet
        if (self.server is None and not starting) or self._background is not None or not (clean_up or clone):
            return
        if starting:  # a server just initialised or started: naming the template would wait for it here
            clone = False
        if clone:
            try:
                maker = self._template_maker()
                clone = self._named_by_files_alone(maker.migrators)
                if clone:
                    maker.fingerprint()  # hashes the migrations' files, as the main thread would
            except Exception:
                clone = False  # the main thread names it again and reports why it cannot
            if not (clean_up or clone):
                return
        for module in ("psycopg", "psycopg.errors", "psycopg.sql"):  # (see above: the thread imports nothing)
            importlib.import_module(module)
        done = threading.Event()

        def work() -> None:
            try:
                if starting:
                    self._server_settled()
                    if self._server_error is not None:
                        return  # the main thread reports it
                if clean_up:
                    with contextlib.suppress(Exception):
                        self._drop_stale()
                if clone:
                    with contextlib.suppress(Exception):
                        if self._ensure_template(build=False) is not None:
                            self._worker_database()
                elif not runs_tests:  # the controller of an xdist run: its workers clone; its connection is done
                    with contextlib.suppress(Exception):
                        self._close_admin()
            finally:
                done.set()

        self._background_done = done
        self._background = threading.Thread(target=work, name="pgshard-start-up", daemon=True)
        self._background.start()
        if clone:
            atexit.register(self.finish)  # before stop_server's (atexit runs last in, first out)

    @staticmethod
    def _named_by_files_alone(migrators: list[Migrator]) -> bool:
        """Whether the template's fingerprint reads files only (alembic, sql and command steps): metadata: and
        python: steps import the app to compute it, which must happen in the main thread, after the
        conftests (which may set what the app reads at import)."""
        from pgshard.migrate import PythonMigrator

        return not any(isinstance(m, (MetadataMigrator, PythonMigrator)) for m in migrators)

    def _settle(self, timeout: float | None = None) -> bool:
        """Wait for start_background's thread; False when it is still at work after ``timeout``. Then its
        statement is cancelled, and the thread is given up on: later calls do not wait again (an interrupted
        run must exit promptly), and what it may have made is left to the next run's clean-up."""
        thread, done = self._background, self._background_done
        if thread is None or done is None or thread is threading.current_thread():
            return True
        if self._abandoned:
            return False
        if not done.wait(timeout):  # an Event, not the thread's liveness, which a Ctrl-C during join() spoils
            self._cancel_statements()
            if not done.wait(2):
                self._abandoned = True
                return False
        self._background = self._background_done = None
        return True

    def _cancel_statements(self) -> None:
        """Cancel what the start-up thread's connection is running (CREATE DATABASE waiting on a lock)."""
        for admin in (self.admin, self.clones.admin if self.clones is not None else None):
            if admin is not None:
                admin.cancel()

    @property
    def busy(self) -> bool:
        """start_background's thread is still at work (it closes the controller's connection itself)."""
        return self._background_done is not None and not self._background_done.is_set()

    def _admin(self) -> Admin:
        """One admin connection for this process's start-up (stale runs, template, then the clones), not one
        each: a connection costs a server backend's start, which a warm run would otherwise pay three times."""
        assert self.server is not None
        if self.admin is None:
            cache = self.settings.cache_dir or default_cache_dir()
            self.admin = Admin(self.server.url, self.settings.prefix, intents_dir(cache, self.server.url))
        return self.admin

    def close_admin(self) -> None:
        self._settle()
        self._close_admin()

    def _close_admin(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None

    def _before_release(self) -> bool:
        if not self._settle(timeout=1):  # as in finish(): the thread's work is not waited for at the end
            return False
        self.close_admin()
        return True
    # -- template and clones --------------------------------------------------------------------
    def ensure_template(self) -> TemplateResult:
        self._settle()
        result = self._ensure_template()
        assert result is not None
        return result

    def _ensure_template(self, build: bool = True) -> TemplateResult | None:
        """The template, built when missing; ``build=False``: None instead of building (the warm-path check)."""
        if self.template is None:
            result = self._template_maker().ensure(build=build)
            if result is None:
                return None
            self.template = result
        return self.template

    def _template_maker(self) -> Template:
        if self._maker is None:
            server = self.start_server()
            assert server is not None  # (None only for overlap=True)
            lock_dir = (self.settings.cache_dir or default_cache_dir()) / "locks"
            migrators = parse_migrators(self.settings.migrate, self.settings.rootdir)
            inputs = []
            if self.settings.fingerprint:
                digest, empty = hash_globs(self.settings.fingerprint, self.settings.rootdir)
                inputs.append(f"pgshard_fingerprint={digest}")
                self.notes += [f"pgshard_fingerprint line {pattern!r} matches no file under {self.settings.rootdir}"
                               for pattern in empty]
            else:
                self.notes += [f"pgshard_migrate step {spec!r} names no file pgshard can hash: its template is "
                               "reused until the command's text changes; list what it reads in pgshard_fingerprint"
                               for spec in blind_commands(migrators)]
            check_inputs, cannot = check_fingerprint(self.settings.check, migrators)
            inputs += check_inputs
            self.notes += cannot
            self._maker = Template(self._admin(), server, migrators, lock_dir=lock_dir, run_id=self.run_id,
                                   rebuild=self.settings.rebuild, keep=self.settings.keep_templates,
                                   env_lines=self.settings.env, url_scheme=self.url_scheme(), inputs=inputs,
                                   project=project_key(self.settings.rootdir),
                                   watch=Watch(self.settings.build_timeout, self.say),
                                   checks=self.settings.check, check_mode=self.settings.check_mode)
        return self._maker

    def worker_database(self) -> Database:
        self._settle()
        return self._worker_database()

    def _worker_database(self) -> Database:
        if self.database is None:
            template = self._ensure_template()
            assert self.server is not None and template is not None
            if self.clones is None:  # (a clone that failed in the background is made again on the same Clones)
                admin, self.admin = self._admin(), None  # the start-up connection goes on serving the clones
                self.clones = Clones(self.server.url, self.server, template.name, prefix=self.settings.prefix,
                                     run_id=self.run_id, worker_id=self.worker_id,
                                     pool_size=self.settings.commit_pool, admin=admin)
                self.clone_times = self.clones.times
            self.database = self.clones.worker_database()
            with contextlib.suppress(Exception):  # what tells a crash restart later (_server_state)
                row = self.clones.admin.conn.execute("SELECT stats_reset FROM pg_stat_bgwriter").fetchone()
                self._stats_reset = row[0] if row is not None else None
            if self.settings.server == "embedded" and self.settings.eager:  # a server nobody else creates on
                with contextlib.suppress(Exception):
                    self._others_at_start = self.clones.admin.others()
        return self.database

    # -- the app's CREATE/DROP DATABASE of a redirected name (redirect.DatabaseLifecycle) ---------------
    def create_database(self, name: str) -> bool:
        """A fresh clone of the template (empty without pgshard_migrate) under this worker's name ``name``;
        during a template build (a step re-creating the app's database), the build database afresh."""
        if build_fingerprint(name, self.settings.prefix) is not None:
            return BuildLifecycle(self.database_url(name)).create_database(name)
        self._check_ours(name)
        if self.database is None and name == self.database_name:
            self.worker_database()
            return True
        self.worker_database()
        assert self.clones is not None
        return self.clones.recreate(name)

    def drop_database(self, name: str) -> bool:
        """Drop this worker's database ``name`` (or the template being built); False when it does not exist."""
        if build_fingerprint(name, self.settings.prefix) is not None:
            return BuildLifecycle(self.database_url(name)).drop_database(name)
        self._check_ours(name)
        if self.clones is None:  # dropped by pgshard already when the app's own teardown comes after ours
            return name in self.finished
        return self.clones.drop(name)

    def ready_database(self) -> Database:
        """This worker's database, with the db_commit pool started when the collected tests need it.
        A failure is kept and raised again: the run stops, it does not rebuild once per test."""
        if self.failure is not None:
            raise self.failure
        started = time.perf_counter() if self.database is None else None
        try:
            database = self.worker_database()
        except Exception as exc:
            self.failure = exc
            raise
        if started is not None:  # server, template, clone: the run's, not the test's whose setup did it
            self.startup_charge += time.perf_counter() - started
        if self.wants_commit_pool and self.clones is not None:
            self.clones.start_pool()
        return database

    def _check_ours(self, name: str) -> None:
        if name != self.database_name and not name.startswith(self.database_name + "_t"):
            raise ServerError(f"pgshard acts only on this worker's databases ({self.database_name}...), not {name}")

    def finish(self) -> None:
        """Drop this worker's clones (or keep them, with --pg-keep). Never raises: it runs in pytest's
        session teardown, where a server that died mid-run would otherwise print a traceback wall; the
        reason goes to the summary and the next run (or `pgshard clean`) drops what is left."""
        # Still at work now, the start-up thread was needed by no test (an interrupted run, a collection error):
        # a moment, then its statement is cancelled; what it may have made is the next run's to drop
        if not self._settle(timeout=1):
            return
        with contextlib.suppress(Exception):
            self.close_admin()
        if self.clones is not None:
            clones, self.clones = self.clones, None
            if self._others_at_start is not None:
                with contextlib.suppress(Exception):
                    self.foreign = sorted(clones.admin.others() - self._others_at_start)
            self.finished.update(clones.created)
            try:
                self.kept = clones.close(keep=self.settings.keep)
            except Exception as exc:
                self.finish_error = self._cache_gone() or self.explain(exc) or mask_url(
                    " ".join(f"{type(exc).__name__}: {exc}".split()))

    def _cache_gone(self) -> str | None:
        """Why the embedded server failed at the end when its cache dir was deleted during the run."""
        if self.settings.server != "embedded":
            return None
        cache = self.settings.cache_dir or default_cache_dir()
        if cache.is_dir() and any(cache.glob("pg*-*/data/PG_VERSION")):
            return None
        return (f"the cache dir {cache} was deleted while this run used it; its server is stopped at exit and "
                "the next run starts a new one")

    # -- foreign faults -------------------------------------------------------------------------
    def explain(self, exc: BaseException) -> str | None:
        """One line for a fault that is not pgshard's own (faults.py), with this server's facts; None for
        an ordinary error. A "died" verdict is checked: a server that still answers did not die."""
        from pgshard.faults import advice, classify, crashed, environment

        steered = environment(exc, os.environ)
        if steered is not None:
            self.fault = self.fault or steered
            return steered
        if self.fault is not None and classify(exc) is not None:
            return self.fault
        fault = classify(exc)
        if fault is None or self.server is None:
            return None
        if fault.kind == "died" and not crashed(exc) and self._server_state() == "up":
            return None  # a test that ended sessions itself; a server that crashed and came back still counts
        if fault.kind == "died" and (gone := self._cache_gone()) is not None:
            self.fault = f"pgshard: the server died mid-run: {gone}"
            return self.fault
        embedded = self.settings.server == "embedded"
        cache = self.settings.cache_dir or default_cache_dir()
        self.fault = advice(fault, user=make_url(self.server.url).username or "?", server=mask_url(self.server.url),
                            cache_dir=str(cache) if embedded else None, log=self._server_log(),
                            template=self.template.name if self.template is not None else None)
        return self.fault

    def _server_state(self) -> str:
        """"down"; "crashed": it answers, but restarted after a crash since this worker cloned its database
        (a crash recovery resets the cumulative statistics, and so their reset time); else "up"."""
        assert self.server is not None
        try:
            with connect(self.server.url, timeout=3) as conn:
                row = conn.execute("SELECT stats_reset FROM pg_stat_bgwriter").fetchone()
        except Exception:
            return "down"
        if row is None or row[0] is None:
            return "up"
        if self._stats_reset is not None:
            crashed = row[0] != self._stats_reset
        else:  # crashed before this worker cloned: on our own server, a reset after the worker took it over
            crashed = (self.settings.server == "embedded" and self._adopted_at is not None
                       and isinstance(row[0], datetime) and row[0] > self._adopted_at)
        return "crashed" if crashed else "up"

    def _server_log(self) -> str | None:
        if self.settings.server != "embedded":
            return None
        try:
            from pgshard.server.embedded import EmbeddedServer

            return str(EmbeddedServer.for_settings(self.settings).logfile)
        except Exception:
            return None

    # -- reporting --------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"worker": self.worker_id}
        if self.server is not None:  # a worker that found the server itself (pgshard not configured)
            out["server"] = server_line(self.server, self.timings.get("server"))
        if self.template is not None:
            out["template"] = {"name": self.template.name, "built": self.template.built,
                               "build_seconds": self.template.build_seconds,
                               "wait_seconds": self.template.wait_seconds, "checks": list(self.template.checks),
                               "checked_at": self.template.checked_at, "check_seconds": self.template.check_seconds,
                               "findings": list(self.template.findings)}
        times = self.clone_times
        if times is not None:
            out["clone_ms"] = times.worker_clone * 1000
            out["clone_method"] = times.method
            out["commit_clones"] = len(times.commit_waits)
            if times.commit_waits:
                out["commit_wait_ms"] = median(times.commit_waits) * 1000
        out["kept"] = [db.masked_url for db in self.kept]
        if self.finish_error:
            out["finish_error"] = self.finish_error
        out["shard_emptied"] = self.shard_emptied
        out["stale_dropped"] = self.stale_dropped  # worker gw0's, when it cleaned up for its controller
        out["notes"] = self.notes
        out["foreign"] = self.foreign
        return out
