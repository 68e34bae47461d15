"""The one PostgreSQL server every contender shares, the harness's own databases on it, and the machine.

The server is pgshard's embedded one, in a cache directory of its own (``<default cache>-bench``), so a
benchmark never disturbs, nor is disturbed by, the templates of a developer's everyday runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from filelock import FileLock, Timeout
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

import pgshard
from pgshard.host import default_cache_dir
from pgshard.server.embedded import EmbeddedServer

BASE_DB = "bench_base"  # migrated once per harness run; the bare baseline's database is copied from it
BARE_DB = "bench_bare"
SQLA_DB = "bench_sqla"  # pytest-sqla's: a migrated copy, as for bare (it runs no DDL itself here)
SA_ALEMBIC_DB = "bench_sa"  # pytest-sqlalchemy-alembic's app URL; it creates bench_sa_test_<worker> itself
SA_RECIPE_DB = "bench_sarecipe"  # the same with the recipe: its reused databases must never see the other's rows
PACKAGES = ("pytest", "pytest-xdist", "SQLAlchemy", "psycopg", "alembic", "pytest-pgshard")


def default_server_dir() -> Path:
    base = default_cache_dir()
    return base.with_name(base.name + "-bench")


def url_of(server_url: str, database: str) -> str:
    return make_url(server_url).set(database=database).render_as_string(hide_password=False)


@dataclass
class Bench:
    server: EmbeddedServer
    url: str  # maintenance database
    version: str

    def admin(self, *statements: str) -> None:
        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                for statement in statements:
                    connection.execute(text(statement))
        finally:
            engine.dispose()

    def databases(self, like: str) -> list[str]:
        engine = create_engine(self.url)
        try:
            with engine.connect() as connection:
                rows = connection.execute(text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": like})
                return [row[0] for row in rows]
        finally:
            engine.dispose()

    def drop_leftovers(self) -> None:
        """Databases a crashed run of the harness (or of a hand-written conftest) left behind."""
        names = self.databases("bench\\_%")
        self.admin(*[f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names])

    def prepare_base(self, project: Path) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{BASE_DB}" WITH (FORCE)', f'CREATE DATABASE "{BASE_DB}"')
        config = Config(str(project / "alembic.ini"))
        config.set_main_option("sqlalchemy.url", url_of(self.url, BASE_DB).replace("%", "%%"))
        command.upgrade(config, "head")

    def ensure_database(self, name: str) -> None:
        if not self.databases(name):
            self.admin(f'CREATE DATABASE "{name}"')

    def reset_bare(self, name: str = BARE_DB) -> None:
        """A fresh migrated copy of the base database (for bare and for pytest-sqla), outside the timing."""
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}" TEMPLATE "{BASE_DB}"')


@contextlib.contextmanager
def bench_server(server_dir: Path) -> Iterator[Bench]:
    """Start (or join) the benchmark server; one harness per server directory at a time."""
    server_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(server_dir.with_name(server_dir.name + ".harness.lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SystemExit(f"another benchmark run is using {server_dir}; wait for it or pass --server-dir") from None
    server = EmbeddedServer(cache_dir=server_dir)
    try:
        info = server.acquire()
        bench = Bench(server, info.url, info.version)
        bench.drop_leftovers()
        try:
            yield bench
        finally:
            bench.drop_leftovers()
            server.release()
    finally:
        lock.release()


def keep_running(cache_dir: Path) -> None:
    """Start the embedded server of ``cache_dir`` and keep it up between runs, exactly as
    `pgshard server start` does (a lease, the persistent flag, the lease dropped)."""
    server = EmbeddedServer(cache_dir=cache_dir)
    server.acquire()
    try:
        server.set_persistent(True)
    finally:
        server.release()


def stop_embedded(cache_dir: Path, remove: bool = False) -> None:
    """Make sure no server of a warm/cold/running contender's cache directory is left running."""
    if cache_dir.exists():
        with contextlib.suppress(Exception):
            server = EmbeddedServer(cache_dir=cache_dir)
            server.set_persistent(False)
            server.stop()
        if remove:
            shutil.rmtree(cache_dir, ignore_errors=True)


def code_version() -> str:
    """Which pgshard the runs used: the git commit and a hash of the package's sources as they are on disk."""
    package = Path(pgshard.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())
    head = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or head
    return f"commit {head}, sources {digest.hexdigest()[:12]}"


# -- the machine --------------------------------------------------------------------------------------------
def _filesystem(path: Path) -> str:
    """Type of the filesystem ``path`` lives on (the longest mount point that contains it)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1].rstrip("/") + "/") and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return f"{kind} ({best})" if best else kind


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(bench: Bench) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgresql": bench.version,
        "data_dir": str(bench.server.datadir),
        "data_dir_filesystem": _filesystem(bench.server.datadir.resolve()),
        "packages": versions,
    }
