"""Facts about this machine that several layers need: where caches live, whether a process lives, and
an identity for "this host" that tells apart containers sharing a hostname (their pids are not ours)."""

from __future__ import annotations

import functools
import hashlib
import os
import pwd
import socket
import stat
from pathlib import Path


class UnsafeDirectory(RuntimeError):
    """A cache directory pgshard would have to trust but cannot (someone else's, or a symlink)."""


def tmpfs_dir() -> Path | None:
    """/dev/shm when it is a writable tmpfs: the data directory then lives in RAM."""
    shm = Path("/dev/shm")
    try:
        mounts = Path("/proc/mounts").read_text()
    except OSError:
        return None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == str(shm) and parts[2] == "tmpfs" and os.access(shm, os.W_OK):
            return shm
    return None


def default_cache_dir() -> Path:
    user = pwd.getpwuid(os.geteuid()).pw_name
    shm = tmpfs_dir()
    if shm is not None:
        return shm / f"pgshard-{user}"
    if os.geteuid() == 0:  # root's home is private; the server account must reach the data directory
        return Path("/var/tmp") / "pgshard-root"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pgshard"


def pid_alive(pid: int) -> bool:
    """Whether a process (of any user) runs with this pid on this machine. A zombie counts as dead: a
    run killed in a container without an init is never reaped, yet still answers ``kill(pid, 0)``."""
    if pid <= 0:  # kill(0, ...) would ask about our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): kill() is all we can tell
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


@functools.cache
def host_identity() -> str:
    """Hostname plus a short hash of the boot id and pid namespace: two CI containers with the same
    hostname (--network host) must not judge each other's pids, so they count as different hosts."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else Path(path).read_text().strip())
        except OSError:
            parts.append("")
    return f"{socket.gethostname()}/{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:8]}"


def ensure_private_dir(path: Path, mode: int, option: str) -> None:
    """Create ``path`` with ``mode``, or accept an existing one only if it is a real directory of ours
    (never chmod a directory pgshard did not create, never follow a planted symlink). Whatever the
    filesystem answers (a parent that is a file, /proc, a read-only mount) becomes one line naming ``option``."""
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
        try:
            path.mkdir(mode=mode)
            os.chmod(path, mode)  # mkdir's mode is filtered by the umask
            return
        except FileExistsError:
            info = path.lstat()
    except OSError as exc:  # a parent that is a file comes back from mkdir(parents=True) as "exists"
        reason = (f"{exc.filename} is not a directory" if isinstance(exc, (FileExistsError, NotADirectoryError))
                  and exc.filename else exc.strerror or str(exc))
        raise UnsafeDirectory(f"cannot create {path}: {reason}; set {option} to a writable directory of your "
                              "own") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{path} is not a plain directory; set {option} to a directory of your own")
    if info.st_uid != os.geteuid():
        raise UnsafeDirectory(f"{path} belongs to another user (uid {info.st_uid}); set {option} to a directory "
                              "of your own")


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22): with the pid
    it names one process for good, so a recycled pid is never taken for the process that wrote it down.
    None without /proc or when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[19] if len(fields) > 19 else None


def process_identity(pid: int | None = None) -> str:
    """``pid:start`` of a process (this one by default), as leases and lock files record it."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{process_start(pid) or ''}"


def identity_alive(identity: str) -> bool:
    """Whether the process an identity names still runs: same pid and, where /proc tells, same start."""
    pid_text, _, start = identity.strip().partition(":")
    if not pid_text.isdigit() or not pid_alive(int(pid_text)):
        return False
    # no start time recorded: trusted only where /proc cannot tell (else any live stranger would count)
    return process_start(int(pid_text)) in (None, start) if start else process_start(int(pid_text)) is None
