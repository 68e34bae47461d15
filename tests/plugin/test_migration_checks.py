"""pgshard_check: the migrations checked where the template is built (heads, models, downgrade), each fault
caught with its one message, a clean project passing all three, and a warm run that runs none of it.

The projects are benchmarks/migration_history's: revision k creates table t{k}; env.py counts its runs.
"""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Collection
from pathlib import Path

import psycopg
import pytest

from benchmarks import migration_history
from pgshard.admin import Marker
from pgshard.alembic_project import AlembicTarget
from pgshard.host import pid_alive
from pgshard.verify import heads

ALL_CHECKS = "heads\n    models:app.models:Base\n    downgrade"
TEST = "def test_t5_is_there(db_session):\n    from sqlalchemy import text\n" \
       "    assert db_session.execute(text('SELECT count(*) FROM t5')).scalar() == 0\n"


def _project(pytester: pytest.Pytester, *, faults: Collection[str] = (), checks: str = ALL_CHECKS,
             step: str = "alembic:alembic.ini", extra: str = "", async_env: bool = False,
             legacy_table: bool = False) -> Path:
    migration_history.write(pytester.path, 5, faults=faults, async_env=async_env, token=uuid.uuid4().hex,
                            legacy_table=legacy_table)
    pytester.makeini(textwrap.dedent("""
        [pytest]
        pgshard_migrate = {step}
        pgshard_env = DATABASE_URL={{url}}
        pgshard_check =
            {checks}
        {extra}
    """).format(step=step, checks=checks, extra=extra))
    pytester.makepyfile(**{f"test_{pytester.path.name}": TEST})
    return pytester.path


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *args)


def _env_runs(root: Path) -> int:
    runs = root / "env-runs.txt"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def _leftovers(admin_conn: psycopg.Connection) -> list[str]:
    """Build and scratch databases on the server whose creator has exited: what a run that ended left (the
    server is shared with the tests running beside this one, whose builds are alive)."""
    rows = admin_conn.execute("SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
                              "WHERE datname LIKE 'pgshard%%_build' OR datname LIKE 'pgshard%%_build_check'")
    left = []
    for name, comment in rows.fetchall():
        marker = Marker.parse(comment)
        if marker is None or not pid_alive(marker.pid):
            left.append(name)
    return left


def _stopped_with(result: pytest.RunResult) -> str:
    """The one line the run stopped with (pytest's "Interrupted: ..." line)."""
    out = result.stdout.str()
    lines = [line for line in out.splitlines() if "Interrupted: pgshard: " in line]
    assert lines, out
    return lines[0]


def test_two_heads_are_one_message_naming_both_before_alembic_fails(pytester: pytest.Pytester) -> None:
    root = _project(pytester, faults=["two_heads"], checks="heads")
    result = _run(pytester)
    line = _stopped_with(result)
    assert "pgshard_check 'heads' failed: 2 Alembic heads in" in line
    assert "0004 (create t4), 0005 (create t5)" in line and "alembic merge" in line
    assert "Multiple head" not in result.stdout.str()  # not Alembic's own error from the upgrade
    assert _env_runs(root) == 0  # stopped before the build ran any migration
    result.assert_outcomes(errors=1)


def test_a_model_column_without_a_revision_is_named_with_its_table(pytester: pytest.Pytester) -> None:
    _project(pytester, faults=["model_column"], checks="models:app.models:Base")
    line = _stopped_with(_run(pytester))
    assert "pgshard_check 'models:app.models:Base' failed:" in line
    assert "column t1.nickname (VARCHAR(30)): in the models, not in the migrated schema" in line


def test_a_downgrade_that_leaves_a_table_behind_is_named_by_its_revision(pytester: pytest.Pytester,
                                                                       admin_conn: psycopg.Connection) -> None:
    _project(pytester, faults=["downgrade_leaves"], checks="downgrade")
    result = _run(pytester, "--tb=long")
    line = _stopped_with(result)
    assert "pgshard_check 'downgrade' failed: revision 0003 (create t3): its upgrade fails after its downgrade" in line
    assert 'relation "t3" already exists; its downgrade leaves that behind' in line
    assert _leftovers(admin_conn) == []  # the scratch clone and the failed build dropped


def test_a_downgrade_that_drops_more_than_its_revision_made_is_named(pytester: pytest.Pytester) -> None:
    _project(pytester, faults=["downgrade_drops_more"], checks="downgrade")
    line = _stopped_with(_run(pytester))
    assert "revision 0004 (create t4): its downgrade fails when run again after its upgrade" in line
    assert 'index "ix_t3_name" does not exist; its downgrade drops what its upgrade does not make' in line


def test_a_downgrade_whose_own_upgrade_repairs_it_is_found_on_the_way_up(pytester: pytest.Pytester) -> None:
    """The shape found in the FastAPI full-stack template: a downgrade that leaves the revision below with
    another schema than it had, which its own upgrade then overwrites (so its cycle alone looks sound)."""
    _project(pytester, faults=["downgrade_forgets_change"], checks="downgrade")
    result = _run(pytester)
    line = _stopped_with(result)
    assert "revision 0004 (create t4): its downgrade leaves another schema than revision 0003's upgrade made" in line
    out = result.stdout.str()
    assert "+ column public.t3.name character varying(50)\n" in out
    assert "- column public.t3.name character varying(50) not null" in out


def test_a_clean_project_passes_all_three_and_its_warm_run_runs_none_of_them(
        pytester: pytest.Pytester, admin_conn: psycopg.Connection) -> None:
    root = _project(pytester)
    cold = _run(pytester)
    cold.assert_outcomes(passed=1)
    assert "checks heads, models, downgrade passed in" in cold.stdout.str()
    assert _env_runs(root) == 4  # the build's upgrade; the models compared; the run down (every cycle), the run up
    warm = _run(pytester, "-n", "2")
    warm.assert_outcomes(passed=1)
    assert "reused (cache hit), checks heads, models, downgrade passed at its build (" in warm.stdout.str()
    assert _env_runs(root) == 4  # nothing checked again
    assert _leftovers(admin_conn) == []


def test_the_models_are_compared_as_the_projects_env_py_configures_autogenerate(pytester: pytest.Pytester) -> None:
    """env.py's include_object leaves another service's table out of autogenerate: the models check leaves
    it out too (as `alembic revision --autogenerate` would); without that hook the table is named."""
    root = _project(pytester, checks="models:app.models:Base", legacy_table=True)
    passed = _run(pytester)
    passed.assert_outcomes(passed=1)
    assert "checks models passed in" in passed.stdout.str()
    env = root / "alembic" / "env.py"
    env.write_text(env.read_text().replace(", include_object=include_object)", ")"))
    line = _stopped_with(_run(pytester))
    assert "the models (app.models:Base) differ from the migrated schema: table legacy: in the migrated schema, " \
           "not in the models;" in line


def test_warn_mode_runs_the_tests_and_says_what_failed_until_fixed(pytester: pytest.Pytester) -> None:
    root = _project(pytester, faults=["model_column"], extra="pgshard_check_mode = warn")
    warned = _run(pytester)
    warned.assert_outcomes(passed=1)
    out = warned.stdout.str()
    assert "checks heads, models, downgrade 1 failed (pgshard_check_mode = warn)" in out
    assert "pgshard_check 'models:app.models:Base': the models (app.models:Base) differ" in out
    runs = _env_runs(root)
    # the verdict is kept with the template: back in fail mode, the warm run stops on it without a rebuild
    (root / "tox.ini").write_text((root / "tox.ini").read_text().replace("= warn", "= fail"))  # makeini
    line = _stopped_with(_run(pytester))
    assert "pgshard_check 'models:app.models:Base' failed: pgshard_check 'models:app.models:Base': the models" \
        not in line  # the finding's own prefix is not repeated
    assert "column t1.nickname" in line
    assert _env_runs(root) == runs


def test_an_async_env_py_run_by_a_command_step_is_checked_too(pytester: pytest.Pytester) -> None:
    _project(pytester, faults=["downgrade_leaves"], step="command:alembic upgrade head", async_env=True)
    line = _stopped_with(_run(pytester))
    assert "pgshard_check 'downgrade' failed: revision 0003 (create t3)" in line


def test_a_check_that_cannot_apply_says_so_in_one_line(pytester: pytest.Pytester) -> None:
    migration_history.write(pytester.path, 2, token=uuid.uuid4().hex)
    pytester.makeini("[pytest]\npgshard_migrate = metadata:app.models:Base\npgshard_check = heads\n")
    pytester.makepyfile(test_meta="def test_t2(db_session):\n    from sqlalchemy import text\n"
                                  "    db_session.execute(text('SELECT 1 FROM t2'))\n")
    result = _run(pytester)
    result.assert_outcomes(passed=1)
    assert "pgshard_check 'heads' does not apply: pgshard_migrate has no alembic: step and no command:alembic " \
           "upgrade step, so there are no Alembic heads to count" in result.stdout.str()


@pytest.mark.parametrize(("ini", "expected"), [
    ("pgshard_check = head", "pgshard_check line 'head' must be one of: heads, models:pkg.models:Base, downgrade"),
    ("pgshard_check = models:app.models", "pgshard_check line 'models:app.models' must be one of"),
    ("pgshard_check = heads\npgshard_check_mode = loud", "pgshard_check_mode must be fail or warn, got 'loud'"),
])
def test_a_bad_check_line_is_one_error_naming_it(pytester: pytest.Pytester, ini: str, expected: str) -> None:
    pytester.makeini(f"[pytest]\npgshard_migrate = alembic:alembic.ini\n{ini}\n")
    (pytester.path / "alembic.ini").write_text("[alembic]\nscript_location = alembic\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = _run(pytester)
    assert expected in result.stdout.str() + result.stderr.str()
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert result.ret != 0


def test_heads_of_labelled_branches_are_not_a_fault_but_two_of_one_branch_are(tmp_path: Path) -> None:
    versions = tmp_path / "alembic" / "versions"
    versions.mkdir(parents=True)
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s/alembic\n")
    (tmp_path / "alembic" / "script.py.mako").write_text("")

    def revision(rev: str, down: str | None, labels: tuple[str, ...] | None = None) -> None:
        (versions / f"{rev}.py").write_text(f"revision = {rev!r}\ndown_revision = {down!r}\n"
                                            f"branch_labels = {labels!r}\ndepends_on = None\n"
                                            "def upgrade():\n    pass\ndef downgrade():\n    pass\n")

    revision("a1", None, ("app",))
    revision("a2", "a1")
    revision("b1", None, ("audit",))
    target = AlembicTarget(tmp_path / "alembic.ini", "heads")
    assert heads(target) == []
    revision("a3", "a1")  # a fork inside the app branch
    [line] = heads(target)
    assert line.startswith("2 Alembic heads of branch app in ") and "a2, a3" in line


def test_each_kind_of_autogenerate_difference_is_one_line_in_the_models_terms() -> None:
    import sqlalchemy as sa

    from pgshard.verify import describe_diff

    metadata = sa.MetaData()
    table = sa.Table("users", metadata, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("email", sa.String(80)), sa.Index("ix_users_email", "email"))
    assert describe_diff(("remove_table", table)) == "table users: in the migrated schema, not in the models"
    assert describe_diff(("add_column", None, "users", table.c.email)) == \
        "column users.email (VARCHAR(80)): in the models, not in the migrated schema"
    assert describe_diff(("add_index", next(iter(table.indexes)))) == \
        "index ix_users_email on users (email): in the models, not in the migrated schema"
    assert describe_diff(("modify_type", "app", "users", "email", {}, sa.String(40), sa.String(80))) == \
        "column app.users.email: type is VARCHAR(80) in the models, VARCHAR(40) in the migrated schema"
    assert describe_diff(("modify_nullable", None, "users", "email", {}, True, False)) == \
        "column users.email: nullable is False in the models, True in the migrated schema"
