"""The Alembic projects a template's build steps migrate, as pgshard_check's checks reach them: each project's
ini and revision (``alembic_targets``), its script directory, its revisions' names, and its env.py run online
with the steps a check chooses (``run_env_with``), refused when env.py connects to another database than the
one given (``on_given_database``). Shared by verify.py (heads, models) and downgrade.py.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgshard.migrate import AlembicMigrator, Migrator, chdir, logging_kept
from pgshard.settings import SettingsError
from pgshard.steps import CommandMigrator, alembic_ini


@dataclass(frozen=True)
class AlembicTarget:
    """An Alembic project a build step migrates: its ini and the revision the step upgrades to."""

    ini: Path
    revision: str


def alembic_targets(migrators: Sequence[Migrator]) -> list[AlembicTarget]:
    """The Alembic projects of the ``alembic:`` and ``command:alembic ... upgrade REV`` steps, in order."""
    found: dict[Path, AlembicTarget] = {}
    for migrator in migrators:
        if isinstance(migrator, AlembicMigrator):
            found.setdefault(migrator.ini, AlembicTarget(migrator.ini, migrator.revision))
        elif isinstance(migrator, CommandMigrator):
            args = shlex.split(migrator.command)
            ini = alembic_ini(args, migrator.cwd)
            if ini is not None and "upgrade" in args:
                rest = [a for a in args[args.index("upgrade") + 1:] if not a.startswith("-")]
                found.setdefault(ini, AlembicTarget(ini, rest[0] if rest else "heads"))
    return list(found.values())


def script_of(target: AlembicTarget, url: str | None = None) -> tuple[Any, Any]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config(str(target.ini))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with chdir(target.ini.parent):
        return config, ScriptDirectory.from_config(config)


def describe_revision(script: Any, revision: str) -> str:
    found = script.get_revision(revision)
    doc = " ".join((found.doc or "").split()) if found is not None else ""
    return f"{revision} ({doc})" if doc else revision


def on_given_database(bind: Any, url: str, check: str) -> None:
    """Never the wrong database: env.py must connect to the URL pgshard gives it."""
    from sqlalchemy.engine import make_url

    expected = make_url(url).database
    on = bind.exec_driver_sql("SELECT current_database()").scalar()
    if on != expected:
        raise SettingsError(f"env.py connected to database {on!r}, not {expected!r}: {check} needs env.py to use "
                            "the URL pgshard gives it (sqlalchemy.url, or the pgshard_env variables)")


def run_env_with(target: AlembicTarget, config: Any, script: Any, fn: Callable[[Any, Any], list[Any]],
                 destination: str) -> None:
    """The project's env.py, run online with ``fn`` choosing the steps."""
    from alembic.runtime.environment import EnvironmentContext

    with chdir(target.ini.parent), logging_kept(), EnvironmentContext(
            config, script, fn=fn, as_sql=False, starting_rev=None, destination_rev=destination, tag=None):
        script.run_env()
