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
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pgshard import redirect
from pgshard.admin import Admin, Marker
from pgshard.migrate import (
    AlembicMigrator,
    CommandMigrator,
    MetadataMigrator,
    MigrationError,
    Migrator,
    PythonMigrator,
    SqlMigrator,
    interpreter_env,
)
from pgshard.server.base import ServerError
from pgshard.settings import temporary_env

# Steps that run the project's Python: these go to the child. ``sql:`` files touch no Python of the
# project (psycopg on the given URL), a command is a process of its own already, and a Migrator object a
# user built in Python is applied where it was built: none of them needs a child.
_CHILD_KINDS = (AlembicMigrator, MetadataMigrator, PythonMigrator)
_TAIL_LINES = 3


def build_name(template: str) -> str:
    """Where a template is built before it is renamed and sealed."""
    return f"{template}_build"


def build_fingerprint(name: str, prefix: str) -> str | None:
    """The fingerprint of the template being built under ``name``; None when ``name`` is no build database."""
    head, tail = f"{prefix}_tpl_", build_name("")
    if name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail):
        return name[len(head):-len(tail)]
    return None


@dataclass(frozen=True)
class BuildDatabases:
    """During a template build, a step's CREATE/DROP DATABASE of a redirected name (pgshard_redirect) acts on
    the build database and nothing else (redirect.DatabaseLifecycle), in this process or in the child."""

    admin_url: str  # the server's maintenance database
    prefix: str
    run_id: str

    def _fingerprint(self, name: str) -> str:
        fingerprint = build_fingerprint(name, self.prefix)
        if fingerprint is None:
            raise ServerError(f"pgshard acts only on the template being built during a build, not on {name}")
        return fingerprint

    def create_database(self, name: str) -> bool:
        fingerprint = self._fingerprint(name)
        with Admin(self.admin_url, self.prefix) as admin:
            if admin.exists(name):
                return False
            admin.create(name, Marker("build", self.run_id, fingerprint=fingerprint), template="template0")
        return True

    def drop_database(self, name: str) -> bool:
        self._fingerprint(name)
        with Admin(self.admin_url, self.prefix) as admin:
            return admin.drop(name, force=True)


def apply_one(migrator: Migrator, url: str) -> None:
    """Apply one step; whatever it raises becomes a MigrationError naming its pgshard_migrate line."""
    try:
        migrator.apply(url)
    except MigrationError:
        raise
    except Exception as exc:
        raise MigrationError(migrator.spec, exc) from exc


def apply_steps(migrators: Sequence[Migrator], url: str, env: Mapping[str, str],
                databases: BuildDatabases | None = None) -> None:
    """Apply every step in order to the database at ``url``, with ``env`` (pgshard_env for it) set.
    Consecutive steps that include a Python one run together in one child; commands alone need none."""
    batch: list[Migrator] = []

    def flush() -> None:
        if any(isinstance(m, _CHILD_KINDS) for m in batch):
            _in_child(batch, url, env, databases)
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


def _in_child(batch: Sequence[Migrator], url: str, env: Mapping[str, str],
              databases: BuildDatabases | None) -> None:
    child_env = {**interpreter_env(os.environ), **env}
    payload = pickle.dumps((list(batch), url, sorted(redirect.redirected_names()), databases))
    proc = subprocess.run([sys.executable, "-m", "pgshard.build"], input=payload,
                          env=child_env, capture_output=True, check=False)
    events: list[dict[str, str]] = []
    for line in proc.stdout.decode(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    if proc.returncode == 0 and events and events[-1].get("ok"):
        return
    if events and "reason" in events[-1]:
        raise MigrationError(events[-1]["spec"], events[-1]["reason"])
    # The child died inside a step (os._exit, a crash, a signal): blame the step it had started.
    started = [e["spec"] for e in events if "spec" in e]
    tail = [line for line in proc.stderr.decode(errors="replace").splitlines() if line.strip()][-_TAIL_LINES:]
    raise MigrationError(started[-1] if started else batch[0].spec,
                         f"the build process (python -m pgshard.build) exited with {proc.returncode}: "
                         f"{' | '.join(tail) or '(no output)'}")


def main() -> int:
    """The child: unpickle the steps, apply them, report on the real stdout in JSON lines (each step as
    it starts, then the outcome). Whatever the steps print goes to stderr: it cannot pass for a report."""
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    migrators, url, redirected, databases = pickle.loads(sys.stdin.buffer.read())
    if redirected:  # the app's engines with a hard-coded database name build the template, as in the parent
        redirect.install(redirected, url)
        redirect.handle_ddl(databases)
    with result:
        for migrator in migrators:
            result.write(json.dumps({"spec": migrator.spec}) + "\n")
            result.flush()
            try:
                apply_one(migrator, url)
            except MigrationError as exc:
                result.write(json.dumps({"spec": exc.spec, "reason": exc.reason}) + "\n")
                return 3
        result.write(json.dumps({"ok": True}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
