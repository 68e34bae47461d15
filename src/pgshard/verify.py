"""``pgshard_check``: the migrations checked where the template is built, once per fingerprint.

``heads``: every Alembic branch has one head (heads that share their branch labels, or have none, need a
merge). ``models:pkg.models:Base``: Alembic's autogenerate comparison of that metadata with the migrated
schema is empty, made in the context the project's env.py configures (see ``models``). ``downgrade``: on a
scratch clone of the built template, every revision from the heads to base is downgraded, upgraded and
downgraded again (its schema, read from the catalog, must come back as it was), then everything is upgraded
again from base, and each revision's schema on the way down must be the one its upgrade makes on the way up
(downgrade.py); a downgrade or upgrade that raises is named with its error. The Alembic projects the checks
reach, and their env.py runs, are alembic_project.py's.

Each check runs in the build child (``CheckRun``, a step of its own), so the app's models and env.py are
imported afresh, pointed at the database being checked. A run's verdict goes to a JSON-lines report
file the parent names; in ``fail`` mode a failed check also raises, which stops the build.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgshard.alembic_project import (
    AlembicTarget,
    alembic_targets,
    describe_revision,
    on_given_database,
    run_env_with,
    script_of,
)
from pgshard.downgrade import downgrade
from pgshard.migrate import MetadataMigrator, MigrationError, Migrator
from pgshard.settings import SettingsError

KINDS = ("heads", "models", "downgrade")
LABEL = "pgshard_check"


def not_applicable(checks: Sequence[str], migrators: Sequence[Migrator]) -> list[str]:
    """A line for each check that cannot apply to these steps (it is skipped, not failed)."""
    if alembic_targets(migrators):
        return []
    steps = "pgshard_migrate has no alembic: step and no command:alembic upgrade step"
    why = {"heads": f"{steps}, so there are no Alembic heads to count",
           "downgrade": f"{steps}, so there are no downgrades to run",
           "models": f"{steps}: the template's schema is not built by migrations, so there is nothing to compare "
                     "the models with"}
    return [f"pgshard_check '{line}' does not apply: {why[line.partition(':')[0]]}" for line in checks]


def check_fingerprint(checks: Sequence[str], migrators: Sequence[Migrator]) -> tuple[list[str], list[str]]:
    """pgshard_check's part of the template's fingerprint (its lines, and the DDL of a ``models:`` target: a
    model changed without a revision is checked again, though no migration changed), and the lines of the
    checks that cannot apply."""
    if not checks:
        return [], []
    if not alembic_targets(migrators):
        return [], not_applicable(checks, migrators)
    inputs = [f"{LABEL}={','.join(checks)}"]
    for line in checks:
        if line.startswith("models:"):
            try:
                inputs.append(f"{line}={MetadataMigrator(line, line.split(':', 1)[1], option=LABEL).fingerprint()}")
            except SettingsError:
                raise
            except Exception as exc:
                raise MigrationError(line, f"cannot read the models: {type(exc).__name__}: {exc}",
                                     label=LABEL) from None
    return inputs, []


def post_build(checks: Sequence[str]) -> tuple[str, ...]:
    """The checks that read the built database (``heads`` runs before the steps: two heads fail the build)."""
    return tuple(c for c in checks if c != "heads")


@dataclass
class CheckRun:
    """Some checks, run as one step of the build child; their verdict appended to ``report``."""

    spec: str
    checks: tuple[str, ...]
    targets: list[AlembicTarget]
    report: str
    fail: bool = True  # pgshard_check_mode = fail: a failed check raises (the build stops)
    scratch: bool = False  # the database is a scratch clone: downgrade may change it
    results: list[dict[str, Any]] = field(default_factory=list)

    def fingerprint(self) -> str:
        return ""

    def apply(self, url: str) -> None:
        failed: list[dict[str, Any]] = []
        for check in self.checks:
            started = time.perf_counter()
            try:
                lines = self._run(check, url)
            except SettingsError as exc:
                lines = [str(exc)]
            except Exception as exc:
                lines = [f"it could not run: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}"]
            entry = {"check": check, "ok": not lines, "lines": lines, "seconds": time.perf_counter() - started}
            with open(self.report, "a") as out:
                out.write(json.dumps(entry) + "\n")
            if lines:
                failed.append(entry)
        if failed and self.fail:
            raise check_error([f"{e['check']}" for e in failed], [line for e in failed for line in e["lines"]])

    def _run(self, check: str, url: str) -> list[str]:
        kind, _, arg = check.partition(":")
        if kind == "heads":
            return [line for target in self.targets for line in heads(target)]
        if kind == "models":
            return models(arg, url, self.targets)
        if not self.scratch:
            raise AssertionError("the downgrade check runs on a scratch clone only")
        return [line for target in self.targets for line in downgrade(target, url)]


def check_error(checks: Sequence[str], lines: Sequence[str]) -> MigrationError:
    """The one message of failed checks: the first failed check's first line, the rest below it."""
    first, *rest = lines or ["failed"]
    error = MigrationError(", ".join(checks), first, label=LABEL,
                           output=[*("  " + line for line in rest),
                                   "  (pgshard_check_mode = warn runs the tests anyway)"])
    return error


def findings_of(entries: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The failed checks' lines as the template's marker keeps them: each check's first line names it."""
    return tuple(f"{LABEL} '{e['check']}': {line}" if i == 0 else line
                 for e in entries if not e.get("ok") for i, line in enumerate(e["lines"]))


def cached_error(findings: Sequence[str]) -> MigrationError:
    """The message of ``findings_of``'s lines, read back from a template sealed under warn."""
    head = f"{LABEL} '"
    failed = [line[len(head):].split("': ", 1)[0] for line in findings if line.startswith(head)]
    lines = [line.split("': ", 1)[1] if line.startswith(head) else line.strip() for line in findings]
    return check_error(failed, lines)


def read_report(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    entries = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


# -- the checks --------------------------------------------------------------------------------------
def heads(target: AlembicTarget) -> list[str]:
    """A line per Alembic branch with more than one head: heads with the same branch labels (or none)."""
    _, script = script_of(target)
    groups: dict[frozenset[str], list[str]] = {}
    for head in script.get_heads():
        groups.setdefault(frozenset(script.get_revision(head).branch_labels), []).append(head)
    where = ", ".join(str(Path(d)) for d in script._version_locations) if hasattr(script, "_version_locations") \
        else script.dir
    lines = []
    for labels, found in groups.items():
        if len(found) > 1:
            branch = f" of branch {', '.join(sorted(labels))}" if labels else ""
            lines.append(f"{len(found)} Alembic heads{branch} in {where}: "
                         f"{', '.join(describe_revision(script, h) for h in sorted(found))}; "
                         f"merge them: alembic merge -m 'merge heads' {' '.join(sorted(found))}")
    return lines


def models(target: str, url: str, alembic: Sequence[AlembicTarget] = ()) -> list[str]:
    """Alembic's autogenerate comparison of the metadata at ``target`` with the database at ``url``, made as
    ``alembic revision --autogenerate`` would make it: in the context the project's env.py configures (its
    include_object, include_name, include_schemas, compare_type ...), when one Alembic project's env.py has
    that metadata as its target_metadata (or there is one project only); else with Alembic's defaults and
    the models' own schemas."""
    metadata = MetadataMigrator(f"models:{target}", target, option=LABEL)._metadata()
    diffs = _compared_by_env(metadata, url, alembic)
    if diffs is None:
        diffs = _compared_alone(metadata, url)
    lines = [describe_diff(diff) for diff in _flatten(diffs)]
    if not lines:
        return []
    more = f" (and {len(lines) - 1} more, below)" if len(lines) > 1 else ""
    return [f"the models ({target}) differ from the migrated schema: {lines[0]}{more}; no revision makes this "
            "change (alembic revision --autogenerate writes one)", *lines[1:]]


def _compared_by_env(metadata: Any, url: str, alembic: Sequence[AlembicTarget]) -> list[Any] | None:
    """The differences, compared in the context each project's env.py configures, from the first whose
    target_metadata is ``metadata``; None when none is (of several projects) or env.py never configured one."""
    from alembic.autogenerate import compare_metadata

    found: list[list[Any]] = []
    for target in alembic:
        def compare(rev: Any, context: Any) -> list[Any]:
            targets = context.opts.get("target_metadata")
            ours = targets is metadata or (isinstance(targets, (list, tuple)) and metadata in targets)
            if ours or len(alembic) == 1:
                on_given_database(context.bind, url, "the models check")
                found.append(list(compare_metadata(context, metadata)))
            return []  # nothing to migrate: only the comparison
        config, script = script_of(target, url)
        run_env_with(target, config, script, compare, target.revision)
        if found:
            return found[0]
    return None


def _compared_alone(metadata: Any, url: str) -> list[Any]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy.pool import NullPool

    from pgshard.server.base import own_engine

    schemas = {table.schema for table in metadata.tables.values()}

    def include_name(name: str | None, type_: str, parent: Any) -> bool:
        return type_ != "schema" or name in schemas

    engine = own_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={
                "compare_type": True, "target_metadata": metadata,
                "include_schemas": schemas != {None}, "include_name": include_name})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def _flatten(diffs: Sequence[Any]) -> Iterator[Any]:
    for diff in diffs:
        if isinstance(diff, list):
            yield from diff
        else:
            yield diff


def _table(schema: str | None, name: str) -> str:
    return f"{schema}.{name}" if schema else name


def describe_diff(diff: Any) -> str:
    """One line for one of Alembic's autogenerate differences, in the models' terms."""
    kind = diff[0]
    if kind in ("add_table", "remove_table"):
        table = diff[1]
        where = "in the models, not in the migrated schema" if kind == "add_table" else \
            "in the migrated schema, not in the models"
        return f"table {_table(table.schema, table.name)}: {where}"
    if kind in ("add_column", "remove_column"):
        schema, table, column = diff[1], diff[2], diff[3]
        where = "in the models, not in the migrated schema" if kind == "add_column" else \
            "in the migrated schema, not in the models"
        return f"column {_table(schema, table)}.{column.name} ({column.type}): {where}"
    if kind in ("add_index", "remove_index", "add_constraint", "remove_constraint", "add_fk", "remove_fk"):
        obj = diff[1]
        what = {"index": "index", "constraint": "constraint", "fk": "foreign key"}[kind.split("_", 1)[1]]
        table = getattr(obj, "table", None)
        on = f" on {_table(table.schema, table.name)}" if table is not None else ""
        columns = ", ".join(c.name for c in getattr(obj, "columns", []))
        where = "in the models, not in the migrated schema" if kind.startswith("add") else \
            "in the migrated schema, not in the models"
        return f"{what} {obj.name or '(unnamed)'}{on} ({columns}): {where}"
    if kind.startswith("modify_"):
        schema, table, column = diff[1], diff[2], diff[3]
        migrated, model = diff[5], diff[6]
        what = kind.removeprefix("modify_")
        return (f"column {_table(schema, table)}.{column}: {what} is {model} in the models, {migrated} in the "
                "migrated schema")
    return f"{kind}: {' '.join(str(part) for part in diff[1:])}"


