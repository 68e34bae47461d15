"""``pgshard_check``: the migrations checked where the template is built, once per fingerprint.

``heads``: every Alembic branch has one head (heads that share their branch labels, or have none, need a
merge). ``models:pkg.models:Base``: Alembic's autogenerate comparison of that metadata with the migrated
schema is empty, made in the context the project's env.py configures (see ``models``). ``downgrade``: on a
scratch clone of the built template, every revision from the heads to base is downgraded, upgraded and
downgraded again (its schema, read from the catalog, must come back as it was), then everything is upgraded
again from base, and each revision's schema on the way down must be the one its upgrade makes on the way up
(see ``downgrade``); a downgrade or upgrade that raises is named with its error.

Each check runs in the build child (``CheckRun``, a step of its own), so the app's models and env.py are
imported afresh, pointed at the database being checked. A run's verdict goes to a JSON-lines report
file the parent names; in ``fail`` mode a failed check also raises, which stops the build.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgshard.migrate import AlembicMigrator, MetadataMigrator, MigrationError, Migrator, chdir, logging_kept
from pgshard.settings import SettingsError
from pgshard.steps import CommandMigrator, alembic_ini

KINDS = ("heads", "models", "downgrade")
LABEL = "pgshard_check"


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
def _script(target: AlembicTarget, url: str | None = None) -> tuple[Any, Any]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config(str(target.ini))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with chdir(target.ini.parent):
        return config, ScriptDirectory.from_config(config)


def _describe(script: Any, revision: str) -> str:
    found = script.get_revision(revision)
    doc = " ".join((found.doc or "").split()) if found is not None else ""
    return f"{revision} ({doc})" if doc else revision


def heads(target: AlembicTarget) -> list[str]:
    """A line per Alembic branch with more than one head: heads with the same branch labels (or none)."""
    _, script = _script(target)
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
                         f"{', '.join(_describe(script, h) for h in sorted(found))}; "
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
                _on_given_database(context.bind, url, "the models check")
                found.append(list(compare_metadata(context, metadata)))
            return []  # nothing to migrate: only the comparison
        config, script = _script(target, url)
        _run_env(target, config, script, compare, target.revision)
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


def _on_given_database(bind: Any, url: str, check: str) -> None:
    """Never the wrong database: env.py must connect to the URL pgshard gives it."""
    from sqlalchemy.engine import make_url

    expected = make_url(url).database
    on = bind.exec_driver_sql("SELECT current_database()").scalar()
    if on != expected:
        raise SettingsError(f"env.py connected to database {on!r}, not {expected!r}: {check} needs env.py to use "
                            "the URL pgshard gives it (sqlalchemy.url, or the pgshard_env variables)")


def _run_env(target: AlembicTarget, config: Any, script: Any, fn: Callable[[Any, Any], list[Any]],
             destination: str) -> None:
    """The project's env.py, run online with ``fn`` choosing the steps."""
    from alembic.runtime.environment import EnvironmentContext

    with chdir(target.ini.parent), logging_kept(), EnvironmentContext(
            config, script, fn=fn, as_sql=False, starting_rev=None, destination_rev=destination, tag=None):
        script.run_env()


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


# The schema as the catalog has it, as comparable lines (no OIDs, nothing of extensions or of the system).
_SCHEMA_SQL = """
WITH ns AS (
  SELECT oid, nspname FROM pg_namespace
  WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname !~ '^pg_(toast|temp_|toast_temp_)'
), ext AS (SELECT objid FROM pg_depend WHERE deptype = 'e')
SELECT 'relation ' || ns.nspname || '.' || c.relname || ' ' || c.relkind::text
  FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND c.oid NOT IN (SELECT objid FROM ext)
UNION ALL
SELECT 'column ' || ns.nspname || '.' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
       || COALESCE(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN ns ON ns.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
  WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
    AND c.oid NOT IN (SELECT objid FROM ext)
UNION ALL
SELECT 'constraint ' || ns.nspname || '.' || c.relname || '.' || k.conname || ' ' || pg_get_constraintdef(k.oid)
  FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN ns ON ns.oid = c.relnamespace
UNION ALL
SELECT 'index ' || ns.nspname || '.' || i.relname || ' ' || pg_get_indexdef(i.oid)
  FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN ns ON ns.oid = i.relnamespace
  WHERE i.oid NOT IN (SELECT objid FROM ext)
UNION ALL
SELECT 'type ' || ns.nspname || '.' || t.typname || ' ' || t.typtype::text || COALESCE(' ' || (
         SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid), '')
  FROM pg_type t JOIN ns ON ns.oid = t.typnamespace
  WHERE t.typtype IN ('e', 'd') AND t.oid NOT IN (SELECT objid FROM ext)
UNION ALL
SELECT 'view ' || ns.nspname || '.' || c.relname || ' ' || pg_get_viewdef(c.oid)
  FROM pg_class c JOIN ns ON ns.oid = c.relnamespace WHERE c.relkind IN ('v', 'm')
    AND c.oid NOT IN (SELECT objid FROM ext)
UNION ALL
SELECT 'function ' || ns.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') '
       || md5(pg_get_functiondef(p.oid))
  FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace WHERE p.prokind IN ('f', 'p')
    AND p.oid NOT IN (SELECT objid FROM ext)
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(g.oid) FROM pg_trigger g WHERE NOT g.tgisinternal
UNION ALL
SELECT 'extension ' || extname FROM pg_extension
"""


def schema_lines(connection: Any) -> frozenset[str]:
    """The schema of the database ``connection`` (SQLAlchemy, sync) is on, read from the catalog."""
    return frozenset(row[0] for row in connection.exec_driver_sql(_SCHEMA_SQL))


def schema_difference(before: frozenset[str], after: frozenset[str], limit: int = 8) -> list[str]:
    lines = [f"+ {line}" for line in sorted(after - before)] + [f"- {line}" for line in sorted(before - after)]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def downgrade(target: AlembicTarget, url: str) -> list[str]:
    """Two runs of env.py on the scratch database at ``url``. Down: each revision from the heads to base is
    downgraded, upgraded and downgraded again; its schema after that upgrade must be the one it had before.
    Up: from base to the heads again, each revision's schema read after its upgrade. A revision's schema on
    the way down (left by the downgrade of the revision above it) must be the one its upgrade made on the
    way up: the highest one that is not names the downgrade above it (a downgrade that leaves a schema its
    own upgrade then repairs is found so, and not blamed on the revision below). Errors name their revision."""
    from alembic import op
    from alembic.runtime.migration import MigrationStep

    config, script = _script(target, url)
    down: dict[str, frozenset[str]] = {}  # each revision's schema on the way down, before its downgrade
    cycled: dict[str, frozenset[str]] = {}  # ... and after its downgrade and upgrade
    up: dict[str, frozenset[str]] = {}  # ... and on the way up, after its upgrade
    running: list[tuple[str, str]] = []  # the revision whose function runs now, and which
    passing = ["down"]

    def wrap(revision: str, direction: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            bind = op.get_bind()
            if direction == "downgrade" and revision not in down:  # the first of its two downgrades
                _on_given_database(bind, url, "the downgrade check")
                down[revision] = schema_lines(bind)
            running[:] = [(revision, direction)]
            result = fn(*args, **kwargs)
            if direction == "upgrade":
                (cycled if passing[0] == "down" else up)[revision] = schema_lines(bind)
            return result
        return run

    for found in script.walk_revisions():
        for direction in ("upgrade", "downgrade"):
            fn = getattr(found.module, direction, None)
            if callable(fn):
                setattr(found.module, direction, wrap(found.revision, direction, fn))

    def cycles(rev: Any, context: Any) -> list[Any]:
        steps = []
        for step in script._downgrade_revs("base", rev):
            steps += [step, MigrationStep.upgrade_from_script(script.revision_map, step.revision),
                      MigrationStep.downgrade_from_script(script.revision_map, step.revision)]
        return steps

    def run_env(fn: Callable[[Any, Any], list[Any]], destination: str) -> None:
        _run_env(target, config, script, fn, destination)

    try:
        run_env(cycles, "base")
        if not down:
            return ["no revision was downgraded: the migrated database has no Alembic revision in its version table"]
        order = list(down)  # the heads first, base last
        passing[0] = "up"
        for top in [rev for rev in order if not any(rev in _down(script, other) for other in order)]:
            run_env(_upgrades(script, top), top)
    except SettingsError:
        raise
    except Exception as exc:
        if not running:
            raise
        revision, which = running[0]
        again = which == "downgrade" and revision in cycled  # its second downgrade, after its upgrade
        after = {"down": " after its downgrade", "up": " after the whole history was downgraded"}[passing[0]] \
            if which == "upgrade" else " when run again after its upgrade" if again else ""
        reason = " ".join(f"{type(exc).__name__}: {exc}".split()).split(" [SQL: ")[0][:300]
        hint = ""
        if which == "upgrade" and "already exists" in reason:
            hint = "; its downgrade leaves that behind" if passing[0] == "down" else "; a downgrade leaves that behind"
        elif again and "does not exist" in reason:
            hint = "; its downgrade drops what its upgrade does not make"
        elif which == "downgrade" and "does not exist" in reason:
            above = [rev for rev in down if revision in _down(script, rev)]
            hint = f"; or the downgrade of {', '.join(above)}, run before it, dropped that already" if above else ""
        return [f"revision {_describe(script, revision)}: its {which} fails{after}: {reason}{hint}"]
    for revision in order:  # from the heads down: the first difference is the cause of those below it
        children = [rev for rev in order if revision in _down(script, rev)]
        if children and revision in up and down[revision] != up[revision]:
            return [f"revision {', '.join(_describe(script, c) for c in children)}: its downgrade leaves another "
                    f"schema than revision {revision}'s upgrade made:",
                    *("  " + line for line in schema_difference(up[revision], down[revision]))]
    for revision in reversed(order):
        if cycled.get(revision, down[revision]) != down[revision]:
            return [f"revision {_describe(script, revision)}: its downgrade then its upgrade leave another schema "
                    "than it had:", *("  " + line for line in schema_difference(down[revision], cycled[revision]))]
    return []


def _down(script: Any, revision: str) -> tuple[str, ...]:
    down = script.get_revision(revision).down_revision
    if down is None:
        return ()
    return tuple(down) if isinstance(down, (tuple, list)) else (down,)


def _upgrades(script: Any, destination: str) -> Callable[[Any, Any], list[Any]]:
    def revs(rev: Any, context: Any) -> list[Any]:
        return list(script._upgrade_revs(destination, rev))
    return revs
