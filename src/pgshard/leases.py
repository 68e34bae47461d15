"""Who uses the embedded server, and the watchdog that stops it once nobody does.

Every process that uses the server holds a lease: a file named by its pid holding ``pid:start time`` (from
/proc), so a recycled pid or an unrelated live process never counts as a user. The last one out stops the
server; when a whole run is SIGKILLed nobody is left to do that, so a watchdog does: a small process in a
session of its own (outside the run's process group, so the same kill does not reach it) that wakes once a
second, and stops the server once no lease is alive and the linger (``pgshard_linger``) has passed. It exits
as soon as its job is done: server stopped or gone, made persistent (``pgshard server start``), or replaced.

This module imports nothing heavy (the watchdog starts in ~30 ms) and never signals a process unless it is
the postmaster of this data directory: same owner as the directory, and its command line names it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pgshard.host import identity_alive, pid_alive, process_identity
from pgshard.lockfile import HolderLock, LockError, LockTimeout

WATCH_INTERVAL = 1.0  # seconds between the watchdog's checks
_SPAWNED: list[subprocess.Popen[bytes]] = []  # kept referenced: no ResourceWarning, reaped by subprocess


class Cluster:
    """The files of one embedded server's home through which its users and its watchdog agree."""

    def __init__(self, home: Path, lock_path: Path) -> None:
        self.home = home
        self.datadir = home / "data"
        self.leases = home / "leases"
        self.persistent_flag = home / "persistent"
        self.watchdog_file = home / "watchdog"
        self.linger_file = home / "linger"
        self.lock = HolderLock(lock_path, "starting or stopping the embedded server", timeout=300)

    # -- the postmaster ----------------------------------------------------------------------------
    def pidfile(self) -> tuple[int | None, list[str]]:
        """postmaster.pid as (pid, lines); (None, []) when absent. PostgreSQL writes it in steps, so
        the pid or later lines may be missing for a moment."""
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None, []
        return (int(lines[0]) if lines and lines[0].strip().isdigit() else None), lines

    def is_postmaster(self, pid: int) -> bool:
        """Whether ``pid`` is a live postmaster of this data directory: it runs as the directory's owner
        and its command line (which the postmaster never rewrites) names the directory. A pid file naming
        anything else (a recycled pid, another user's process) is stale, and that process is not ours."""
        if not pid_alive(pid):
            return False
        proc = Path(f"/proc/{pid}")
        if not Path("/proc/self").exists():  # no procfs (macOS): the pid is all we can tell
            return True
        try:
            owner = proc.stat().st_uid
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            datadir = self.datadir.stat()
        except OSError:
            return False
        if owner != datadir.st_uid or not argv or Path(os.fsdecode(argv[0])).name not in ("postgres", "postmaster"):
            return False
        return os.fsencode(str(self.datadir)) in argv or os.fsencode(str(self.datadir.resolve())) in argv

    def stop_orphan(self, pid: int | None) -> bool:
        """Our postmaster, its data directory deleted under it (a cache dir removed mid-run): its pid file is
        gone, so the pid it had when we started it is checked against its command line, which names the
        directory it was started on, and it is shut down at once (there is nothing left to write to).
        True if it was ours and running."""
        if pid is None or not pid_alive(pid):
            return False
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if not argv or Path(os.fsdecode(argv[0])).name not in ("postgres", "postmaster") or \
                os.fsencode(str(self.datadir)) not in argv:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)
        return True

    def postmaster(self) -> int | None:
        pid = self.pidfile()[0]
        return pid if pid is not None and self.is_postmaster(pid) else None

    def running_port(self) -> int | None:
        """The port of a live postmaster of our data directory, from postmaster.pid."""
        pid, lines = self.pidfile()
        if pid is None or len(lines) < 4 or not lines[3].strip().isdigit() or not self.is_postmaster(pid):
            return None
        return int(lines[3])

    def stop(self, timeout: float = 60) -> bool:
        """Fast shutdown (SIGINT, as pg_ctl -m fast), only ever sent to our own postmaster; True if it ran."""
        pid = self.postmaster()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        wait_for(lambda: not pid_alive(pid), timeout, "PostgreSQL did not stop")
        return True

    # -- leases ------------------------------------------------------------------------------------
    def add_lease(self) -> None:
        self.leases.mkdir(exist_ok=True)
        (self.leases / str(os.getpid())).write_text(process_identity())

    def drop_lease(self) -> None:
        (self.leases / str(os.getpid())).unlink(missing_ok=True)

    def live_leases(self) -> list[Path]:
        """Leases of processes that still run (same pid and start time); the others are removed."""
        alive = []
        for lease in self.leases.glob("*"):
            try:
                identity = lease.read_text().strip() or lease.name  # an older pgshard wrote the pid only
            except OSError:
                continue
            if lease.name.isdigit() and identity.split(":")[0] == lease.name and identity_alive(identity):
                alive.append(lease)
            else:
                lease.unlink(missing_ok=True)
        return alive

    @property
    def persistent(self) -> bool:
        return self.persistent_flag.exists()

    def linger(self) -> float:
        try:
            return max(0.0, float(self.linger_file.read_text()))
        except (OSError, ValueError):
            return 0.0

    # -- the watchdog ------------------------------------------------------------------------------
    def ensure_watchdog(self, linger: float) -> None:
        """Record the linger of the latest user and make sure one watchdog watches (call under the lock)."""
        self.linger_file.write_text(str(linger))
        with contextlib.suppress(OSError):
            if identity_alive(self.watchdog_file.read_text()):
                return
        import pgshard

        package_root = str(Path(pgshard.__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen([sys.executable, "-m", "pgshard.leases", str(self.home), str(self.lock.path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd="/", env=env, start_new_session=True, close_fds=True)
        _SPAWNED.append(proc)
        self.watchdog_file.write_text(process_identity(proc.pid))

    def watch(self, interval: float = WATCH_INTERVAL, give_up: float = 300) -> str:
        """The watchdog's loop; returns why it ended. It never outlives its job: it ends when its home is
        removed, when it is replaced, and after ``give_up`` seconds of errors in a row."""
        me = process_identity()
        idle_since: float | None = None
        failing_since: float | None = None
        while True:
            time.sleep(interval)
            if not self.home.is_dir():  # pgshard clean --server, or a test's cache removed
                return "home removed"
            try:
                with self.lock:
                    try:
                        if self.watchdog_file.read_text() != me:
                            return "replaced"
                    except OSError:
                        return "replaced"
                    since = time.monotonic() if idle_since is None else idle_since
                    why = self._watch_step(since)
                    failing_since = None
                    if why in ("busy", "idle"):
                        idle_since = None if why == "busy" else since
                        continue
                    self.watchdog_file.unlink(missing_ok=True)
                    return why
            except LockTimeout:
                continue
            except LockError:  # the lock file cannot be opened: nothing left to watch over
                return "lock unusable"
            except Exception:  # a slow stop, a lock held long: try again on the next tick, for a while
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > give_up:
                    return "giving up"

    def _watch_step(self, idle_since: float) -> str:
        if self.postmaster() is None:
            return "server gone"
        if self.persistent:
            return "persistent"
        if self.live_leases():
            return "busy"
        if time.monotonic() - idle_since >= self.linger():
            self.stop()
            return "stopped"
        return "idle"


def wait_for(done: Callable[[], bool], timeout: float, message: str) -> None:
    """Poll in 10 ms steps (pg_ctl's own wait polls in 100 ms steps)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} within {timeout:.0f} s")
        time.sleep(0.01)


def main(argv: list[str]) -> int:
    """``python -m pgshard.leases HOME LOCK``: the watchdog, started by the server's first user."""
    home, lock = Path(argv[0]), Path(argv[1])
    with contextlib.suppress(KeyboardInterrupt):
        Cluster(home, lock).watch()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
