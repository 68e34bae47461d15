"""The embedded server's cluster on disk and its postmaster: initdb'd into a home in the cache dir, its
password kept in a passfile, started, stopped, repaired when the cache is damaged, and its facts (version,
fsync) remembered for the postmaster that has them. Who may use it, and when it stops, is ``embedded``'s job.

Why the privilege drop: initdb and postgres refuse to run as root. As root we run them as ``postgres``
(or ``nobody``) through subprocess's ``user=``/``group=``; we only ever create and chown our own
directories, and copy binaries that live under a private directory (pyenv under /root) to a place that
user can reach. Nobody else's permissions change and no user is added.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlencode

from pgshard.host import default_cache_dir, pid_alive
from pgshard.leases import Cluster, wait_for
from pgshard.server.base import (
    FACTS_FILE,
    REFLINK_FROM_MAJOR,
    ServerError,
    ServerInfo,
    describe,
    supports_reflink,
)
from pgshard.server.binaries import (
    find_binaries,
    free_port,
    port_free,
    reachable_copy,
    run_as_for_root,
    run_binary,
    traversable_by_others,
    why,
)
from pgshard.settings import passfile_passwords

SUPERUSER = "pgshard"

_TUNING = """
# --- pgshard: a throwaway server tuned for tests (durability off, loopback only) ---
fsync = off
synchronous_commit = off
full_page_writes = off
listen_addresses = '127.0.0.1'
unix_socket_directories = '{sockdir}'
unix_socket_permissions = 0700
max_connections = 300
shared_buffers = 128MB
max_locks_per_transaction = 256
log_min_messages = warning
log_line_prefix = '%m [%p] %d '
"""



class DataDirectory:
    """One PostgreSQL cluster in ``<cache>/pg<major>-<hash>/`` (the hash of its binaries' path): its files,
    its initdb, its start and stop. Not locked here: the caller holds the home's lock."""

    def __init__(self, pg_bin: str | None = None, cache_dir: Path | None = None) -> None:
        self.run_as = run_as_for_root()
        self.bindir, self.origin = find_binaries(pg_bin)
        self.major = self._major_version()
        cache = cache_dir or default_cache_dir()
        key = hashlib.sha256(str(self.bindir.resolve()).encode()).hexdigest()[:8]
        self.home = cache / f"pg{self.major}-{key}"
        self.cluster = Cluster(self.home, cache / f"pg{self.major}-{key}.lock")
        self.datadir = self.cluster.datadir
        self.sockdir = self.home / "run"
        self.secret_file = self.home / "secret.json"  # the port; the password lives only in the passfile
        self.passfile = self.home / "passfile"
        self.facts_file = self.home / FACTS_FILE  # the running server's version and fsync (_facts)
        self.logfile = self.sockdir / "server.log"
        self.notes: list[str] = []  # what the user should hear once (a cache repaired)
        self._cache = cache
        self._planned_port: int | None = None  # plan(): the port the app was told before the server started

    # -- facts -------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        who = f", as {self.run_as.name}" if self.run_as else ""
        return f"embedded PostgreSQL {self.major} ({self.origin}: {self.bindir}{who})"

    def _major_version(self) -> int:
        out = subprocess.run([str(self.bindir / "pg_ctl"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
        match = re.search(r"(\d+)", out)
        if not match:
            raise ServerError(f"cannot tell the version of {self.bindir / 'pg_ctl'}: {out.strip()!r}")
        return int(match.group(1))

    def _secret(self) -> dict[str, object]:
        try:
            loaded: dict[str, object] = json.loads(self.secret_file.read_text())
            return loaded
        except (OSError, ValueError):
            return {}

    def _write_private(self, path: Path, text: str) -> None:
        """Atomically, 0600, owned by the user running pgshard (as root: not the server account)."""
        fd, tmp = tempfile.mkstemp(dir=self.home, prefix=f".{path.name}")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)  # mkstemp made it 0600

    def url(self, port: int) -> str:
        """No password in it: libpq, psycopg2 and asyncpg read it from the passfile the URL names, so no
        traceback, --showlocals or junit XML can print it (and ~/.pgpass of the user stays in charge of
        every other server)."""
        query = urlencode({"passfile": str(self.passfile)})
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/postgres?{query}"

    def running_port(self) -> int | None:
        """The port of a live postmaster of our data directory (never a stranger named by a stale pid file)."""
        return self.cluster.running_port()

    # -- processes -----------------------------------------------------------------------------
    def _run(self, args: Sequence[str], *, detach: bool = False, timeout: float = 120, stdin: str = "") -> str:
        return run_binary(args, self.run_as, self.home, detach=detach, timeout=timeout, stdin=stdin)

    def _own(self, path: Path, mode: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
        if self.run_as:
            os.chown(path, self.run_as.uid, self.run_as.gid)

    def _prepare_binaries(self) -> None:
        if self.run_as and not traversable_by_others(self.bindir):
            self.bindir = reachable_copy(self.bindir, self.major, self._cache)

    def _initdb(self) -> None:
        self._own(self.sockdir, 0o700)
        shutil.rmtree(self.datadir, ignore_errors=True)
        self._own(self.datadir, 0o700)
        password = self._password()
        pwfile = self.sockdir / "initdb.pw"  # read by initdb as the server account, removed right after
        pwfile.write_text(password + "\n")
        os.chmod(pwfile, 0o600)
        if self.run_as:
            os.chown(pwfile, self.run_as.uid, self.run_as.gid)
        try:
            self._run([str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", SUPERUSER,
                       "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C",
                       "--no-sync", "--no-instructions"])
        except ServerError as exc:
            if "No space left" not in str(exc):
                raise
            raise ServerError(f"{exc}; free space in {self._cache} or set pgshard_cache_dir (PGSHARD_CACHE_DIR) "
                              "to a larger filesystem") from None
        finally:
            pwfile.unlink(missing_ok=True)
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(_TUNING.format(sockdir=str(self.sockdir).replace("'", "''")))
        # any host/port/database, user pgshard: only URLs naming this file reach for it
        self._write_private(self.passfile, f"*:*:*:{SUPERUSER}:{password}\n")
        self._write_private(self.secret_file, json.dumps({"port": self._secret().get("port") or free_port()}))

    def _password(self) -> str:
        """The password the passfile holds, for the cluster to get: plan() writes one before initdb or a
        repair, so that pgshard_env's ``{password}``, given to the app while the server starts, is the one
        that opens it. A new one when the passfile has none of ours (only URL-safe ones are taken: the
        password goes into a statement)."""
        return self._kept_password() or secrets.token_urlsafe(24)

    def _kept_password(self) -> str | None:
        found = passfile_passwords(str(self.passfile))
        return found[0] if found and re.fullmatch(r"[A-Za-z0-9_-]{16,}", found[0]) else None

    def _initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file() and self.passfile.is_file()

    def _damage(self) -> str | None:
        """Why an initialised data directory cannot start (files a cluster always has are missing)."""
        for name in ("global/pg_control", "postgresql.conf", "pg_hba.conf", "base", "pg_wal"):
            if not (self.datadir / name).exists():
                return f"{name} is missing"
        return None

    def _start(self) -> int:
        secret = self._secret()
        port = int(str(secret.get("port", 0))) or free_port()
        if not port_free(port):
            if self._planned_port == port:  # the app's settings name it already: another port would miss it
                raise ServerError(f"port {port}, planned for the embedded server while pytest started, was taken "
                                  "by another process meanwhile; run again (pgshard picks a free port)")
            port = free_port()
        self._own(self.sockdir, 0o700)
        stale_pid = self.cluster.pidfile()[0]
        if stale_pid is not None:  # not our live postmaster (running_port said so): a stale file, not a process
            (self.datadir / "postmaster.pid").unlink(missing_ok=True)
            stale_pid = None
        log_start = self.logfile.stat().st_size if self.logfile.exists() else 0
        try:  # -W and our own 10 ms poll: pg_ctl's -w polls in 100 ms steps
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-W",
                       "-o", f"-p {port}", "start"], detach=True)
            launched = time.monotonic()
            self._wait(lambda: self._started(time.monotonic() - launched, stale_pid), "start")
        except ServerError as exc:
            raise ServerError(f"{exc}{self._log_since(log_start)}; server log: {self.logfile}") from None
        if secret.get("port") != port:
            self._write_private(self.secret_file, json.dumps({**secret, "port": port}))
        return port

    def _log_since(self, offset: int) -> str:
        try:
            with self.logfile.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        reason = why(text, keep=2)
        return f": {reason}" if reason else ""

    def _postmaster_status(self, stale_pid: int | None = None) -> str | None:
        """The status line PostgreSQL keeps in postmaster.pid ("starting", "ready", "stopping"); "dead"
        when the pid it names has exited (a crashed server's file, ``stale_pid``, is not ours to judge:
        the new postmaster replaces it); None before the file exists."""
        pid, lines = self.cluster.pidfile()
        if not lines or (pid is not None and pid == stale_pid):
            return None
        if pid is not None and not pid_alive(pid):
            return "dead"
        return lines[7].strip() if len(lines) > 7 else "starting"

    def _started(self, seconds: float, stale_pid: int | None) -> bool:
        """Ready, or raise when the postmaster is gone or never wrote its pid file (its log says why)."""
        status = self._postmaster_status(stale_pid)
        if status == "ready":
            return True
        if status == "dead" or (status is None and seconds > 10):
            raise ServerError("PostgreSQL exited while starting")
        return False

    def _wait(self, done: Callable[[], bool], what: str, timeout: float = 60) -> None:
        try:
            wait_for(done, timeout, f"PostgreSQL did not {what}")
        except TimeoutError as exc:
            raise ServerError(str(exc)) from None

    def stop(self) -> None:
        """Fast shutdown of our own postmaster (a pid file naming any other process is left alone)."""
        try:
            self.cluster.stop()
        except TimeoutError as exc:
            raise ServerError(f"{exc}; server log: {self.logfile}") from None

    def _repair(self, reason: str) -> None:
        """The data directory is a cache: re-create it (its server stopped first), and say so once."""
        self.notes.append(f"the embedded server's data directory {self.datadir} was damaged ({reason}); "
                          "re-created it (templates are rebuilt on first use)")
        self.stop()
        self._initdb()

    def _new_password(self, reason: str) -> None:
        """The cluster is sound but its passfile is gone or opens it no more (a password changed in place, a
        passfile of another cluster): give the role a new password in a single-user backend, the server
        stopped, and write the passfile anew. Templates and kept clones stay; nothing is re-created."""
        self.notes.append(f"the embedded server's passfile {self.passfile} {reason}; gave the role {SUPERUSER} "
                          "a new password (its databases are unchanged)")
        self.stop()
        password = self._password()  # URL-safe: no quote to escape in the statement
        self._run([str(self.bindir / "postgres"), "--single", "-D", str(self.datadir), "-c", "log_min_messages=fatal",
                   "postgres"], stdin=f"ALTER ROLE {SUPERUSER} PASSWORD '{password}'\n")
        self._write_private(self.passfile, f"*:*:*:{SUPERUSER}:{password}\n")
        self.facts_file.unlink(missing_ok=True)

    def _ensure_running(self) -> int:
        port = self.running_port()
        if port is not None:
            return port
        damage = self._damage()
        if damage:
            self._repair(damage)
        try:
            return self._start()
        except ServerError as exc:
            cause = _CACHE_DAMAGE.search(str(exc))
            if cause is None:
                raise
            self._repair(cause.group(0))
            return self._start()

    def _facts(self, port: int) -> ServerInfo:
        """Version and fsync as a connection to this very postmaster, with this very passfile, found them
        (a warm run, and an xdist controller, then connect to nothing); else asked, which also proves that
        the passfile opens the cluster."""
        pid, lines = self.cluster.pidfile()
        try:
            stat = self.passfile.stat()
        except OSError:
            stat = None
        key = f"{pid}:{lines[2] if len(lines) > 2 else ''}:{port}:" + (
            f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}" if stat else "")
        try:
            cached = json.loads(self.facts_file.read_text())
            if pid is not None and stat is not None and cached["key"] == key:
                return ServerInfo(self.url(port), self.source, str(cached["version"]), int(cached["major"]),
                                  bool(cached["fsync"]), bool(cached["reflink"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        info = describe(self.url(port), self.source)
        if info.major >= REFLINK_FROM_MAJOR:  # clones by reflink where the data directory's filesystem can
            info = dataclasses.replace(info, reflink=supports_reflink(self.datadir.parent))
        with contextlib.suppress(OSError):
            self._write_private(self.facts_file, json.dumps({"key": key, "version": info.version,
                                                             "major": info.major, "fsync": info.fsync,
                                                             "reflink": info.reflink}))
        return info


# Log lines of a start that failed because the cache itself is damaged (re-creating it is the cure)
_CACHE_DAMAGE = re.compile(r"could not open file \"global/pg_control\"[^;]*|incorrect checksum in control file|"
                           r"syntax error in file \"[^\"]*\.conf\"|configuration file \"[^\"]*\" contains errors|"
                           r"database files are incompatible with server|could not locate a valid checkpoint "
                           r"record|invalid data in file \"[^\"]+\"|is not a valid data directory")
