"""Issue 4, the `pgshard` command: status, clean, and a persistent embedded server, against real PostgreSQL.

Every test works under a prefix of its own: the rest of the suite creates and drops `pgshard_*` databases on
the same server at the same time, and `clean` must neither see nor touch those.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from pgshard.admin import Admin, Marker
from pgshard.cli import main
from pgshard.host import host_identity
from pgshard.server.base import ServerInfo, to_libpq
from pgshard.server.embedded import EmbeddedServer
from tests.conftest import Project, databases, remove_cache, secret_of

PGSHARD = Path(sys.executable).parent / "pgshard"  # the console script of this environment


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@dataclass
class Cli:
    out: str
    err: str
    ret: int


@dataclass
class Fixture:
    """A server, a prefix of our own on it, and helpers to make marked (and unmarked) databases."""

    url: str
    prefix: str
    admin: Admin
    fingerprint: str

    @property
    def template(self) -> str:
        return f"{self.prefix}_tpl_{self.fingerprint}"

    def make_template(self, fingerprint: str | None = None, **marker: Any) -> str:
        """Built by a run that has ended (unless ``pid`` says otherwise)."""
        fingerprint = fingerprint or self.fingerprint
        name = f"{self.prefix}_tpl_{fingerprint}"
        fields: dict[str, Any] = {"pid": dead_pid(), **marker}
        self.admin.create(name, Marker("template", "r0", fingerprint=fingerprint, **fields), template="template0")
        self.admin.seal(name)
        return name

    def make(self, suffix: str, kind: str = "clone", **marker: Any) -> str:
        name = f"{self.prefix}_{suffix}"
        fields: dict[str, Any] = {"run": suffix.split("_")[0], "fingerprint": self.fingerprint, **marker}
        self.admin.create(name, Marker(kind, **fields), template=self.template)
        return name

    def connections(self, name: str) -> int:
        row = self.admin.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()
        return int(row[0]) if row else 0

    def make_unmarked(self, suffix: str, comment: str | None = None) -> str:
        name = f"{self.prefix}_{suffix}"
        self.admin.conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if comment is not None:
            self.admin.conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name),
                                                                                   sql.Literal(comment)))
        return name

    def names(self) -> set[str]:
        return set(databases(self.admin.conn, self.prefix + "%"))

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> Cli:
        ret = main([*args, "--pg-url", self.url, "--prefix", self.prefix])
        captured = capsys.readouterr()
        return Cli(captured.out, captured.err, ret)


@pytest.fixture
def ours(pg_server: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fixture]:
    monkeypatch.chdir(tmp_path)  # no project ini around: only the flags count
    prefix = "pgcli" + uuid.uuid4().hex[:8]
    admin = Admin(pg_server.url, prefix)
    yield Fixture(pg_server.url, prefix, admin, uuid.uuid4().hex[:16])
    for name in databases(admin.conn, prefix + "%"):
        admin.conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name)))
        admin.conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    admin.close()


def test_status_lists_templates_and_clones_with_their_owners(ours: Fixture,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    template = ours.make_template()
    live = ours.make("r1_gw0")  # pid: this process, alive
    gone = ours.make("r2_gw0", pid=dead_pid())
    kept = ours.make("r3_gw0", kind="kept")
    elsewhere = ours.make("r4_gw0", host="ci-runner-7", pid=1, started=time.time() - 3600)

    result = ours.cli(capsys, "status")
    assert result.ret == 0, result.err
    out = result.out
    assert secret_of(ours.url) not in out and "pgshard@127.0.0.1" in out
    assert f"prefix:   {ours.prefix}" in out
    template_line = next(line for line in out.splitlines() if line.strip().startswith(template))
    assert ours.fingerprint in template_line and " MB" in template_line and "r0" in template_line
    live_line = next(line for line in out.splitlines() if line.strip().startswith(live))
    assert f" {os.getpid()} " in live_line and " alive " in live_line and "stale" not in live_line
    gone_line = next(line for line in out.splitlines() if line.strip().startswith(gone))
    assert " dead " in gone_line and gone_line.rstrip().endswith("stale")
    assert "kept clones (--pg-keep): 1" in out and kept in out
    other_line = next(line for line in out.splitlines() if line.strip().startswith(elsewhere))
    assert "ci-runner-7" in other_line and " ? " in other_line and "1h 0m" in other_line
    assert "1 stale" in out

    result = ours.cli(capsys, "status", "--json")
    document = json.loads(result.out)
    assert document["prefix"] == ours.prefix
    by_name = {db["name"]: db for db in document["databases"]}
    assert set(by_name) == {template, live, gone, kept, elsewhere}
    assert by_name[template]["kind"] == "template" and by_name[template]["fingerprint"] == ours.fingerprint
    assert by_name[template]["size_bytes"] > 0
    assert by_name[live] | {"alive": True, "stale": False, "host": host_identity()} == by_name[live]
    assert (by_name[gone]["alive"], by_name[gone]["stale"]) == (False, True)
    assert (by_name[elsewhere]["alive"], by_name[elsewhere]["stale"]) == (None, False)
    assert by_name[kept]["kind"] == "kept"


def test_clean_dry_run_lists_and_drops_nothing(ours: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    ours.make_template()
    gone = ours.make("r2_gw0", pid=dead_pid())
    expired = ours.make("r4_gw0", host="ci-runner-7", started=time.time() - 25 * 3600)
    ours.make("r5_gw0", host="ci-runner-8", started=time.time() - 3600)
    ours.make("r1_gw0")
    ours.make_unmarked("mine")
    before = ours.names()

    result = ours.cli(capsys, "clean", "--dry-run")
    assert result.ret == 0, result.err
    listed = {line.split()[2] for line in result.out.splitlines() if line.startswith("  would drop ")}
    assert listed == {gone, expired}
    assert "would drop 2 stale database(s)" in result.out and "dry run, nothing was dropped" in result.out
    assert ours.names() == before

    result = ours.cli(capsys, "clean", "--all", "--dry-run")
    assert result.ret == 0, result.err
    assert "dry run, nothing was dropped" in result.out
    assert ours.names() == before


def test_clean_drops_stale_clones_and_never_a_database_without_the_marker(
        ours: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    template = ours.make_template()
    gone = ours.make("r2_gw0", pid=dead_pid())
    half_built = ours.make("r6_build", kind="build", pid=dead_pid())
    expired = ours.make("r4_gw0", host="ci-runner-7", started=time.time() - 25 * 3600)
    fresh_elsewhere = ours.make("r5_gw0", host="ci-runner-8", started=time.time() - 3600)
    live = ours.make("r1_gw0")
    kept = ours.make("r3_gw0", kind="kept", pid=dead_pid())
    unmarked = ours.make_unmarked("mine")
    foreign_comment = ours.make_unmarked("commented", comment="production copy, do not drop")

    result = ours.cli(capsys, "clean")
    assert result.ret == 0, result.err
    assert ours.names() == {template, fresh_elsewhere, live, kept, unmarked, foreign_comment}
    dropped = {line.split()[1] for line in result.out.splitlines() if line.startswith("  dropped ")}
    assert dropped == {gone, half_built, expired}
    assert "dropped 3 stale database(s)" in result.out

    again = ours.cli(capsys, "clean")
    assert "dropped 0 stale database(s)" in again.out
    assert ours.names() == {template, fresh_elsewhere, live, kept, unmarked, foreign_comment}


def test_clean_all_spares_live_runs_open_connections_and_unmarked_databases(
        ours: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    template = ours.make_template()
    being_built_on = ours.make_template("0" * 16, pid=os.getpid())  # its builder still runs
    live = ours.make("r1_gw0")  # this process: a live run on this host, cloned from the template
    kept = ours.make("r3_gw0", kind="kept", pid=dead_pid())
    looked_at = ours.make("r7_gw0", kind="kept", pid=dead_pid())
    fresh_elsewhere = ours.make("r5_gw0", host="ci-runner-8", started=time.time() - 3600)
    unmarked = ours.make_unmarked("mine")
    foreign_comment = ours.make_unmarked("commented", comment="production copy, do not drop")

    looked_at_url = make_url(ours.url).set(database=looked_at).render_as_string(hide_password=False)
    with psycopg.connect(to_libpq(looked_at_url), autocommit=True):  # someone in psql on a kept clone
        result = ours.cli(capsys, "clean", "--all")
        assert result.ret == 0, result.err
        assert ours.names() == {template, being_built_on, live, looked_at, unmarked, foreign_comment}
    assert kept not in ours.names() and fresh_elsewhere not in ours.names()
    reasons = {line.split()[1].rstrip(":"): line for line in result.out.splitlines() if line.startswith("  kept ")}
    assert set(reasons) == {template, being_built_on, live, looked_at}
    assert f"built by a live run on this host (pid {os.getpid()})" in reasons[being_built_on]
    assert f"live runs on this host clone from it (pids {os.getpid()})" in reasons[template]
    assert f"in use by a live run on this host (pid {os.getpid()})" in reasons[live]
    assert "1 open connection(s)" in reasons[looked_at]

    ours.admin.drop(live, force=True)  # the run ended: now its template goes too
    deadline = time.monotonic() + 60  # a closed connection's backend leaves pg_stat_activity a moment later
    while ours.connections(looked_at) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ours.connections(looked_at) == 0
    result = ours.cli(capsys, "clean", "--all")
    assert result.ret == 0, result.err
    assert ours.names() == {being_built_on, unmarked, foreign_comment}


def test_errors_are_one_masked_line_with_exit_code_2(ours: Fixture, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["status", "--pg-url", "postgresql://someone:s3cr3t-pw@127.0.0.1:1/app"], "cannot connect"),
        (["clean", "--prefix", "Bad-Prefix", "--pg-url", ours.url], "pgshard_prefix"),
        (["clean", "--everything"], "unrecognized arguments: --everything"),
        (["server", "restart"], "invalid choice: 'restart'"),
        (["status", "--pg-server", "url"], "--pg-server url needs --pg-url"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("pgshard: ") and needle in lines[0], (argv, captured.err)
        assert "s3cr3t-pw" not in captured.err


def test_the_console_script_runs_status_and_fails_cleanly(ours: Fixture) -> None:
    template = ours.make_template()
    env = {**os.environ, "PGSHARD_URL": ours.url, "PGSHARD_PREFIX": ours.prefix}
    proc = subprocess.run([str(PGSHARD), "status"], capture_output=True, text=True, env=env, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr
    assert template in proc.stdout and ours.fingerprint in proc.stdout
    bad = subprocess.run([str(PGSHARD), "clean", "--pg-url", "postgresql://someone:s3cr3t-pw@127.0.0.1:1/app"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "s3cr3t-pw" not in bad.stderr
    assert len(bad.stderr.splitlines()) == 1 and "someone@127.0.0.1:1" in bad.stderr


def test_settings_come_from_the_projects_pytest_ini(ours: Fixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    template = ours.make_template()
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.pytest.ini_options]\npgshard_url = "{ours.url}"\npgshard_prefix = "{ours.prefix}"\n')
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # like pytest: found from a subdirectory too
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "server:   url (--pg-url)" in out and template in out


# -- the embedded server --------------------------------------------------------------------------------------
@pytest.fixture
def own_cache(tmp_path: Path) -> Iterator[Path]:
    """A cache dir (so an embedded server) of our own: the suite's shared server must not be disturbed."""
    cache = Path("/dev/shm" if Path("/dev/shm").is_dir() else tmp_path) / f"pgshard-test-{uuid.uuid4().hex[:8]}"
    yield cache
    remove_cache(cache)


def _pgshard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PGSHARD), *args], capture_output=True, text=True, env=dict(os.environ))


def _server_status() -> dict[str, object]:
    proc = _pgshard("server", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    status: dict[str, object] = json.loads(proc.stdout)
    return status


def test_server_start_is_used_by_runs_which_leave_it_running_until_stop(
        project: Project, own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(own_cache))
    started = _pgshard("server", "start")
    assert started.returncode == 0, started.stderr
    assert "started, persistent" in started.stdout
    status = _server_status()
    assert status["running"] is True and status["persistent"] is True and status["leases"] == []
    port = status["port"]
    assert f"pgshard@127.0.0.1:{port}/postgres" in started.stdout

    project.pytester.makepyfile(test_one="def test_one(pg_database):\n    pass\n")
    result = project.run("-n", "2")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*server: embedded PostgreSQL*127.0.0.1:{port}/postgres*"])
    status = _server_status()
    assert (status["running"], status["port"], status["persistent"]) == (True, port, True)

    again = _pgshard("server", "start")
    assert "was already running; now persistent" in again.stdout

    holder = EmbeddedServer(cache_dir=own_cache)  # a run in progress holds a lease
    holder.acquire()
    try:
        stopping = _pgshard("server", "stop")
        assert stopping.returncode == 0, stopping.stderr
        assert f"no longer persistent; still used by pids {os.getpid()}" in stopping.stdout
        status = _server_status()
        assert (status["running"], status["persistent"]) == (True, False)
    finally:
        assert holder.release() is True  # the last user out stops it
    assert _server_status()["running"] is False

    _pgshard("server", "start")
    stopped = _pgshard("server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert _server_status()["running"] is False
    assert "not running" in _pgshard("server", "stop").stdout


def test_status_on_a_stopped_embedded_server_starts_nothing(
        own_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    server = EmbeddedServer(cache_dir=own_cache)
    server.acquire()  # a cluster that exists, stopped again
    assert server.release() is True
    for args in ([], ["--json"]):
        assert main(["status", "--cache-dir", str(own_cache), *args]) == 0
        out = capsys.readouterr().out
        assert server.running_port() is None and not server._live_leases(), "status started the server"
        if args:
            assert json.loads(out)["server"]["running"] is False
        else:
            assert "running:  no (status starts nothing" in out

    info = server.acquire()  # this process is a run using it; the in-process command must not end its lease
    try:
        assert main(["status", "--cache-dir", str(own_cache)]) == 0
        out = capsys.readouterr().out
        assert "running:  yes, started by a run" in out and info.masked_url in out
        assert server.running_port() is not None
        assert server.status()["leases"] == [str(os.getpid())]
    finally:
        assert server.release() is True
    assert server.running_port() is None


def test_version_prints_the_version_and_starts_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    from pgshard import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pgshard {__version__}"
