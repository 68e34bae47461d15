"""Issue 8 items 1-3, must show: a suite written for one shared database goes parallel by ini lines alone.

The project under test is tests/projects/shared_db (settings read at import with pydantic-settings, a
module-level engine, a session-scoped autouse fixture seeding a fixed superuser, Alembic and a seed script
run by ``command:`` steps). Its own serial run is against a plain database on a second server, without
pgshard, prepared as its README says: ``alembic upgrade head`` then ``python scripts/seed.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgshard.server.base import ServerInfo, to_libpq
from pgshard.settings import database_url
from tests.conftest import Project

PROJECT = Path(__file__).parents[1] / "projects" / "shared_db"
COMMANDS = ("command:alembic upgrade head", "command:python scripts/seed.py")
SUITE_SIZE = 34  # tests in tests/projects/shared_db/tests

REVISION_0003 = '''
"""a bio per user"""
import os

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with open(os.environ["SHARED_DB_COUNTER"], "a") as fh:
        fh.write("0003\\n")
    op.add_column("users", sa.Column("bio", sa.Text))


def downgrade() -> None:
    op.drop_column("users", "bio")
'''

TEST_BIO = '''
from sqlalchemy import inspect

from app.db import engine


def test_users_have_a_bio():
    assert "bio" in {column["name"] for column in inspect(engine).get_columns("users")}
'''


OVERLAP = '''
import os, time
from pathlib import Path

import pytest

_arrived = False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    global _arrived
    yield
    if not _arrived:  # each worker waits, after its first set-up, until the other has set up too
        _arrived = True
        folder = Path(os.environ["OVERLAP_DIR"])
        (folder / os.environ.get("PYTEST_XDIST_WORKER", "main")).touch()
        deadline = time.monotonic() + 300
        while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
'''


class SharedDb:
    """A copy of tests/projects/shared_db with a template fingerprint of its own."""

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.root = pytester.path
        shutil.copytree(PROJECT, self.root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        with (self.root / "alembic" / "versions" / "0001_users.py").open("a") as fh:
            fh.write(f"# token: {uuid.uuid4().hex}\n")  # other tests' templates are not this one's

    def enable(self, migrate: tuple[str, ...] = COMMANDS, extra: str = "") -> None:
        """pgshard by ini lines alone: the project's conftest and app stay as they are."""
        lines = "\n".join(f"    {line}" for line in migrate)
        (self.root / "pytest.ini").write_text(
            f"[pytest]\ntestpaths = tests\npgshard_migrate =\n{lines}\npgshard_env = DATABASE_URL={{url}}\n{extra}")

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *args)

    def prepare_shared(self, url: str) -> None:
        """What the project's README asks of a developer: migrate and seed the one shared database."""
        env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(self.root)}
        for command in ([sys.executable, "-m", "alembic", "upgrade", "head"], [sys.executable, "scripts/seed.py"]):
            subprocess.run(command, cwd=self.root, env=env, check=True, capture_output=True)


@pytest.fixture
def shared_db(pytester: pytest.Pytester) -> SharedDb:
    return SharedDb(pytester)


@pytest.fixture
def shared_url(second_server: ServerInfo, shared_db: SharedDb) -> Iterator[str]:
    """One plain database on a second server, migrated and seeded: the project's own set-up."""
    name = f"shared_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(to_libpq(second_server.url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(second_server.url, name)
    shared_db.prepare_shared(url)
    yield url
    with psycopg.connect(to_libpq(second_server.url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _own_serial_run(shared_db: SharedDb, shared_url: str, monkeypatch: pytest.MonkeyPatch) -> int:
    with monkeypatch.context() as patch:
        patch.setenv("DATABASE_URL", shared_url)
        result = shared_db.run("-p", "no:pgshard")
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and outcomes.get("passed") == SUITE_SIZE, result.stdout.str()
    return SUITE_SIZE


def _green(result: pytest.RunResult, passed: int) -> None:
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()
    assert outcomes.get("passed") == passed and not outcomes.get("failed") and not outcomes.get("errors"), outcomes


# -- 1. the realistic project ----------------------------------------------------------------------
def test_without_pgshard_the_shared_database_suite_collides_under_xdist(
        shared_db: SharedDb, shared_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _own_serial_run(shared_db, shared_url, monkeypatch)
    monkeypatch.setenv("DATABASE_URL", shared_url)
    # Under load one worker can finish before the other starts, and two runs one after the other do not
    # collide; a barrier after each worker's first set-up makes them overlap, as on an idle machine.
    (shared_db.root / "overlap.py").write_text(OVERLAP)
    (shared_db.root / "arrived").mkdir()
    monkeypatch.setenv("OVERLAP_DIR", str(shared_db.root / "arrived"))
    parallel = shared_db.run("-p", "no:pgshard", "-p", "overlap", "-n", "2")
    outcomes = parallel.parseoutcomes()
    assert parallel.ret != 0
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) > 0, outcomes


def test_ini_lines_alone_make_it_pass_five_runs_of_five_in_parallel_and_serially(
        shared_db: SharedDb, shared_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    own = _own_serial_run(shared_db, shared_url, monkeypatch)
    shared_db.enable()
    for _ in range(5):
        _green(shared_db.run("-n", "2"), own)
        _green(shared_db.run(), own)


# -- 2. template steps out of process ----------------------------------------------------------------
def test_env_py_reading_the_apps_cached_settings_migrates_the_template(shared_db: SharedDb) -> None:
    # The conftest imports the app (settings cached with the worker's database) before the template
    # is built: in-process, env.py would migrate the worker's database, which does not exist yet.
    shared_db.enable(("alembic:alembic.ini", "command:python scripts/seed.py"))
    for args in (("-n", "2"), ()):
        result = shared_db.run(*args)
        _green(result, SUITE_SIZE)
    result.stdout.fnmatch_lines(["*reused (cache hit)*"])


def test_python_m_pytest_without_an_activated_venv_runs_command_alembic(
        shared_db: SharedDb, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = str(Path(sys.executable).parent)
    stripped = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bindir)
    assert shutil.which("alembic", path=stripped) is None  # else this test would prove nothing
    monkeypatch.setenv("PATH", stripped)
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    shared_db.enable()
    result = shared_db.run()
    _green(result, SUITE_SIZE)
    result.stdout.fnmatch_lines(["*template pgshard_tpl_*: built in * s (cache miss)*"])


# -- 3. the fingerprint sees every input ------------------------------------------------------------------
def test_a_new_revision_rebuilds_the_template_once_and_applies_it(
        shared_db: SharedDb, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = shared_db.root / "ran-0003.txt"
    monkeypatch.setenv("SHARED_DB_COUNTER", str(counter))
    shared_db.enable()
    shared_db.run("-n", "2").stdout.fnmatch_lines(["*: built in * s (cache miss)*"])
    unchanged = shared_db.run("-n", "2")
    _green(unchanged, SUITE_SIZE)
    unchanged.stdout.fnmatch_lines(["*reused (cache hit)*"])

    (shared_db.root / "alembic" / "versions" / "0003_bio.py").write_text(REVISION_0003)
    (shared_db.root / "tests" / "test_bio.py").write_text(TEST_BIO)
    changed = shared_db.run("-n", "2")
    _green(changed, SUITE_SIZE + 1)
    changed.stdout.fnmatch_lines(["*: built in * s (cache miss)*"])
    assert counter.read_text().splitlines() == ["0003"]  # built once, by one of the two workers

    again = shared_db.run("-n", "2")
    _green(again, SUITE_SIZE + 1)
    again.stdout.fnmatch_lines(["*reused (cache hit)*"])
    assert counter.read_text().splitlines() == ["0003"]


def test_pgshard_fingerprint_globs_rebuild_when_a_file_the_steps_read_changes(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = pytester.path / "seeded.txt"
    monkeypatch.setenv("SEED_COUNTER", str(counter))
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "names.csv").write_text(f"alice\n{uuid.uuid4().hex}\n")
    pytester.makepyfile(load="import os\nopen(os.environ['SEED_COUNTER'], 'a').write('seeded\\n')\n")
    pytester.makeini("[pytest]\npgshard_migrate = command:sh -c 'python load.py'\npgshard_fingerprint = data/*.csv\n")
    pytester.makepyfile(test_one="def test_one(pg_database):\n    pass\n")
    run = ("-p", "no:randomly", "-p", "no:cacheprovider")
    first = pytester.runpytest_subprocess(*run)
    first.assert_outcomes(passed=1)
    assert "names no file pgshard can hash" not in first.stdout.str()  # pgshard_fingerprint covers it
    pytester.runpytest_subprocess(*run).assert_outcomes(passed=1)
    assert counter.read_text().splitlines() == ["seeded"]
    (pytester.path / "data" / "names.csv").write_text(f"bob\n{uuid.uuid4().hex}\n")
    pytester.runpytest_subprocess(*run).assert_outcomes(passed=1)
    assert counter.read_text().splitlines() == ["seeded", "seeded"]


def test_a_command_with_no_known_inputs_is_named_once_in_the_summary(pytester: pytest.Pytester) -> None:
    pytester.makeini(f"[pytest]\npgshard_migrate = command:sh -c 'echo {uuid.uuid4().hex}'\n")
    pytester.makepyfile(test_one="import pytest\n@pytest.mark.parametrize('i', range(4))\n"
                                 "def test_one(i, pg_database):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=4)
    notes = [line for line in result.stdout.lines if "names no file pgshard can hash" in line]
    assert len(notes) == 1 and "pgshard_fingerprint" in notes[0], result.stdout.str()


def test_command_fingerprints_infer_alembic_files_and_modules(tmp_path: Path) -> None:
    from pgshard.settings import SettingsError
    from pgshard.steps import CommandMigrator, blind_commands, hash_globs

    (tmp_path / "migrations" / "versions").mkdir(parents=True)
    (tmp_path / "migrations" / "env.py").write_text("# env\n")
    (tmp_path / "other.ini").write_text("[alembic]\nscript_location = %(here)s/migrations\n")
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s/migrations\n")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "__init__.py").write_text("")
    (tmp_path / "tools" / "seed.py").write_text("# seed\n")
    (tmp_path / "seed.py").write_text("# seed\n")
    commands = ["alembic upgrade head", "python -m alembic -c other.ini upgrade head",
                "alembic --config=other.ini upgrade head", "python -m tools.seed", "python seed.py"]
    edits = [tmp_path / "migrations" / "env.py", tmp_path / "migrations" / "env.py",
             tmp_path / "migrations" / "env.py", tmp_path / "tools" / "seed.py", tmp_path / "seed.py"]
    for command, edit in zip(commands, edits, strict=True):
        migrator = CommandMigrator(f"command:{command}", command, tmp_path)
        before = migrator.fingerprint()
        edit.write_text(edit.read_text() + "# changed\n")
        assert migrator.fingerprint() != before, command
    new_revision = tmp_path / "migrations" / "versions" / "0001_x.py"
    alembic = CommandMigrator("command:alembic upgrade head", "alembic upgrade head", tmp_path)
    before = alembic.fingerprint()
    new_revision.write_text("revision = '0001'\n")
    assert alembic.fingerprint() != before
    assert blind_commands([alembic, CommandMigrator("command:make db", "make db", tmp_path)]) == ["command:make db"]
    digest, empty = hash_globs(["migrations/**/*.py", "nothing/*.csv"], tmp_path)
    assert empty == ["nothing/*.csv"] and digest == hash_globs(["migrations/**/*.py"], tmp_path)[0]
    with pytest.raises(SettingsError, match=r"pgshard_fingerprint line '/etc/.*' must be a glob relative"):
        hash_globs(["/etc/*.conf"], tmp_path)


# -- 1. the eager clone --------------------------------------------------------------------------------
EAGER_CONFTEST = '''
import os

import psycopg
import pytest


@pytest.fixture(scope="session", autouse=True)
def database_is_there():
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
    with open(os.environ["EAGER_RECORD"], "a") as fh:
        fh.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')} {name}\\n")
'''


@pytest.mark.parametrize(("ini", "eager"), [({"pgshard_migrate": "sql:schema.sql"}, True),
                                           ({"pgshard_env": "DATABASE_URL={url}"}, True),
                                           ({"pgshard_redirect": "app_test"}, True),
                                           ({"pgshard_app": "app:app", "pgshard_url": "postgresql://h/db"}, False)])
def test_only_options_the_projects_own_code_uses_make_pgshard_eager(ini: dict[str, str], eager: bool,
                                                                   tmp_path: Path) -> None:
    from pgshard.settings import resolve

    assert resolve({}, {}, lambda key: ini.get(key), tmp_path).eager is eager


@pytest.mark.parametrize("xdist", [("-n", "2"), ()], ids=["n2", "serial"])
def test_a_session_autouse_fixture_finds_the_worker_database_existing(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]) -> None:
    record = pytester.path / "record.txt"
    monkeypatch.setenv("EAGER_RECORD", str(record))
    pytester.makeini("[pytest]\npgshard_env = DATABASE_URL={libpq_url}\n")
    pytester.makeconftest(EAGER_CONFTEST)
    pytester.makepyfile(test_plain="import pytest\n@pytest.mark.parametrize('i', range(6))\n"
                                   "def test_plain(i):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *xdist)
    result.assert_outcomes(passed=6)
    seen = dict(line.split() for line in record.read_text().splitlines())
    assert set(seen) == ({"gw0", "gw1"} if xdist else {"main"})
    assert all(name.startswith("pgshard_") for name in seen.values()) and len(set(seen.values())) == len(seen)


def test_an_unconfigured_run_stays_lazy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "clone per worker" not in result.stdout.str() and "template" not in result.stdout.str()


def test_a_deselected_run_builds_nothing(project: Project) -> None:
    project.pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = project.run("-n", "2", "-k", "no_such_test")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert project.migrations_ran() == 0 and "clone per worker" not in result.stdout.str()


def test_a_failing_build_is_one_line_once_and_stops_the_run(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSHARD_TEST_COUNTER", str(pytester.path / "migrations-ran.txt"))
    broken = Project(pytester, fail_in="0002")
    pytester.makepyfile(test_many="import pytest\n@pytest.mark.parametrize('i', range(10))\n"
                                  "def test_many(i):\n    pass\n")
    result = broken.run("-n", "2", "-rs")
    outcomes = result.parseoutcomes()
    assert result.ret != 0 and not outcomes.get("passed") and outcomes.get("errors") == 1, outcomes
    assert broken.migrations_ran() == 2  # 0001 and the broken 0002, once: the other worker did not retry
    text = result.stdout.str()
    assert "Traceback" not in text
    assert "Interrupted: pgshard: pgshard_migrate step 'alembic:alembic.ini' failed" in text
    assert len([line for line in result.stdout.lines if line.startswith("pgshard: pgshard_migrate step")]) == 1
    assert "migration 0002 is broken" in text

