"""Locks that say who holds them: the server start (up to 300 s) and a template build (up to 30 min) are
long waits, and a silent one looks like a hang. The holder writes its pid, start time and what it does into
a record; a waiter reads it and says so once, after a few seconds, and a wait that times out names it.

The coordinator's lock (``CoordinatorLock``: one process builds a template, the others wait) is filelock's
``FileLock``, one lock file per server and project that stays in place (nothing to unlink, nothing piles
up). filelock opens its file with O_TRUNC, so the holder's record lives beside it (``<lock>.holder``).

One case filelock cannot serve, kept hand-written (``HolderLock``): the embedded server's own lock, which
``pgshard clean --server`` removes while holding it (the command leaves nothing behind). Unlinking a lock
file others wait on is only safe if every acquirer checks, once it holds the lock, that the file it locked is
still the one at the path (same inode); filelock does not. That lock keeps its record in the file itself.
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
    """Who holds the lock whose record is ``path``, in a few words."""
    found = holder(path)
    if found is None:
        return "another process"
    since = time.time() - float(str(found.get("since", time.time())))
    return f"pid {found.get('pid')} ({found.get('purpose')}, for {since:.0f} s)"


def _record(purpose: str) -> bytes:
    return json.dumps({"pid": os.getpid(), "identity": process_identity(), "purpose": purpose,
                       "since": time.time()}).encode()


def _waiting_line(record: Path, lock: Path, timeout: float, purpose: str) -> str:
    return f"pgshard: waiting for {describe_holder(record)} holding {lock} (up to {timeout:.0f} s) before {purpose}"


def _timed_out(record: Path, lock: Path, timeout: float) -> LockTimeout:
    return LockTimeout(f"waited {timeout:.0f} s for {describe_holder(record)} holding {lock}; if no pgshard "
                       "process runs, delete that file")


def _unusable(lock: Path, exc: OSError) -> LockError:
    return LockError(f"cannot use the lock file {lock}: {exc.strerror or exc}; remove it or set "
                     "pgshard_cache_dir to a directory of your own")


class _NamedLock:
    """What both locks share: re-entrant within one object, a context manager, the seconds last waited."""

    def __init__(self, path: Path, purpose: str, *, timeout: float, announce_after: float) -> None:
        self.path = path
        self.purpose = purpose
        self.timeout = timeout
        self.announce_after = announce_after
        self._depth = 0
        self.waited = 0.0

    def _take(self, started: float) -> None:
        raise NotImplementedError

    def _give_back(self) -> None:
        raise NotImplementedError

    def acquire(self) -> float:
        """Block until held; returns the seconds waited. Raises LockTimeout naming the holder."""
        if self._depth:
            self._depth += 1
            return 0.0
        started = time.monotonic()
        self._take(started)
        self._depth = 1
        self.waited = time.monotonic() - started
        return self.waited

    def release(self) -> None:
        if self._depth > 1:
            self._depth -= 1
        elif self._depth:
            self._depth = 0
            self._give_back()

    def __enter__(self) -> _NamedLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class CoordinatorLock(_NamedLock):
    """filelock's FileLock on ``path`` (left in place), usable across threads, its holder's record in
    ``<path>.holder``."""

    def __init__(self, path: Path, purpose: str, *, timeout: float, announce_after: float = ANNOUNCE_AFTER) -> None:
        super().__init__(path, purpose, timeout=timeout, announce_after=announce_after)
        self.record = path.with_name(path.name + ".holder")
        from filelock import FileLock  # here: a warm run takes no lock, and filelock's import costs 30-90 ms

        self._lock = FileLock(str(path), thread_local=False)

    def _wait(self, timeout: float) -> bool:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=max(timeout, 0.0), poll_interval=0.05)
        except Timeout:
            return False
        except OSError as exc:  # the path is a directory, no permission, a read-only filesystem
            raise _unusable(self.path, exc) from None
        return True

    def _take(self, started: float) -> None:
        if not self._wait(min(self.announce_after, self.timeout)):
            _announcer(_waiting_line(self.record, self.path, self.timeout, self.purpose))
            if not self._wait(self.timeout - (time.monotonic() - started)):
                raise _timed_out(self.record, self.path, self.timeout)
        with contextlib.suppress(OSError):  # a full disk: held all the same, only unnamed to waiters
            self.record.write_bytes(_record(self.purpose))

    def _give_back(self) -> None:
        with contextlib.suppress(OSError):
            self.record.write_bytes(b"")  # before the lock goes: a waiter never names a holder that left
        self._lock.release()


class HolderLock(_NamedLock):
    """An exclusive flock on ``path``, its record in the file itself. ``remove``: unlink the file on release
    (the next acquirer of the old inode notices and retries on the new file): the case filelock cannot serve
    (see above)."""

    def __init__(self, path: Path, purpose: str, *, timeout: float, remove: bool = False,
                 announce_after: float = ANNOUNCE_AFTER) -> None:
        super().__init__(path, purpose, timeout=timeout, announce_after=announce_after)
        self.remove = remove
        self._fd: int | None = None

    def _try(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _unusable(self.path, exc) from None
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

    def _take(self, started: float) -> None:
        delay = 0.01
        announced = False
        while (fd := self._try()) is None:
            waited = time.monotonic() - started
            if waited > self.timeout:
                raise _timed_out(self.path, self.path, self.timeout)
            if not announced and waited >= self.announce_after:
                announced = True
                _announcer(_waiting_line(self.path, self.path, self.timeout, self.purpose))
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        try:  # who holds it, for the messages of those who wait; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, _record(self.purpose), 0)
        except OSError:  # a full disk (ENOSPC): held all the same, and never leaked by a raise here
            pass
        self._fd = fd

    def _give_back(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still held: nobody can lock this inode and believe it current
        else:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        os.close(fd)
