"""Issue 10 (items 1, 2, 5, 6, 8, 9, 10) and issue 11 item 1: the embedded server's process and cache, with
real processes, real signals and real PostgreSQL. Each test runs on a cache directory of its own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from pgshard.host import pid_alive, process_identity
from pgshard.server.base import ServerError, to_libpq
from pgshard.server.embedded import EmbeddedServer
from pgshard.settings import SettingsError, resolve
from tests.conftest import Project, remove_cache, secret_of

PGSHARD = str(Path(sys.executable).with_name("pgshard"))

ONE_DB_TEST = '''
from sqlalchemy import text

def test_select(db_session):
    assert db_session.execute(text("select 1")).scalar() == 1

def test_other(pg_database):
    assert pg_database.name
'''


@pytest.fixture
def cache() -> Iterator[Path]:
    """A cache dir of its own; afterwards no server of ours runs there (watchdogs exit with their home)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/var/tmp")
    path = base / f"pgshard-rel-{uuid.uuid4().hex[:8]}"
    yield path
    remove_cache(path)


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    """Generous waits: the machine is shared and loaded; a failure says what never happened."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.1)


def _in_cache(cache: Path, secret: str, allowed: set[Path]) -> list[Path]:
    found = []
    for path in cache.rglob("*"):
        if path.is_file() and not path.is_symlink() and path not in allowed:
            try:
                if secret.encode() in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


def assert_printed_nowhere(secret: str, result: pytest.RunResult, xml: Path, cache: Path) -> None:
    allowed = {*cache.rglob("passfile"), *(cache.rglob("passfiles/*"))}
    assert secret not in result.stdout.str()
    assert secret not in result.stderr.str()
    assert xml.is_file() and secret not in xml.read_text()
    assert _in_cache(cache, secret, allowed) == []


# -- item 1: a stale postmaster.pid naming a live stranger ------------------------------------------------------
SIGNAL_RECORDER = ("import signal, sys, time\n"
                   "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1):\n"
                   "    signal.signal(s, lambda n, f: print('got', n, flush=True))\n"
                   "print('ready', flush=True)\n"
                   "time.sleep(600)\n")


def _stranger() -> subprocess.Popen[str]:
    """A live process that is not ours to signal: as root one of user nobody, recording any signal it gets."""
    kwargs: dict[str, object] = {}
    python = sys.executable
    if os.geteuid() == 0:
        kwargs.update(user=65534, group=65534, extra_groups=[])
        python = shutil.which("python3", path="/usr/bin:/bin") or ""
    if not python:  # no system Python nobody may run: a sleep cannot record signals, but dies of most
        return subprocess.Popen(["sleep", "600"], stdout=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]
    proc: subprocess.Popen[str] = subprocess.Popen([python, "-c", SIGNAL_RECORDER], stdout=subprocess.PIPE, text=True,
                                                   cwd="/", **kwargs)  # type: ignore[call-overload]
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_live_stranger_named_in_a_stale_postmaster_pid_gets_no_signal_and_the_run_is_green(
        project: Project, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = EmbeddedServer(cache_dir=cache)
    server.acquire()
    assert server.release() is True  # initialised, stopped
    stranger = _stranger()
    try:
        lines = [str(stranger.pid), str(server.datadir), str(int(time.time())), "5432", str(server.sockdir),
                 "127.0.0.1", "  5432001      2", "ready   "]
        (server.datadir / "postmaster.pid").write_text("\n".join(lines) + "\n")
        assert server.running_port() is None  # not taken for the server
        server.stop()  # nor signalled by a stop
        monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache))
        project.pytester.makepyfile(test_one=ONE_DB_TEST)
        project.run().assert_outcomes(passed=2)
        assert server.running_port() is None  # the run stopped its own server at the end
        assert stranger.poll() is None, "the stranger died"
    finally:
        stranger.kill()
        out, _ = stranger.communicate()
    assert "got" not in out, f"the stranger received a signal: {out!r}"


def test_a_lease_naming_a_live_stranger_does_not_keep_the_server_up(cache: Path) -> None:
    server = EmbeddedServer(cache_dir=cache)
    stranger = _stranger()
    try:
        server.acquire()
        pid = server.cluster.postmaster()
        # a lease file naming a live process whose start time differs (a recycled pid), and one of an
        # older pgshard that recorded no start time at all
        (server.leases / str(stranger.pid)).write_text(f"{stranger.pid}:1")
        (server.leases / str(os.getppid())).write_text("")
        assert server.release() is True
        assert pid is not None and not pid_alive(pid)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.communicate()


# -- item 2: no password printed -------------------------------------------------------------------------------
STOP_MIDRUN = '''
import os, signal, time
from sqlalchemy import text

def test_1_before(db_session):
    assert db_session.execute(text("select 1")).scalar() == 1

def test_2_the_server_stops():
    pid = int(os.environ["PGSHARD_TEST_STOP_PID"])
    os.kill(pid, signal.SIGINT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)

def test_3_session_after(db_session):
    db_session.execute(text("select 1"))

def test_4_engine_after(pg_engine):
    with pg_engine.connect() as conn:
        conn.execute(text("select 1"))
'''


def test_a_pg_url_password_is_printed_nowhere_when_its_server_stops_mid_run(
        project: Project, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = EmbeddedServer(cache_dir=cache / "theirs")
    info = theirs.acquire()
    try:
        password = f"Kn0wn-{uuid.uuid4().hex}"
        with psycopg.connect(to_libpq(info.url), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE tester LOGIN CREATEDB PASSWORD '{password}'")
        url = make_url(info.url).set(username="tester", password=password, query={}).render_as_string(
            hide_password=False)
        monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache / "ours"))
        monkeypatch.setenv("PGSHARD_TEST_STOP_PID", str(theirs.cluster.postmaster()))
        project.pytester.makepyfile(test_stop=STOP_MIDRUN)
        xml = project.root / "report.xml"
        result = project.run("--pg-url", url, "-rA", "--tb=long", "--showlocals", f"--junitxml={xml}")
        outcomes = result.parseoutcomes()
        # after the first failure the run stops with one line saying the server died (faults)
        assert outcomes.get("passed") == 2 and outcomes.get("failed", 0) + outcomes.get("errors", 0) >= 1
        assert "tester@127.0.0.1" in result.stdout.str()  # the URLs were printed, without their password
        assert_printed_nowhere(password, result, xml, cache)
    finally:
        theirs.release()


FAIL_TO_CONNECT = '''
import asyncio
import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine


def _elsewhere(url, driver, database="no_such_db"):
    return make_url(url).set(drivername=driver, database=database)


def test_asyncpg_reads_the_passfile(pg_database):
    async def go():
        engine = create_async_engine(_elsewhere(pg_database.url, "postgresql+asyncpg", pg_database.name))
        async with engine.connect() as conn:
            assert (await conn.execute(text("select 1"))).scalar() == 1
        await engine.dispose()
    asyncio.run(go())


def test_sqlalchemy_psycopg(pg_database):
    with create_engine(_elsewhere(pg_database.url, "postgresql+psycopg")).connect() as conn:
        conn.execute(text("select 1"))


def test_libpq(pg_database):
    psycopg.connect(_elsewhere(pg_database.url, "postgresql").render_as_string(hide_password=False))


def test_asyncpg(pg_database):
    async def go():
        async with create_async_engine(_elsewhere(pg_database.url, "postgresql+asyncpg")).connect() as conn:
            await conn.execute(text("select 1"))
    asyncio.run(go())
'''


def test_the_embedded_servers_secret_is_printed_nowhere_when_tests_fail_to_connect(
        project: Project, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache))
    project.pytester.makepyfile(test_connect=FAIL_TO_CONNECT)
    xml = project.root / "report.xml"
    result = project.run("-rA", "--tb=long", "--showlocals", f"--junitxml={xml}")
    result.assert_outcomes(passed=1, failed=3)
    out = result.stdout.str()
    assert "no_such_db" in out and "passfile" in out  # the failures and their locals were printed
    secret = secret_of(EmbeddedServer(cache_dir=cache).url(1))
    assert len(secret) >= 20
    assert_printed_nowhere(secret, result, xml, cache)


def test_pgshard_env_password_is_empty_for_the_embedded_server_and_passfile_names_the_file() -> None:
    from pgshard.settings import placeholders

    values = placeholders("postgresql+psycopg://pgshard@127.0.0.1:5/db?passfile=%2Fc%2Fpassfile")
    assert values["password"] == "" and values["passfile"] == "/c/passfile"
    assert "passfile=" in values["url"] and "passfile=" in values["asyncpg_url"]


# -- item 5: cache-dir paths -----------------------------------------------------------------------------------
def _unusable_cache(kind: str, tmp_path: Path) -> tuple[list[str], Path]:
    """(command prefix, cache dir) for a cache dir pgshard cannot create."""
    if kind == "proc":
        return [], Path("/proc/x/pgshard")
    if kind == "parent is a file":
        (tmp_path / "a-file").write_text("")
        return [], tmp_path / "a-file" / "cache"
    target = tmp_path / "read-only"
    target.mkdir()
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                           check=False)
    if probe.returncode == 0:  # a read-only mount in a private namespace of its own
        script = 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(target)], target / "cache"
    for line in Path("/proc/mounts").read_text().splitlines():  # else any read-only mount on this machine
        fields = line.split()
        if len(fields) > 3 and "ro" in fields[3].split(",") and Path(fields[1]).is_dir():
            return [], Path(fields[1]) / f"pgshard-{uuid.uuid4().hex[:6]}"
    pytest.fail("no way to get a read-only filesystem here (unshare --mount refused, no read-only mount)")


@pytest.mark.parametrize("kind", ["proc", "parent is a file", "read-only filesystem"])
def test_a_cache_dir_that_cannot_be_made_is_one_line_naming_pgshard_cache_dir(
        kind: str, project: Project, tmp_path: Path) -> None:
    prefix, cache_dir = _unusable_cache(kind, tmp_path)
    project.pytester.makepyfile(test_one=ONE_DB_TEST)
    env = {**os.environ, "PGSHARD_CACHE_DIR": str(cache_dir)}
    ran = subprocess.run([*prefix, sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider"],
                         cwd=project.root, env=env, capture_output=True, text=True, timeout=300, check=False)
    text = ran.stdout + ran.stderr
    assert ran.returncode == 4, text  # a usage error, before any test
    lines = [line for line in text.splitlines() if "pgshard_cache_dir" in line]
    assert len(lines) == 1 and lines[0].startswith("ERROR: pgshard: cannot create"), text
    assert "Traceback" not in text and "RecursionError" not in text

    cli = subprocess.run([*prefix, PGSHARD, "status"], cwd=project.root, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert cli.returncode == 2 and cli.stdout == ""
    assert cli.stderr.count("\n") == 1 and "pgshard_cache_dir" in cli.stderr, cli.stderr


# -- item 6: initdb's cause -----------------------------------------------------------------------------------
def test_initdb_on_a_full_disk_says_why_and_names_pgshard_cache_dir(cache: Path) -> None:
    tiny = cache  # reachable by the server account, unlike pytest's tmp_path as root
    tiny.mkdir(mode=0o755)
    code = textwrap.dedent(f"""
        from pathlib import Path
        from pgshard.server.embedded import EmbeddedServer
        from pgshard.server.base import ServerError
        try:
            EmbeddedServer(cache_dir=Path({str(tiny / "cache")!r})).acquire()
        except ServerError as exc:
            print("ERROR", exc)
    """)
    script = 'mount -t tmpfs -o size=20m,mode=0755 tmpfs "$0" && exec "$@"'
    ran = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(tiny),
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert ran.returncode == 0, ran.stderr
    line = ran.stdout.strip()
    assert line.startswith("ERROR initdb failed") and "\n" not in line, ran.stdout
    assert "No space left on device" in line and "pgshard_cache_dir" in line


# -- item 8 and issue 11 item 1: no server outlives its users; linger ----------------------------------------
HANG = '''
import os, time

def test_hangs(pg_database):
    open(os.environ["PGSHARD_TEST_MARKER"], "w").close()
    time.sleep(600)
'''


def _watchdog_gone(cache: Path) -> bool:
    return not any(cache.glob("pg*-*/watchdog"))


def test_a_sigkilled_run_leaves_no_server_behind(project: Project, cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    project.pytester.makepyfile(test_hang=HANG)
    env = {**os.environ, "PGSHARD_CACHE_DIR": str(cache), "PGSHARD_TEST_MARKER": str(marker)}
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:randomly", "-p", "no:cacheprovider"],
                           cwd=project.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        wait_until(marker.exists, 180, "the inner test starting")
        server = EmbeddedServer(cache_dir=cache)
        postmaster = server.cluster.postmaster()
        assert postmaster is not None
        os.killpg(run.pid, signal.SIGKILL)  # the whole run: controller and xdist workers
        run.wait()
        wait_until(lambda: not pid_alive(postmaster), 120, "the postmaster stopping")
        wait_until(lambda: _watchdog_gone(cache), 60, "the watchdog exiting")
    finally:
        with_group = run.poll() is None
        if with_group:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()


def test_linger_keeps_the_server_warm_for_the_next_run_then_stops_it(
        project: Project, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache))
    monkeypatch.setenv("PGSHARD_LINGER", "20")  # generous: runs start slowly on a loaded machine
    project.pytester.makepyfile(test_one=ONE_DB_TEST)
    project.run().assert_outcomes(passed=2)
    server = EmbeddedServer(cache_dir=cache)
    first = server.cluster.postmaster()
    assert first is not None, "the server stopped at once despite pgshard_linger"
    project.run().assert_outcomes(passed=2)
    assert server.cluster.postmaster() == first  # the second run found it warm: no restart
    wait_until(lambda: not pid_alive(first), 120, "the server stopping after the linger")
    wait_until(lambda: _watchdog_gone(cache), 60, "the watchdog exiting")


def test_linger_defaults_to_a_local_loop_and_to_zero_under_ci(tmp_path: Path) -> None:
    def linger(env: dict[str, str]) -> int:
        return resolve({}, env, lambda key: None, tmp_path).linger

    assert linger({}) >= 60
    assert linger({"CI": "false"}) >= 60
    assert linger({"CI": "true"}) == 0
    assert linger({"CI": "true", "PGSHARD_LINGER": "30"}) == 30
    for bad in ("-1", "soon"):
        with pytest.raises(SettingsError, match="PGSHARD_LINGER must"):
            linger({"PGSHARD_LINGER": bad})


def test_a_persistent_server_is_left_to_pgshard_server_stop(cache: Path) -> None:
    server = EmbeddedServer(cache_dir=cache, linger=0)
    server.acquire()
    server.set_persistent(True)
    assert server.release() is False
    postmaster = server.cluster.postmaster()
    wait_until(lambda: _watchdog_gone(cache), 60, "the watchdog leaving a persistent server")
    assert postmaster is not None and pid_alive(postmaster)
    server.set_persistent(False)  # `pgshard server stop` with no user left: the watchdog stops it
    wait_until(lambda: not pid_alive(postmaster), 60, "the server stopping once no longer persistent")


# -- item 9: a damaged cache is repaired -----------------------------------------------------------------------
def test_a_missing_pg_control_recreates_the_cluster_with_one_line(
        project: Project, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = EmbeddedServer(cache_dir=cache)
    server.acquire()
    assert server.release() is True
    (server.datadir / "global" / "pg_control").unlink()
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache))
    project.pytester.makepyfile(test_one=ONE_DB_TEST)
    result = project.run()
    result.assert_outcomes(passed=2)
    lines = [line for line in result.stdout.lines if "re-created it" in line]
    assert len(lines) == 1 and "global/pg_control is missing" in lines[0]
    project.run().assert_outcomes(passed=2)  # and the next run is quiet
    assert (server.datadir / "global" / "pg_control").is_file()


PASSFILE_DAMAGES: dict[str, Callable[[EmbeddedServer], None]] = {
    "is missing": lambda server: server.passfile.unlink(),
    "does not open its cluster": lambda server: server.passfile.write_text("*:*:*:pgshard:wrong\n"),
}


@pytest.mark.parametrize("reason", list(PASSFILE_DAMAGES))
def test_a_lost_passfile_gets_a_new_password_and_every_database_stays(reason: str, cache: Path) -> None:
    """The cluster itself is sound: a new password for its role, set in a single-user backend, not initdb
    (which would lose every template and every --pg-keep clone)."""
    server = EmbeddedServer(cache_dir=cache)
    info = server.acquire()
    with psycopg.connect(to_libpq(info.url), autocommit=True) as conn:
        conn.execute("CREATE DATABASE survives_the_repair")
    assert server.release() is True
    PASSFILE_DAMAGES[reason](server)
    again = EmbeddedServer(cache_dir=cache)
    info = again.acquire()
    try:
        assert len(again.notes) == 1 and reason in again.notes[0] and "new password" in again.notes[0], again.notes
        with psycopg.connect(to_libpq(info.url)) as conn:
            assert conn.execute("SELECT datname FROM pg_database WHERE datname = 'survives_the_repair'"
                                ).fetchone() == ("survives_the_repair",)
        assert server.passfile.stat().st_mode & 0o777 == 0o600
    finally:
        again.release()


DAMAGES: dict[str, Callable[[EmbeddedServer], None]] = {
    "syntax error in file": lambda server: (server.datadir / "postgresql.conf").open("a").write("not = valid ;;\n"),
    "pg_wal is missing": lambda server: shutil.rmtree(server.datadir / "pg_wal"),
}


@pytest.mark.parametrize("reason", list(DAMAGES))
def test_a_damaged_cluster_is_recreated_with_one_note(reason: str, cache: Path) -> None:
    server = EmbeddedServer(cache_dir=cache)
    server.acquire()
    assert server.release() is True
    DAMAGES[reason](server)
    again = EmbeddedServer(cache_dir=cache)
    info = again.acquire()
    try:
        assert len(again.notes) == 1 and reason in again.notes[0] and "re-created it" in again.notes[0]
        with psycopg.connect(to_libpq(info.url)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        again.release()


def test_a_damaged_template_names_pgshard_clean_server_which_repairs_it(
        project: Project, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache))
    project.pytester.makepyfile(test_one=ONE_DB_TEST)
    project.run().assert_outcomes(passed=2)
    server = EmbeddedServer(cache_dir=cache)
    info = server.acquire()
    try:
        with psycopg.connect(to_libpq(info.url), autocommit=True) as conn:
            row = conn.execute("SELECT oid FROM pg_database WHERE datname LIKE 'pgshard\\_tpl\\_%'").fetchone()
        assert row is not None
        shutil.rmtree(server.datadir / "base" / str(row[0]))  # the template's files are gone
    finally:
        server.release()
    result = project.run()
    assert result.ret != 0
    assert "is damaged" in result.stdout.str() and "pgshard clean --server" in result.stdout.str()

    env = {**os.environ, "PGSHARD_CACHE_DIR": str(cache)}
    cleaned = subprocess.run([PGSHARD, "clean", "--server"], cwd=project.root, env=env, capture_output=True,
                             text=True, timeout=300, check=False)
    assert cleaned.returncode == 0 and "removed" in cleaned.stdout, cleaned.stderr
    assert not cache.exists(), f"clean --server left {sorted(str(p.relative_to(cache)) for p in cache.rglob('*'))}"
    project.run().assert_outcomes(passed=2)


def test_clean_server_refuses_while_another_process_uses_it(cache: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from pgshard.server.embedded import EmbeddedServer
        EmbeddedServer(cache_dir=Path({str(cache)!r})).acquire()
        print("ready", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        server = EmbeddedServer(cache_dir=cache)
        with pytest.raises(ServerError, match=f"in use by pids {holder.pid}"):
            server.remove()
        assert server.running_port() is not None and server.home.is_dir()
    finally:
        holder.kill()
        holder.wait()


# -- item 10: waits say who holds the lock; lock files do not pile up -----------------------------------------
HOLD_LOCK = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from pgshard.lockfile import HolderLock
    lock = HolderLock(Path(sys.argv[1]), "building template pgshard_tpl_test", timeout=10)
    lock.acquire()
    print("held", flush=True)
    sys.stdin.readline()
    lock.release()
''')


def test_waiting_on_a_lock_says_once_who_holds_it_and_what_it_builds(cache: Path) -> None:
    server = EmbeddedServer(cache_dir=cache)
    server.acquire()  # initialised, so the waiter below only waits for the lock
    server.release()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(server.cluster.lock.path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        env = {**os.environ, "PGSHARD_CACHE_DIR": str(cache)}
        waiter = subprocess.Popen([PGSHARD, "clean"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert waiter.stderr is not None
        line = waiter.stderr.readline()  # blocks until the waiter speaks
        assert f"waiting for pid {holder.pid} (building template pgshard_tpl_test" in line
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        _, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0 and "waiting" not in err  # said once
    finally:
        holder.kill()
        holder.wait()


def test_the_coordinator_keeps_one_lock_file_per_server_and_project_whatever_the_fingerprint(
        project: Project, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """filelock's lock stays in place (nothing to unlink safely), so there must be one per project, not one
    per template built: three builds of two fingerprints leave the same two files (the lock and its holder
    record, empty once released)."""
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache))
    project.pytester.makepyfile(test_one=ONE_DB_TEST)
    project.run("-n", "2").assert_outcomes(passed=2)
    first = sorted(p.name for p in (cache / "locks").iterdir())
    project.run("--pg-rebuild").assert_outcomes(passed=2)
    project.write_migration("0003", "0002", 'op.add_column("item", sa.Column("extra", sa.Text))')  # new fingerprint
    project.run("-n", "2").assert_outcomes(passed=2)
    assert project.migrations_ran() == 2 + 2 + 3  # each of the three builds really ran its revisions
    names = sorted(p.name for p in (cache / "locks").iterdir())
    assert names == first and len(names) == 2 and names[0].endswith(".lock") and names[1].endswith(".lock.holder")
    assert (cache / "locks" / names[1]).read_text() == ""  # released: it names nobody


def test_a_lock_held_by_a_dead_process_is_taken_at_once(tmp_path: Path) -> None:
    from pgshard.lockfile import HolderLock, holder

    path = tmp_path / "x.lock"
    code = f"{HOLD_LOCK}".replace("sys.stdin.readline()", "import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, check=True, timeout=120)
    assert holder(path) is None  # its record names a dead process
    lock = HolderLock(path, "test", timeout=5)
    assert lock.acquire() < 5
    assert (holder(path) or {}).get("identity") == process_identity()
    lock.release()


def test_the_coordinator_lock_names_its_holder_to_a_waiter_and_is_free_once_the_holder_is_gone(
        tmp_path: Path) -> None:
    from pgshard.lockfile import CoordinatorLock, LockTimeout, set_announcer

    path = tmp_path / "x.lock"
    code = HOLD_LOCK.replace("HolderLock", "CoordinatorLock")
    holder_proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
    said: list[str] = []
    previous = set_announcer(said.append)
    try:
        assert holder_proc.stdout is not None and holder_proc.stdout.readline().strip() == "held"
        waiter = CoordinatorLock(path, "building template b", timeout=0.6, announce_after=0.2)
        with pytest.raises(LockTimeout, match=f"waited 1 s for pid {holder_proc.pid} \\(building template "
                                              "pgshard_tpl_test"):
            waiter.acquire()
        assert len(said) == 1 and f"waiting for pid {holder_proc.pid} (building template pgshard_tpl_test" in said[0]
        assert said[0].endswith("before building template b")
        holder_proc.kill()  # no release: the kernel drops a dead holder's flock
        holder_proc.wait()
        assert CoordinatorLock(path, "after", timeout=30).acquire() < 30
    finally:
        set_announcer(previous)
        holder_proc.kill()
        holder_proc.wait()


FULL_DISK_LOCK = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from pgshard.lockfile import HolderLock, LockTimeout

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    path = Path(sys.argv[1])
    lock = HolderLock(path, "holding on a full disk", timeout=5)
    lock.acquire()
    try:
        HolderLock(path, "waiting", timeout=0.3).acquire()
        print("both held")
    except LockTimeout:
        pass
    lock.release()
    other = HolderLock(path, "waiting", timeout=5)
    other.acquire()
    other.release()
    print("held, then released")
""")


def test_a_lock_whose_holder_record_cannot_be_written_is_held_then_released(tmp_path: Path) -> None:
    """On a full disk the holder's record cannot be written. The lock is held all the same, and released: a
    raise there once leaked the flock, and a run and its server's watchdog then waited on each other."""
    done = subprocess.run([sys.executable, "-c", FULL_DISK_LOCK, str(tmp_path / "x.lock")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == ["held, then released"]


def test_a_run_waiting_for_another_runs_template_build_says_who_builds_it(
        project: Project, cache: Path, tmp_path: Path) -> None:
    """The build holds on until the waiting run has said who builds (a condition, not a time: under load a
    run's start-up alone can take longer than any fixed sleep), then finishes; the waiter says it once."""
    started, release = tmp_path / "build-started", tmp_path / "release-the-build"
    project.pytester.makepyfile(slow_seed=f'''
        import time
        from pathlib import Path

        def main(url):
            Path({str(started)!r}).touch()
            deadline = time.monotonic() + 600
            while not Path({str(release)!r}).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
    ''')
    project.pytester.makeini("[pytest]\npgshard_migrate =\n    alembic:alembic.ini\n    python:slow_seed:main\n"
                             "pythonpath = .\n")
    project.pytester.makepyfile(test_one=ONE_DB_TEST)
    env = {**os.environ, "PGSHARD_CACHE_DIR": str(cache)}
    command = [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider"]
    builder = subprocess.Popen(command, cwd=project.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    waiter_log = tmp_path / "waiter.log"
    try:
        wait_until(started.exists, 180, "the first run's template build starting")
        with waiter_log.open("w") as log:
            waiter = subprocess.Popen(command, cwd=project.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      text=True)
        try:
            wait_until(lambda: "waiting for pid" in waiter_log.read_text(), 300, "the waiting run saying who builds")
        finally:
            release.touch()
            waiter.wait(timeout=600)
        text = waiter_log.read_text()
        said = [line for line in text.splitlines() if "waiting for pid" in line]
        assert waiter.returncode == 0, text[-3000:]
        assert len(said) == 1
        assert f"waiting for pid {builder.pid} (checking or building template pgshard_tpl_" in said[0]
    finally:
        release.touch()
        out, _ = builder.communicate(timeout=600)
    assert builder.returncode == 0, out[-3000:]
