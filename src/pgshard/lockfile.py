"""A lock file that says who holds it: the server start (up to 300 s) and a template build (up to 30 min)
are long waits, and a silent one looks like a hang. The holder writes its pid, start time and what it does
into the lock file itself (one file, no side file to get out of step); a waiter reads it and says so once,
after a few seconds.

Why our own flock instead of filelock's: per-fingerprint lock files must be removed when done (they piled up
to 50 a day). Unlinking a lock file while others wait on it is only safe if every acquirer checks, once it
holds the lock, that the file it locked is still the one at the path (same inode); filelock does not.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from pgshard.host import identity_alive, process_identity

ANNOUNCE_AFTER = 3.0  # seconds of waiting before we say who holds the lock


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_announcer: Callable[[str], None] = _stderr


def announce(line: str) -> None:
    """Say ``line`` where the user sees it now (the terminal, through pytest's capture when set)."""
    _announcer(line)


def set_announcer(announce: Callable[[str], None]) -> Callable[[str], None]:
    """Where "waiting for ..." lines go (pytest passes a writer that bypasses output capture); returns the
    previous one so a caller can restore it."""
    global _announcer
    previous, _announcer = _announcer, announce
    return previous


class LockError(RuntimeError):
    """The lock file cannot be used (a directory, no permission): one line naming the file."""


class LockTimeout(LockError):
    """Waited the whole timeout; the message names the holder and the file."""


def holder(path: Path) -> dict[str, object] | None:
    """What the process holding ``path`` wrote into it (pid, purpose, since), if it is still alive."""
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not identity_alive(str(data.get("identity", ""))):
        return None
    return data


def describe_holder(path: Path) -> str:
    found = holder(path)
    if found is None:
        return "another process"
    since = time.time() - float(str(found.get("since", time.time())))
    return f"pid {found.get('pid')} ({found.get('purpose')}, for {since:.0f} s)"


class HolderLock:
    """An exclusive flock on ``path``, re-entrant within one object. ``remove``: unlink the file on release
    (the next acquirer of the old inode notices and retries on the new file)."""

    def __init__(self, path: Path, purpose: str, *, timeout: float, remove: bool = False,
                 announce_after: float = ANNOUNCE_AFTER) -> None:
        self.path = path
        self.purpose = purpose
        self.timeout = timeout
        self.remove = remove
        self.announce_after = announce_after
        self._fd: int | None = None
        self._depth = 0
        self.waited = 0.0

    def _try(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise LockError(f"cannot use the lock file {self.path}: {exc.strerror or exc}; remove it or set "
                            "pgshard_cache_dir to a directory of your own") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # its holder removed it as we locked it: take the new file
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def acquire(self) -> float:
        """Block until held; returns the seconds waited. Raises LockTimeout naming the holder."""
        if self._depth:
            self._depth += 1
            return 0.0
        started = time.monotonic()
        delay = 0.01
        announced = False
        while True:
            fd = self._try()
            if fd is not None:
                break
            waited = time.monotonic() - started
            if waited > self.timeout:
                raise LockTimeout(f"waited {self.timeout:.0f} s for {describe_holder(self.path)} holding "
                                  f"{self.path}; if no pgshard process runs, delete that file")
            if not announced and waited >= self.announce_after:
                announced = True
                _announcer(f"pgshard: waiting for {describe_holder(self.path)} holding {self.path} "
                           f"(up to {self.timeout:.0f} s) before {self.purpose}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        record = {"pid": os.getpid(), "identity": process_identity(), "purpose": self.purpose, "since": time.time()}
        try:  # who holds it, for the messages of those who wait; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError:  # a full disk (ENOSPC): held all the same, and never leaked by a raise here
            pass
        self._fd = fd
        self._depth = 1
        self.waited = time.monotonic() - started
        return self.waited

    def release(self) -> None:
        if self._depth > 1:
            self._depth -= 1
            return
        fd, self._fd, self._depth = self._fd, None, 0
        if fd is None:
            return
        if self.remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still held: nobody can lock this inode and believe it current
        else:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        os.close(fd)

    def __enter__(self) -> HolderLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
