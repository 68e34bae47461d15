"""Per-worker and per-test databases: naming, the pre-warmed pool for db_commit tests, stale cleanup.

Names are deterministic (prefix, run id, worker id) so a worker can point the app's env vars at its
database before the database exists, and so two overlapping runs can never collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pgshard.admin import Admin, CloneMethod, DatabaseInfo, Marker
from pgshard.host import host_identity, pid_alive
from pgshard.server.base import ServerError, ServerInfo
from pgshard.settings import database_url, mask_url
from pgshard.template import swap_lock


@dataclass(frozen=True)
class Database:
    """A database of this run: what the ``pg_database`` fixture hands out."""

    name: str
    url: str  # SQLAlchemy URL, psycopg driver

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    def __str__(self) -> str:
        return self.masked_url

    def __repr__(self) -> str:  # tracebacks show reprs: never the password
        return f"Database({self.name}, {self.masked_url})"


# With fsync off (pgshard's embedded server) FILE_COPY writes no WAL: always the faster, and by reflink where the
# filesystem shares blocks. With fsync on, FILE_COPY pays two checkpoints whatever the size (0.02 s on tmpfs,
# about 1 s on a disk here, reflink or not) and WAL_LOG writes the whole template into the WAL (about 2-3 ms a
# MB): which wins depends on the storage (benchmarks/results/clone-methods.md), so each is timed once per
# template on its first clones and the faster kept. Before that, WAL_LOG first up to this size.
WAL_LOG_FIRST_UP_TO_BYTES = 256 << 20


def clone_method(server: ServerInfo, template_bytes: int | None = None,
                 measured: Mapping[str, float] | None = None) -> CloneMethod:
    """How to clone a template on this server: see WAL_LOG_FIRST_UP_TO_BYTES. ``measured``: seconds one clone
    of this template took by each strategy (with fsync on)."""
    if server.major < 15:
        return CloneMethod(None)
    file_copy = CloneMethod("FILE_COPY", "clone" if server.reflink else None)
    if not server.fsync:
        return file_copy
    measured = measured or {}
    if "WAL_LOG" in measured and "FILE_COPY" in measured:
        return CloneMethod("WAL_LOG") if measured["WAL_LOG"] <= measured["FILE_COPY"] else file_copy
    big = template_bytes is not None and template_bytes > WAL_LOG_FIRST_UP_TO_BYTES
    if "WAL_LOG" in measured or (big and "FILE_COPY" not in measured):
        return file_copy
    return CloneMethod("WAL_LOG")


def clone_times_file(intents: Path, template: str) -> Path:
    """Where the clone times of ``template`` on one server are kept (beside that server's intents dir)."""
    return intents.parent.parent / "clone-times" / intents.name / f"{template}.json"


def worker_database_name(prefix: str, run_id: str, worker_id: str) -> str:
    return f"{prefix}_{run_id}_{worker_id}".lower()


@dataclass
class CloneTimes:
    worker_clone: float = 0.0
    commit_clones: list[float] = field(default_factory=list)
    commit_waits: list[float] = field(default_factory=list)
    method: str = ""  # how they were cloned (CloneMethod.label)


class Clones:
    """Creates this worker's clones of the template, keeps a pool warm, and drops them all at the end."""

    def __init__(self, admin_url: str, server: ServerInfo, template: str, *, prefix: str, run_id: str,
                 worker_id: str, pool_size: int = 2, admin: Admin | None = None) -> None:
        self.server = server
        self.template = template
        self.prefix = prefix
        self.run_id = run_id
        self.worker_id = worker_id
        self.pool_size = pool_size
        self.admin = admin or Admin(admin_url, prefix)  # a given one is ours from now on: close() closes it
        self.times = CloneTimes()
        self.method: CloneMethod | None = None  # decided (nothing left to time)
        self._size: int | None = None
        self._timings = clone_times_file(self.admin.intents, template) if self.admin.intents is not None else None
        self.created: list[str] = []
        self._counter = 0
        self._names_lock = threading.Lock()
        self._ready: queue.Queue[Database] = queue.Queue()
        self._to_drop: queue.Queue[str] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool_error: BaseException | None = None

    def _marker(self, kind: str = "clone") -> Marker:
        # The template's fingerprint tells `pgshard clean --all` which templates a live run still clones from.
        fingerprint = self.template.rsplit("_tpl_", 1)[1] if "_tpl_" in self.template else ""
        return Marker(kind, self.run_id, fingerprint=fingerprint)

    def _database(self, name: str) -> Database:
        return Database(name, database_url(self.server.url, name))

    def _clone(self, admin: Admin, name: str) -> float:
        """Clone the template as ``name``; once more on a new connection when the server ended this one (a test
        that terminated every other backend): what the lost attempt left of ``name`` is dropped first."""
        from psycopg import OperationalError

        try:
            return self._clone_once(admin, name)
        except (OperationalError, ServerError):
            if not admin.lost():
                raise
        admin.close()
        admin.discard(name)
        return self._clone_once(admin, name)

    def _clone_once(self, admin: Admin, name: str) -> float:
        method = self._method(admin)
        with admin.advisory_lock(swap_lock(self.template), shared=True):  # a --pg-rebuild elsewhere waits
            seconds = admin.create(name, self._marker(), template=self.template, method=method)
        self._timed(method, seconds)
        with self._names_lock:
            if name not in self.created:
                self.created.append(name)
        return seconds

    def _method(self, admin: Admin) -> CloneMethod:
        if self.method is not None:
            return self.method
        if not self.server.fsync or self.server.major < 15:  # nothing to time: one method serves
            self.method = clone_method(self.server)
            self.times.method = self.method.label
            return self.method
        if self._size is None:  # with fsync on only, and once
            rows = admin.read("SELECT pg_database_size(%s)", (self.template,))
            self._size = int(rows[0][0]) if rows and rows[0][0] is not None else 0
        measured = self._measured()
        method = clone_method(self.server, self._size, measured)
        if {"WAL_LOG", "FILE_COPY"} <= set(measured):
            self.method = method
        self.times.method = self.times.method or method.label  # the worker's own clone's
        return method

    def _measured(self) -> dict[str, float]:
        try:
            found = json.loads(self._timings.read_text()) if self._timings is not None else {}
        except (OSError, ValueError):
            found = {}
        if not isinstance(found, dict):  # a file of another shape: timed again
            found = {}
        return {k: float(v) for k, v in found.items() if k in ("WAL_LOG", "FILE_COPY") and isinstance(v, (int, float))}

    def _timed(self, method: CloneMethod, seconds: float) -> None:
        """With fsync on, the first time of each strategy for this template, for every later run to choose by."""
        if self.method is not None or method.strategy is None or self._timings is None:
            return
        measured = self._measured()
        if method.strategy in measured:
            return
        measured[method.strategy] = seconds
        with contextlib.suppress(OSError):  # a cache dir that cannot be written: the next run times it again
            self._timings.parent.mkdir(parents=True, exist_ok=True)
            scratch = self._timings.with_name(f".{self._timings.name}.{os.getpid()}.{threading.get_ident()}")
            scratch.write_text(json.dumps(measured))
            os.replace(scratch, self._timings)

    def worker_database(self) -> Database:
        name = worker_database_name(self.prefix, self.run_id, self.worker_id)
        if self.admin.exists(name):  # same run id reused (e.g. a rerun in one process): start clean
            self.admin.drop(name, force=True)
        self.times.worker_clone = self._clone(self.admin, name)
        return self._database(name)

    def owns(self, name: str) -> bool:
        """This worker's database or one of its db_commit clones (names this run made for this worker)."""
        base = worker_database_name(self.prefix, self.run_id, self.worker_id)
        return name == base or name.startswith(base + "_t")

    def recreate(self, name: str) -> bool:
        """A fresh clone of the template under one of this worker's names; False when it already exists."""
        if not self.owns(name):
            raise ServerError(f"pgshard creates only this worker's databases, not {name}")
        if self.admin.exists(name):
            return False
        self._clone(self.admin, name)
        return True

    def drop(self, name: str) -> bool:
        """Drop one of this worker's databases now (its sessions ended); False when it does not exist."""
        if not self.owns(name):
            raise ServerError(f"pgshard drops only this worker's databases, not {name}")
        return self.admin.drop(name, force=True)

    # -- db_commit pool ----------------------------------------------------------------------------
    def _next_name(self) -> str:
        with self._names_lock:
            self._counter += 1
            return f"{worker_database_name(self.prefix, self.run_id, self.worker_id)}_t{self._counter}"

    def start_pool(self) -> None:
        """Start filling the pool in the background (idempotent)."""
        if self._thread is None and self.pool_size > 0:
            self._thread = threading.Thread(target=self._pool_loop, name="pgshard-clone-pool", daemon=True)
            self._thread.start()

    def _pool_loop(self) -> None:
        admin = self.admin.sibling()
        try:
            while not self._stop.is_set():
                worked = False
                with contextlib.suppress(queue.Empty):
                    name = self._to_drop.get_nowait()
                    try:
                        admin.drop(name, force=True)
                    except Exception:
                        if not admin.lost():
                            raise
                        admin.close()  # its connection was ended: the next one drops it
                        self._to_drop.put(name)
                    worked = True
                if not worked and self._ready.qsize() < self.pool_size:
                    name = self._next_name()
                    self.times.commit_clones.append(self._clone(admin, name))
                    self._ready.put(self._database(name))
                    worked = True
                if not worked:
                    self._wake.wait(0.5)
                    self._wake.clear()
        except BaseException as exc:  # surfaced to the next take()
            self._pool_error = exc
        finally:
            admin.close()

    def take(self) -> Database:
        """A fresh clone for one db_commit test: from the pool when one is ready, else made now."""
        self.start_pool()
        started = time.perf_counter()
        if self._pool_error is not None or self._thread is None:
            name = self._next_name()
            self._clone(self.admin, name)
            database = self._database(name)
        else:
            database = self._from_pool()
        self.times.commit_waits.append(time.perf_counter() - started)
        self._wake.set()
        return database

    def _from_pool(self, timeout: float = 120) -> Database:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(queue.Empty):
                return self._ready.get(timeout=0.2)
            if self._pool_error is not None:
                raise ServerError(f"the db_commit clone pool failed: {self._pool_error}") from None
            if time.monotonic() > deadline:
                raise ServerError(f"the db_commit clone pool produced no clone in {timeout:.0f} s; lower "
                                  "pgshard_commit_pool or check the server's load")

    def give_back(self, database: Database) -> None:
        """Drop a used db_commit clone in the background (its test's connections may linger)."""
        self._to_drop.put(database.name)
        self._wake.set()

    def close(self, keep: bool = False) -> list[Database]:
        """Stop the pool and drop every clone this worker made (unless ``keep``); returns the kept ones."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._names_lock:
            names = list(self.created)
        kept: list[Database] = []
        for name in names:
            if not self.admin.exists(name):
                continue
            if keep:
                self.admin.mark(name, self._marker("kept"))
                kept.append(self._database(name))
            else:
                self.admin.drop(name, force=True)
        self.admin.close()
        return kept


def _stale(admin: Admin, ttl_hours: float, now: float | None = None) -> list[DatabaseInfo]:
    now = time.time() if now is None else now
    host = host_identity()
    stale = []
    for db in admin.databases():
        marker = db.marker
        if marker is None or marker.kind not in ("clone", "build") or not admin.in_namespace(db.name):
            continue
        if marker.host == host:
            if not pid_alive(marker.pid):
                stale.append(db)
        elif now - marker.started > ttl_hours * 3600:
            stale.append(db)
    return stale


def stale_databases(admin: Admin, ttl_hours: float, now: float | None = None) -> list[str]:
    """Clones and half-built templates whose creator is gone: a dead pid on this host, or older than
    the TTL on another host. Templates and kept clones are never stale; unmarked databases never ours."""
    return [db.name for db in _stale(admin, ttl_hours, now)]


@dataclass
class Cleanup:
    """What a run's start did about dead runs' databases."""

    dropped: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)  # another host's, past the TTL, yet with sessions: kept


def drop_stale(admin: Admin, ttl_hours: float) -> Cleanup:
    """Drop the dead runs' databases. Only this host can prove its runs dead (their pids): another host's
    database past the TTL may still be in use (a clock skew, a clock jump, a run of over a day), so it is
    dropped only without sessions, and the server judges that in the DROP itself (no FORCE: a session that
    connects in between makes the DROP fail, never ends)."""
    from psycopg import errors

    done = Cleanup(dropped=admin.abandoned())
    host = host_identity()
    for db in _stale(admin, ttl_hours):
        here = db.marker is not None and db.marker.host == host
        try:
            if admin.drop(db.name, force=here):
                done.dropped.append(db.name)
        except errors.ObjectInUse:
            done.live.append(db.name)
        except Exception:  # gone meanwhile, no right to drop it: the next run, or `pgshard clean`, sees it again
            continue
    return done
