"""Template build steps in a clean child process, so the app's import-time state cannot leak in.

A test process has usually imported the app before the template is built, and many Alembic env.py files
read the app's (``lru_cache``d) settings, which pgshard_env filled with the *worker's* database name:
migrated in-process, they would act on that database, not on the template. A fresh interpreter
(``python -m pgshard.build``), with pgshard_env pointed at the template, imports the app anew. The
steps go to it pickled, in order, in one batch; errors come back as one line naming the step.
A warm run (template cached) never gets here, so it spawns nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.engine import make_url

from pgshard import redirect
from pgshard.admin import Admin, Marker
from pgshard.migrate import (
    AlembicMigrator,
    MetadataMigrator,
    MigrationError,
    Migrator,
    PythonMigrator,
    SqlMigrator,
    run_watched,
)
from pgshard.server.base import ServerError
from pgshard.settings import database_url, temporary_env
from pgshard.steps import CommandMigrator, interpreter_env
from pgshard.verify import CheckRun

# Steps that run the project's Python: these go to the child (pgshard_check's too: it imports the models
# and env.py). ``sql:`` files touch no Python of the project (psycopg on the given URL), a command is a
# process of its own already, and a Migrator object a user built in Python is applied where it was built:
# none of them needs a child.
_CHILD_KINDS = (AlembicMigrator, MetadataMigrator, PythonMigrator, CheckRun)
_TAIL_LINES = 3


def apply_one(migrator: Migrator, url: str) -> None:
    """Apply one step; whatever it raises becomes a MigrationError naming its pgshard_migrate line."""
    try:
        migrator.apply(url)
    except MigrationError:
        raise
    except Exception as exc:
        raise MigrationError(migrator.spec, exc, traceback="".join(traceback.format_exception(exc))) from exc


def apply_steps(migrators: Sequence[Migrator], url: str, env: Mapping[str, str]) -> None:
    """Apply every step in order to the database at ``url``, with ``env`` (pgshard_env for it) set.
    Consecutive steps that include a Python one run together in one child; commands alone need none."""
    batch: list[Migrator] = []

    def flush() -> None:
        if any(isinstance(m, _CHILD_KINDS) for m in batch):
            _in_child(batch, url, env)
        else:
            with temporary_env(env):
                for migrator in batch:
                    apply_one(migrator, url)
        batch.clear()

    for migrator in migrators:
        if isinstance(migrator, (*_CHILD_KINDS, CommandMigrator, SqlMigrator)):
            batch.append(migrator)
            continue
        flush()
        with temporary_env(env):
            apply_one(migrator, url)
    flush()


def _in_child(batch: Sequence[Migrator], url: str, env: Mapping[str, str]) -> None:
    child_env = {**interpreter_env(os.environ), **env}
    with tempfile.TemporaryFile() as report:  # read while it runs: which step a timeout stopped
        def written() -> bytes:  # pread: the offset both processes share is the child's to move
            return os.pread(report.fileno(), os.fstat(report.fileno()).st_size, 0)

        def running() -> str:
            started = [e["spec"] for e in _events(written()) if "spec" in e and "reason" not in e]
            return started[-1] if started else batch[0].spec

        returncode, _, stderr = run_watched([sys.executable, "-m", "pgshard.build", str(report.fileno())],
                                            running, input=pickle.dumps((list(batch), url)), env=child_env,
                                            pass_fds=(report.fileno(),))
        events = _events(written())
    if returncode == 0 and events and events[-1].get("ok"):
        return
    if events and "reason" in events[-1]:
        last = events[-1]
        raise MigrationError(last["spec"], last["reason"], where=last.get("where", ""),
                             traceback=last.get("traceback", ""), output=last.get("output", []),
                             label=last.get("label", "pgshard_migrate step"))
    # The child died inside a step (os._exit, a crash, a signal): blame the step it had started.
    started = [e["spec"] for e in events if "spec" in e]
    tail = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()][-_TAIL_LINES:]
    raise MigrationError(started[-1] if started else batch[0].spec,
                         f"the build process (python -m pgshard.build) exited with {returncode}: "
                         f"{' | '.join(tail) or '(no output)'}")


def _events(data: bytes) -> list[dict[str, Any]]:
    events = []
    for line in data.decode(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def build_name(template: str) -> str:
    """Where a template is built before it is renamed and sealed."""
    return f"{template}_build"


def build_fingerprint(name: str, prefix: str) -> str | None:
    """The fingerprint of the template being built under ``name``; None when ``name`` is no build database."""
    head, tail = f"{prefix}_tpl_", build_name("")
    if name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail):
        return name[len(head):-len(tail)]
    return None


class BuildLifecycle:
    """While a template is built, the app's CREATE/DROP DATABASE of a redirected name (a step that resets
    the app's database itself) act on the build database: dropped, then made afresh with its marker."""

    def __init__(self, url: str) -> None:
        self.name = make_url(url).database or ""
        self.prefix = self.name.split("_tpl_", 1)[0]
        self.fingerprint = build_fingerprint(self.name, self.prefix)
        self.admin_url = database_url(url, "postgres")
        self.marker: Marker | None = None  # the build's own (its builder's pid keeps it from stale cleanup)

    def _check(self, name: str) -> None:
        if self.fingerprint is None or name != self.name:
            raise ServerError(f"while a template is built pgshard acts only on its build database, not {name}")

    def create_database(self, name: str) -> bool:
        self._check(name)
        with Admin(self.admin_url, self.prefix) as admin:
            if admin.exists(name):
                return False
            admin.create(name, self.marker or Marker("build", fingerprint=self.fingerprint or ""),
                         template="template0")
        return True

    def drop_database(self, name: str) -> bool:
        self._check(name)
        with Admin(self.admin_url, self.prefix) as admin:
            found = admin.info(name)
            if found is not None and found.marker is not None:
                self.marker = found.marker
            return admin.drop(name, force=True)


def main() -> int:
    """The child: unpickle the steps, apply them, report on the real stdout in JSON lines (each step as
    it starts, then the outcome). Whatever the steps print goes to stderr: it cannot pass for a report."""
    result = os.fdopen(int(sys.argv[1]), "w") if len(sys.argv) > 1 else os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    migrators, url = pickle.loads(sys.stdin.buffer.read())
    redirect.from_environment(url, BuildLifecycle(url))  # the app's hard-coded engines build the template too
    with result:
        for migrator in migrators:
            result.write(json.dumps({"spec": migrator.spec}) + "\n")
            result.flush()
            try:
                apply_one(migrator, url)
            except MigrationError as exc:
                result.write(json.dumps({"spec": exc.spec, "reason": exc.reason, "where": exc.where,
                                         "traceback": exc.traceback, "output": exc.output,
                                         "label": exc.label}) + "\n")
                return 3
        result.write(json.dumps({"ok": True}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
