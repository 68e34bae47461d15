"""The server side of one pytest process's run: the server acquired (or started in a thread beside pytest's
own start-up, its URL known before it is up), handed from an xdist controller to its workers, released at the
end; and the names and URLs of this run's databases on it. ``run.Run`` builds on it (template, clones).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.engine import make_url

from pgshard.clones import worker_database_name
from pgshard.lockfile import announce
from pgshard.server import ServerLease, acquire, embedded_lease
from pgshard.server.base import ServerError, ServerInfo, passfile_secrets
from pgshard.settings import Settings, database_url, env_assignments, mask_url, placeholders

if TYPE_CHECKING:
    from pgshard.server.embedded import EmbeddedServer

HANDOFF = "PGSHARD_HANDOFF"  # controller -> xdist workers: the server and the run id
SAY_AFTER = 2.0  # seconds of waiting for the background start before the terminal is told (and when it ends)


_R = TypeVar("_R", bound="RunServer")


@dataclass
class RunServer:
    settings: Settings
    run_id: str
    worker_id: str  # "gw0"... under xdist, "main" otherwise
    server: ServerInfo | None = None
    lease: ServerLease | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # said once in the summary (a blind command cache, a repair)
    cleans_up: bool = False  # this worker drops the dead runs' databases (its controller left it to gw0)
    handoff_later: bool = False  # an xdist controller whose server start overlaps: HANDOFF set at session start
    _secrets: list[str] | None = field(default=None, repr=False)
    _url_scheme: str | None = field(default=None, repr=False)  # "" once found to be pgshard's default
    _adopted_at: datetime | None = field(default=None, repr=False)  # when this xdist worker took the server over
    _planned_url: str | None = field(default=None, repr=False)  # the server's URL while it starts (start_server)
    _server_start: threading.Thread | None = field(default=None, repr=False)  # initdb and start, in the background
    _server_done: threading.Event | None = field(default=None, repr=False)
    _server_error: ServerError | None = field(default=None, repr=False)
    # -- the server ----------------------------------------------------------------------------
    @staticmethod
    def new_run_id() -> str:
        return secrets.token_hex(4)

    def start_server(self, *, clean_up: bool = True, overlap: bool = False) -> ServerInfo | None:
        """Acquire the server for this process (controller or solo run) and clean up after dead runs
        (``clean_up=False``: start_background does that). ``overlap``: an embedded server that is not running
        yet is initialised and started in a thread while pytest imports the conftests and collects; None
        then, and its URL is known already (server_url), its port chosen before the app reads its settings.
        Whatever needs the server itself waits for it here, and gets its failure as a ServerError."""
        if self.server is None and self._server_done is not None:
            return self._started_server()
        if self.server is None:
            started = time.perf_counter()
            if overlap and self.settings.server == "embedded" and self._start_overlapped(started):
                return None
            self._take_lease(self._lease(), started)
            atexit.register(self.stop_server)  # released even when pytest exits before unconfigure
            if clean_up:
                self._drop_stale()
        return self.server

    def _lease(self, embedded: EmbeddedServer | None = None) -> ServerLease:
        try:
            return acquire(self.settings) if embedded is None else embedded_lease(embedded)
        except OSError as exc:  # a lock path that is a directory, a cache dir on a read-only filesystem
            where = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
            raise ServerError(f"cannot use the cache dir ({where}); fix that path or set pgshard_cache_dir "
                              "(PGSHARD_CACHE_DIR)") from None

    def _take_lease(self, lease: ServerLease, started: float) -> None:
        self.lease = lease
        self.server = lease.info
        self.notes.extend(lease.notes)
        self.timings["server"] = time.perf_counter() - started

    def _start_overlapped(self, started: float) -> bool:
        """start_server's background start: False when the embedded server runs already (acquiring it is
        quick) or when it cannot be planned (acquired in the foreground then, which reports why)."""
        from pgshard.server.embedded import EmbeddedServer

        try:
            embedded = EmbeddedServer.for_settings(self.settings)
            planned = embedded.plan()
        except (OSError, ServerError):
            return False
        if planned is None:
            return False
        for module in ("psycopg", "psycopg.conninfo", "psycopg.errors", "fcntl", "pgshard.faults"):
            importlib.import_module(module)  # the thread imports nothing (start_background says why)
        done = threading.Event()

        def work() -> None:
            try:
                lease = self._lease(embedded)
                if lease.info.url != planned:  # another run started it on a port of its own meanwhile
                    lease.release()
                    raise ServerError(f"the embedded server came up at {mask_url(lease.info.url)}, not at the "
                                      f"{mask_url(planned)} the app's settings were given; run again")
                self._take_lease(lease, started)
            except ServerError as exc:
                self._server_error = exc
            except Exception as exc:  # a defect: reported by the first step that needs the server
                self._server_error = ServerError(f"the embedded server did not start: {exc!r}")
            finally:
                done.set()

        self._planned_url, self._server_done = planned, done
        self._server_start = threading.Thread(target=work, name="pgshard-server-start", daemon=True)
        self._server_start.start()
        atexit.register(self.stop_server)  # which waits for the start: an interrupted run's lease is released
        return True

    def _server_settled(self, timeout: float | None = None) -> bool:
        """Wait for the background start; False when it is still at work after ``timeout``."""
        done = self._server_done
        if done is None or self._server_start is threading.current_thread():
            return True
        waited = time.perf_counter()
        if not done.wait(timeout):
            return False
        self.timings.setdefault("server_wait", time.perf_counter() - waited)
        return True

    def _started_server(self) -> ServerInfo:
        begun = time.perf_counter()
        # a first start (initdb) on a busy machine: a silent wait looks like a hang
        if not self._server_settled(SAY_AFTER):
            announce("pgshard: waiting for the embedded server to start (begun beside pytest's own start-up; "
                     "a first run here initialises its cluster)")
            self._server_settled()
            self.timings["server_wait"] = time.perf_counter() - begun
            if self.server is not None:
                announce(f"pgshard: the embedded server started in {self.timings.get('server', 0.0):.1f} s")
        if self._server_error is not None:
            raise self._server_error
        assert self.server is not None
        return self.server

    def name_server(self) -> None:
        """For a run that runs no tests (--collect-only, --fixtures...): the server's URL for the app's settings
        (pgshard_env, pgshard_redirect) with no server started; an existing server (--pg-url) is asked as usual."""
        if self.settings.server != "embedded":
            if self.settings.server == "url":
                self.start_server(clean_up=False)
            return
        from pgshard.server.embedded import EmbeddedServer

        embedded = EmbeddedServer.for_settings(self.settings)
        self._planned_url = embedded.expected_url()

    @property
    def starting(self) -> bool:
        """start_server's overlapped start has not been waited for yet."""
        return self.server is None and self._server_done is not None

    @property
    def server_url(self) -> str | None:
        """The server's admin URL: known before the server is up when start_server overlapped its start."""
        return self.server.url if self.server is not None else self._planned_url

    def _drop_stale(self) -> None:
        """Run's: drop the databases of dead runs (start_server's ``clean_up``)."""
        raise NotImplementedError

    def _before_release(self) -> bool:
        """Run's: its start-up thread settled and its admin connection closed; False: leave the lease be."""
        return True

    def stop_server(self) -> None:
        if not self._server_settled(timeout=60):  # an initdb under way is let finish: its lease is released
            return
        if not self._before_release():
            return
        if self.lease is not None:
            lease, self.lease = self.lease, None
            try:
                lease.release()
            except ServerError as exc:  # at exit, after the summary: one line, never a traceback
                print(f"pgshard: {exc}", file=sys.stderr)

    def handoff(self, *, clean_up: bool = False) -> str:
        """What the xdist workers adopt; ``clean_up``: worker gw0 drops the dead runs' databases (the
        controller then needs no connection of its own)."""
        assert self.server is not None
        data = {"pid": os.getpid(), "run_id": self.run_id, "url": self.server.url, "source": self.server.source,
                "version": self.server.version, "major": self.server.major, "fsync": self.server.fsync,
                "reflink": self.server.reflink, "clean_up": clean_up}
        return json.dumps(data)

    @classmethod
    def from_handoff(cls: type[_R], settings: Settings, worker_id: str,
                     environ: dict[str, str] | None = None) -> _R | None:
        """A worker adopts its controller's server: only when the hand-off came from our own parent
        process (an inherited variable of an unrelated outer run must not be taken)."""
        raw = (os.environ if environ is None else environ).get(HANDOFF)
        if not raw:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if data.get("pid") != os.getppid():
            return None
        server = ServerInfo(data["url"], data["source"], data["version"], int(data["major"]), bool(data["fsync"]),
                            bool(data.get("reflink")))
        run = cls(settings, data["run_id"], worker_id, server=server)
        run._adopted_at = datetime.now(timezone.utc)
        run.cleans_up = bool(data.get("clean_up")) and worker_id == "gw0"
        return run

    def secrets(self) -> list[str]:
        """The passwords this run's URLs reach through their passfile (and --pg-url's), to mask in reports."""
        if self.server is None:
            return []
        if self._secrets is None:
            found = [*passfile_secrets(self.server.url), self._user_password() or ""]
            self._secrets = sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)
        return self._secrets

    # -- names and env -------------------------------------------------------------------------
    @property
    def database_name(self) -> str:
        return worker_database_name(self.settings.prefix, self.run_id, self.worker_id)

    def database_url(self, name: str | None = None) -> str:
        """SQLAlchemy URL of this worker's database (or another of this run's), which may not exist yet."""
        url = self.server_url
        assert url is not None
        return database_url(url, name or self.database_name)

    def database_env(self, name: str | None = None) -> dict[str, str]:
        """pgshard_env assignments for this worker's database (or another of this run's)."""
        if not self.settings.env or self.server_url is None:
            return {}
        return env_assignments(self.settings.env, placeholders(self.database_url(name), self._user_password(),
                                                               self.url_scheme()))

    def url_scheme(self) -> str | None:
        """The scheme ``{url}`` carries: the app's own driver as its files tell (discover.url_driver), found
        once per process; when they cannot tell, psycopg 3, and the controller says so once."""
        if self._url_scheme is None:
            names = [line.split("=", 1)[0].strip() for line in self.settings.env if "{url}" in line]
            scheme = ""
            if names:
                from pgshard.discover import url_driver

                choice = url_driver(self.settings.rootdir, names)
                scheme = choice.scheme or ""
                if choice.warning and self.worker_id == "main":
                    announce(f"pgshard: {choice.warning}")
            self._url_scheme = scheme
        return self._url_scheme or None

    def _user_password(self) -> str | None:
        """The password given in --pg-url, for ``{password}`` (pgshard's own URLs carry none)."""
        if self.settings.server != "url" or not self.settings.url:
            return None
        with contextlib.suppress(Exception):
            return str(make_url(self.settings.url).password or "")
        return None

