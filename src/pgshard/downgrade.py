"""pgshard_check's ``downgrade``: on a scratch clone of the built template, every revision's downgrade and
upgrade run by the project's env.py, each revision's schema read from the catalog (``schema_lines``) and
compared on the way down and on the way up (see ``downgrade``). Run by verify.py's ``CheckRun``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pgshard.alembic_project import AlembicTarget, describe_revision, on_given_database, run_env_with, script_of
from pgshard.settings import SettingsError

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

    config, script = script_of(target, url)
    down: dict[str, frozenset[str]] = {}  # each revision's schema on the way down, before its downgrade
    cycled: dict[str, frozenset[str]] = {}  # ... and after its downgrade and upgrade
    up: dict[str, frozenset[str]] = {}  # ... and on the way up, after its upgrade
    running: list[tuple[str, str]] = []  # the revision whose function runs now, and which
    passing = ["down"]

    def wrap(revision: str, direction: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            bind = op.get_bind()
            if direction == "downgrade" and revision not in down:  # the first of its two downgrades
                on_given_database(bind, url, "the downgrade check")
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
        run_env_with(target, config, script, fn, destination)

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
        return [f"revision {describe_revision(script, revision)}: its {which} fails{after}: {reason}{hint}"]
    for revision in order:  # from the heads down: the first difference is the cause of those below it
        children = [rev for rev in order if revision in _down(script, rev)]
        if children and revision in up and down[revision] != up[revision]:
            named = ", ".join(describe_revision(script, c) for c in children)
            return [f"revision {named}: its downgrade leaves another schema than revision {revision}'s upgrade made:",
                    *("  " + line for line in schema_difference(up[revision], down[revision]))]
    for revision in reversed(order):
        if cycled.get(revision, down[revision]) != down[revision]:
            return [f"revision {describe_revision(script, revision)}: its downgrade then its upgrade leave another "
                    "schema than it had:",
                    *("  " + line for line in schema_difference(down[revision], cycled[revision]))]
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
