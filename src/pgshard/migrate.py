"""How a template gets its schema and seed data: the ``Migrator`` protocol and its five kinds.

A migrator is two methods, as in pgtestdb: ``fingerprint()`` (a hash of everything that decides the
resulting schema, so an unchanged schema is never migrated twice) and ``apply(url)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pgshard.settings import SettingsError, import_object, mask_url, raised_at

KINDS = ("alembic", "metadata", "sql", "python", "command")


@runtime_checkable
class Migrator(Protocol):
    spec: str

    def fingerprint(self) -> str: ...

    def apply(self, url: str) -> None: ...


class MigrationError(RuntimeError):
    """A template build step failed; the message names the pgshard_migrate line, the exception and where
    it was raised (``file:line`` of the project's code); ``traceback`` keeps the whole of it for --tb=long."""

    def __init__(self, spec: str, cause: BaseException | str, *, where: str = "", traceback: str = "",
                 output: Sequence[str] = (), label: str = "pgshard_migrate step") -> None:
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        reason = " ".join(str(reason).split())
        if len(reason) > 500:
            reason = reason[:500] + " ..."
        if isinstance(cause, BaseException) and not where:
            where = raised_at(cause)
        at = f" (at {where})" if where else ""
        text = f"{label} '{spec}' failed: {reason}{at}"
        super().__init__(mask_url("\n".join([text, *output])))
        self.spec = spec
        self.label = label  # what failed: a pgshard_migrate step, or a pgshard_check (verify.py)
        self.reason = reason
        self.where = where
        self.output = list(output)  # a command's last meaningful lines and the file with all of it
        self.traceback = mask_url(traceback)
        self.elsewhere = False  # another process of this run failed this way and has reported it

    def describe(self, tbstyle: str = "auto") -> str:
        """The one message a run shows: ``str(self)``, with the build's whole traceback under --tb=long."""
        if not self.traceback:
            return str(self)
        if tbstyle == "long":
            return f"{self}\nthe build's traceback:\n{self.traceback.rstrip()}"
        return f"{self}\n(the build's whole traceback: --tb=long)"


@dataclass
class Watch:
    """How long a template build may take (``timeout`` seconds, 0: no limit) and who hears, after ``first``
    seconds and then every ``every`` seconds, that it is still running (``progress``: one line)."""

    timeout: float = 0
    progress: Callable[[str], None] | None = None
    every: float = 30
    first: float = 2  # a build this short says nothing; a longer one says so early, not after 30 s


_WATCH = Watch()


@contextlib.contextmanager
def watching(watch: Watch) -> Iterator[None]:
    """The watch over every step process started inside the block (one build at a time per process)."""
    global _WATCH
    saved, _WATCH = _WATCH, watch
    try:
        yield
    finally:
        _WATCH = saved


def run_watched(args: Sequence[str], what: Callable[[], str], *, input: bytes | None = None,
                **kwargs: Any) -> tuple[int, bytes, bytes]:
    """Run a build step's process (in a session of its own) to its end under the current watch: a line
    every ``every`` seconds while it runs, and past the timeout the process and its children killed and a
    MigrationError naming the step (``what()``: the step running now, asked when needed) and the option."""
    import signal
    import time

    watch = _WATCH
    started = time.monotonic()
    said = False
    proc = subprocess.Popen(list(args), stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kwargs)
    try:
        pending = input
        while True:
            waited = time.monotonic() - started
            tick = (watch.every if said else min(watch.first, watch.every)) if watch.progress is not None else None
            left = watch.timeout - waited if watch.timeout > 0 else None
            step = min((t for t in (tick, left) if t is not None), default=None)
            try:
                out, err = proc.communicate(pending, timeout=step)
                return proc.returncode, out, err
            except subprocess.TimeoutExpired:
                pending = None  # communicate() goes on feeding what it had not written yet
            waited = time.monotonic() - started
            if watch.timeout > 0 and waited >= watch.timeout:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise MigrationError(what(), f"did not finish within pgshard_build_timeout ({watch.timeout:g} s), "
                                             "so the build was stopped: is it waiting for a lock another session "
                                             "holds, or for input? Raise pgshard_build_timeout "
                                             "(PGSHARD_BUILD_TIMEOUT) if it needs longer")
            if watch.progress is not None:
                limit = f" (pgshard_build_timeout {watch.timeout:g} s)" if watch.timeout > 0 else ""
                watch.progress(f"pgshard: building the template: step '{what()}' running for {waited:.0f} s{limit}")
                said = True
    finally:
        if proc.poll() is None:  # an interrupt (Ctrl-C) while waiting: the step's processes go with us
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_NOISE = re.compile(r"^\s*\(Background on this error at: .*\)\s*$")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure|Warning)\b.*")
OUTPUT_LINES = 6


def meaningful_tail(output: str, limit: int = OUTPUT_LINES) -> list[str]:
    """The lines of a failed command's output that say why: from the last exception line of a Python
    traceback (``sqlalchemy.exc.OperationalError: ...`` and what follows it, less SQLAlchemy's link), else
    the last non-blank lines; at most ``limit``."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip() and not _NOISE.match(line)]
    starts = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    tail = lines[starts[-1]:] if starts else lines[-limit:]
    return [line[:300] for line in tail[:limit]]


def sha(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def hash_tree(root: Path, suffixes: Sequence[str] | None = None) -> str:
    parts: list[bytes | str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        if suffixes is None or path.suffix in suffixes:
            parts += [str(path.relative_to(root)), path.read_bytes()]
    return sha(*parts)


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def logging_kept() -> Iterator[None]:
    """A stock env.py calls logging.config.fileConfig(), which disables every existing logger and
    replaces the root handlers (pytest's capture included): put them back after the migration."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    disabled = {name: logger.disabled for name, logger in logging.Logger.manager.loggerDict.items()
                if isinstance(logger, logging.Logger)}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, was_disabled in disabled.items():
            logging.getLogger(name).disabled = was_disabled


@dataclass
class AlembicMigrator:
    """``alembic:alembic.ini`` (optionally ``alembic:alembic.ini@revision``): in-process upgrade."""

    spec: str
    ini: Path
    revision: str = "head"

    def _config(self, url: str | None = None) -> Any:
        from alembic.config import Config

        config = Config(str(self.ini))
        if url is not None:
            config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        return config

    def _script_dir(self) -> Path:
        """script_location read straight from the ini: importing Alembic costs ~0.1 s, which a warm run
        (schema unchanged, template cached) would otherwise pay just to hash files."""
        from pgshard.discover import alembic_script_dir

        found = alembic_script_dir(self.ini)
        if found is not None:
            return found
        from alembic.script import ScriptDirectory  # a package:path resource

        with chdir(self.ini.parent):
            return Path(ScriptDirectory.from_config(self._config()).dir)

    def fingerprint(self) -> str:
        return sha(self.ini.read_bytes(), hash_tree(self._script_dir(), (".py", ".sql")), self.revision)

    def apply(self, url: str) -> None:
        from alembic import command

        with chdir(self.ini.parent), logging_kept():
            command.upgrade(self._config(url), self.revision)


@dataclass
class MetadataMigrator:
    """``metadata:pkg.models:Base``: ``create_all`` of a declarative base or a MetaData."""

    spec: str
    target: str
    option: str = "pgshard_migrate"  # whose line it is (pgshard_check's models: reads a metadata too)

    def _metadata(self) -> Any:
        from sqlalchemy import MetaData

        obj = import_object(self.target, f"{self.option} line '{self.spec}'")
        metadata = obj if isinstance(obj, MetaData) else getattr(obj, "metadata", None)
        if not isinstance(metadata, MetaData):
            raise SettingsError(f"{self.option} line '{self.spec}': {self.target} is not a MetaData "
                                "nor a class with .metadata")
        return metadata

    def fingerprint(self) -> str:
        from sqlalchemy.dialects import postgresql
        from sqlalchemy.schema import CreateIndex, CreateTable

        dialect = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]
        parts: list[bytes | str] = []
        for table in self._metadata().sorted_tables:
            parts.append(str(CreateTable(table).compile(dialect=dialect)))
            parts += sorted(str(CreateIndex(index).compile(dialect=dialect)) for index in table.indexes)
        return sha(*parts)

    def apply(self, url: str) -> None:
        from sqlalchemy.pool import NullPool

        from pgshard.server.base import own_engine

        engine = own_engine(url, poolclass=NullPool)
        try:
            self._metadata().create_all(engine)
        finally:
            engine.dispose()


@dataclass
class SqlMigrator:
    """``sql:migrations/`` (every ``*.sql`` in name order) or ``sql:schema.sql``."""

    spec: str
    path: Path

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            raise SettingsError(f"pgshard_migrate line '{self.spec}': {self.path} does not exist")
        return sorted(self.path.glob("*.sql"))

    def fingerprint(self) -> str:
        return sha(*[part for f in self.files() for part in (f.name, f.read_bytes())])

    def apply(self, url: str) -> None:
        import psycopg

        from pgshard.server.base import own_connection

        with own_connection(url, autocommit=False) as conn:
            for file in self.files():
                try:
                    conn.execute(file.read_text())  # no parameters: several statements per call are fine
                except psycopg.Error as exc:
                    raise MigrationError(self.spec, f"{file.name}: {exc}") from None
                conn.commit()


@dataclass
class PythonMigrator:
    """``python:pkg.seed:main``: called with the template's SQLAlchemy URL."""

    spec: str
    target: str

    def _callable(self) -> Callable[[str], object]:
        func = import_object(self.target, f"pgshard_migrate line '{self.spec}'")
        if not callable(func):
            raise SettingsError(f"pgshard_migrate line '{self.spec}': {self.target} is not callable")
        return func  # type: ignore[no-any-return]

    def fingerprint(self) -> str:
        func = self._callable()
        extra = getattr(func, "pgshard_fingerprint", "")
        try:
            source = Path(inspect.getfile(func)).read_bytes()  # the whole module: helpers count too
        except (TypeError, OSError):
            source = self.target.encode()
        return sha(source, str(extra))

    def apply(self, url: str) -> None:
        self._callable()(url)
