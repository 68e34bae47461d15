"""Issue 4, must show: shards cover the suite exactly once; overlapping runs and shard jobs on one server stay
apart and build the template once in total; a killed run leaves nothing behind once the next one starts.

Each test's inner project works under a database prefix of its own, so what we count on the server is its
own, whatever the rest of the suite does on the same server meanwhile. The machine may have two cores only:
inner suites stay small (a handful of tests) while still running with ``-n 2``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgshard.host import pid_alive
from tests.conftest import Project, databases

RECORDING_TESTS = '''
import json, os, pytest
from sqlalchemy import text

@pytest.mark.parametrize("i", range({count}))
def test_item(i, request, pg_database, pg_engine):
    label = os.environ["RUN_LABEL"] + "/" + os.environ.get("PYTEST_XDIST_WORKER", "main")
    with pg_engine.begin() as conn:
        db = conn.execute(text("SELECT current_database()")).scalar()
        conn.execute(text("INSERT INTO item (worker) VALUES (:w)"), {{"w": label}})
        seen = set(conn.execute(text("SELECT DISTINCT worker FROM item")).scalars())
    assert db == pg_database.name
    assert seen == {{label}}, f"{{db}} holds rows of {{seen}}"
    with open(os.environ["PGSHARD_TEST_OUT"], "a") as fh:
        fh.write(json.dumps({{"test": request.node.nodeid, "run": label, "db": db}}) + "\\n")
'''

PLAIN_TESTS = '''
import os, pytest

@pytest.mark.parametrize("i", range(6))
def test_plain(i, request):
    with open(os.environ["PGSHARD_TEST_OUT"], "a") as fh:
        fh.write(request.node.nodeid + "\\n")
'''


class Jobs:
    """Inner pytest runs started at the same time, each in a process group of its own."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def out(self, label: str) -> Path:
        return self.project.root / f"records-{label}.jsonl"

    def log(self, label: str) -> Path:
        return self.project.root / f"output-{label}.txt"

    def start(self, label: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, "PGSHARD_TEST_OUT": str(self.out(label)), "RUN_LABEL": label, **env}
        with self.log(label).open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider",
                 f"--basetemp={self.project.root / ('tmp-' + label)}", *args],
                cwd=self.project.root, env=full_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.procs[label] = proc
        return proc

    def wait(self, label: str) -> pytest.RunResult:
        ret = self.procs[label].wait(timeout=600)
        lines = self.log(label).read_text().splitlines()
        return pytest.RunResult(ret, lines, [], 0.0)

    def records(self, label: str) -> list[dict[str, str]]:
        path = self.out(label)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def prefix() -> str:
    return "pgsh" + uuid.uuid4().hex[:8]


@pytest.fixture
def shard_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, prefix: str,
                  admin_conn: psycopg.Connection) -> Iterator[Project]:
    """The usual Alembic project (its migrations count their runs), under a database prefix of its own."""
    monkeypatch.setenv("PGSHARD_TEST_COUNTER", str(pytester.path / "migrations-ran.txt"))
    yield Project(pytester, ini=f"pgshard_prefix = {prefix}")
    for name in databases(admin_conn, prefix + "%"):
        admin_conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name)))
        admin_conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def jobs(shard_project: Project) -> Iterator[Jobs]:
    started = Jobs(shard_project)
    yield started
    started.kill_all()  # only after a failed assertion: leave no inner run behind


def _only_the_template_is_left(admin_conn: psycopg.Connection, prefix: str) -> str:
    left = databases(admin_conn, prefix + "%")
    assert len(left) == 1 and left[0].startswith(f"{prefix}_tpl_"), left
    return left[0]


def _template_lines(results: list[pytest.RunResult]) -> Counter[str]:
    """How many runs built the template, and how many reused it."""
    said: Counter[str] = Counter()
    for result in results:
        text = "\n".join(result.outlines)
        said["built"] += "(cache miss)" in text
        said["reused"] += "reused (cache hit)" in text
    return said


# -- shards ---------------------------------------------------------------------------------------------------
def test_the_shards_together_run_the_whole_suite_exactly_once(shard_project: Project, jobs: Jobs,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    shard_project.pytester.makepyfile(test_records=RECORDING_TESTS.format(count=7))
    everything = {f"test_records.py::test_item[{i}]" for i in range(7)}
    for n in (2, 3):
        ran: list[str] = []
        for k in range(1, n + 1):
            label = f"{k}-of-{n}"
            monkeypatch.setenv("PGSHARD_TEST_OUT", str(jobs.out(label)))
            monkeypatch.setenv("RUN_LABEL", label)
            result = shard_project.run("--shard", f"{k}/{n}")
            assert result.ret == 0, result.stdout.str()
            mine = [record["test"] for record in jobs.records(label)]
            result.assert_outcomes(passed=len(mine), deselected=7 - len(mine))
            assert len(mine) in (7 // n, 7 // n + 1)  # balanced by count: no durations file yet
            ran += mine
        assert sorted(ran) == sorted(everything), f"{n} shards: every test exactly once"


def test_two_runs_at_once_on_one_server_stay_apart_and_build_the_template_once(
        shard_project: Project, jobs: Jobs, admin_conn: psycopg.Connection, prefix: str) -> None:
    shard_project.pytester.makepyfile(test_records=RECORDING_TESTS.format(count=4))
    for label in ("a", "b"):
        jobs.start(label, "-n", "2")
    results = [jobs.wait(label) for label in ("a", "b")]
    for result in results:
        assert result.ret == 0, "\n".join(result.outlines)
        result.assert_outcomes(passed=4)
    assert shard_project.migrations_ran() == 2  # 0001 and 0002 once, for both runs together
    assert _template_lines(results) == Counter(built=1, reused=1)
    dbs = {label: {record["db"] for record in jobs.records(label)} for label in ("a", "b")}
    assert len(dbs["a"]) == len(dbs["b"]) == 2  # a database per worker, per run
    assert not dbs["a"] & dbs["b"]
    _only_the_template_is_left(admin_conn, prefix)


def test_four_shard_jobs_at_once_on_one_server_cover_the_suite_and_build_the_template_once(
        shard_project: Project, jobs: Jobs, admin_conn: psycopg.Connection, prefix: str) -> None:
    shard_project.pytester.makepyfile(test_records=RECORDING_TESTS.format(count=8))
    labels = [f"shard{k}" for k in range(1, 5)]
    for k, label in enumerate(labels, 1):
        jobs.start(label, "-n", "2", PGSHARD_SHARD=f"{k}/4")  # as a CI matrix sets it
    results = [jobs.wait(label) for label in labels]
    for result in results:
        assert result.ret == 0, "\n".join(result.outlines)
        result.assert_outcomes(passed=2)
    ran = [record["test"] for label in labels for record in jobs.records(label)]
    assert sorted(ran) == sorted(f"test_records.py::test_item[{i}]" for i in range(8))
    assert shard_project.migrations_ran() == 2
    assert _template_lines(results) == Counter(built=1, reused=3)
    used = [{record["db"] for record in jobs.records(label)} for label in labels]
    assert sum(map(len, used)) == len(set().union(*used)), f"two jobs shared a database: {used}"
    _only_the_template_is_left(admin_conn, prefix)


# -- a run killed half-way ------------------------------------------------------------------------------------
SLEEPING_TESTS = '''
import json, os, time, pytest

@pytest.mark.parametrize("i", range(2))
def test_a_slow(i, pg_database):
    if os.environ.get("SLEEP_DIR"):  # the run that gets killed: say where we are, then hang
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        path = os.path.join(os.environ["SLEEP_DIR"], worker + ".json")
        with open(path + ".tmp", "w") as fh:
            json.dump({"db": pg_database.name, "pid": os.getpid()}, fh)
        os.replace(path + ".tmp", path)
        time.sleep(3600)


def test_b_quick(pg_database):
    pass
'''


def test_a_run_killed_mid_way_leaves_nothing_after_the_next_run(
        shard_project: Project, jobs: Jobs, admin_conn: psycopg.Connection, prefix: str, tmp_path: Path) -> None:
    shard_project.pytester.makepyfile(test_sleeping=SLEEPING_TESTS)
    signals = tmp_path / "sleeping"
    signals.mkdir()
    # 3 tests on 2 workers: xdist deals them round robin, so each worker hangs in one of the two slow tests
    doomed = jobs.start("doomed", "-n", "2", SLEEP_DIR=str(signals))
    deadline = time.monotonic() + 300
    while len(list(signals.glob("gw*.json"))) < 2:
        assert doomed.poll() is None, jobs.log("doomed").read_text()
        assert time.monotonic() < deadline, "the doomed run never reached its slow tests"
        time.sleep(0.1)
    os.killpg(doomed.pid, signal.SIGKILL)  # the controller and its workers, as CI does on a timeout
    doomed.wait()
    sleepers = [json.loads(path.read_text()) for path in signals.glob("gw*.json")]
    while any(pid_alive(sleeper["pid"]) for sleeper in sleepers):  # SIGKILL is delivered, not yet acted on
        assert time.monotonic() < deadline, "the workers survived SIGKILL of their process group"
        time.sleep(0.05)
    left = {sleeper["db"] for sleeper in sleepers}
    assert len(left) == 2 and left <= set(databases(admin_conn, prefix + "%")), "the kill left its clones"

    result = shard_project.run("-n", "2")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*reused (cache hit)*"])
    result.stdout.fnmatch_lines([f"dropped 2 database(s) left by dead runs: {', '.join(sorted(left))}"])
    _only_the_template_is_left(admin_conn, prefix)


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "env", "shown"), [
    (["--shard", "0/4"], {}, "0/4"),
    (["--shard", "5/4"], {}, "5/4"),
    (["--shard", "a/b"], {}, "a/b"),
    ([], {"PGSHARD_SHARD": "a/b"}, "a/b"),
], ids=["zero", "beyond-n", "not-numbers", "env"])
def test_a_bad_shard_is_one_usage_error(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                        args: list[str], env: dict[str, str], shown: str) -> None:
    pytester.makepyfile(test_plain=PLAIN_TESTS)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = pytester.runpytest_subprocess("-p", "no:randomly", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if "pgshard:" in line]
    assert errors == [f"ERROR: pgshard: --shard (or PGSHARD_SHARD) must look like K/N with 1 <= K <= N, "
                      f"got '{shown}'"], text


def _sorted_ids() -> list[str]:
    return sorted(f"test_plain.py::test_plain[{i}]" for i in range(6))


CORRUPT = ("{not json", "is not valid JSON")
STALE = ('{"version": 1, "durations": {"test_gone.py::test_old": 3.0, "test_gone.py::test_older": 9.0}}',
         "knows only 0 of the 6 collected tests, so it is stale")


@pytest.mark.parametrize(("content", "warning", "xdist"), [
    (*CORRUPT, []),
    (*STALE, []),
    (*CORRUPT, ["-n", "2"]),
], ids=["corrupt", "stale", "corrupt-xdist"])
def test_an_unusable_durations_file_warns_and_shards_by_count(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, content: str, warning: str,
        xdist: list[str]) -> None:
    pytester.makepyfile(test_plain=PLAIN_TESTS)
    (pytester.path / ".test_durations").write_text(content)
    out = pytester.path / "ran.txt"
    monkeypatch.setenv("PGSHARD_TEST_OUT", str(out))
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--shard", "2/2", *xdist)
    assert result.ret == 0, result.stdout.str()
    assert sorted(out.read_text().split()) == _sorted_ids()[1::2]  # the count split: every other test
    result.stdout.fnmatch_lines([f"*PytestWarning: pgshard: *{warning}*"])


def test_stored_durations_cover_every_test_under_xdist_and_drive_the_split(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_plain=PLAIN_TESTS)
    monkeypatch.setenv("PGSHARD_TEST_OUT", str(pytester.path / "ran.txt"))
    stored = pytester.runpytest_subprocess("-p", "no:randomly", "-n", "2", "--pg-store-durations")
    stored.assert_outcomes(passed=6)
    document = json.loads((pytester.path / ".test_durations").read_text())  # pytest-split's file and format
    assert sorted(document) == _sorted_ids()
    ran = []
    for k in (1, 2):
        out = pytester.path / f"ran-{k}.txt"
        monkeypatch.setenv("PGSHARD_TEST_OUT", str(out))
        result = pytester.runpytest_subprocess("-p", "no:randomly", "--shard", f"{k}/2")
        assert result.ret == 0 and "pgshard:" not in result.stdout.str(), result.stdout.str()
        ran += out.read_text().split()
    assert sorted(ran) == _sorted_ids()


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_an_empty_shard_is_green(pytester: pytest.Pytester, xdist: list[str]) -> None:
    pytester.makepyfile(test_two="def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    outcomes = [pytester.runpytest_subprocess("-p", "no:randomly", f"--shard={k}/3", *xdist) for k in (1, 2, 3)]
    assert sorted(result.ret for result in outcomes) == [0, 0, 0]
    assert sum(result.parseoutcomes().get("passed", 0) for result in outcomes) == 2
