"""Shared helpers for pgshard's own tests: real PostgreSQL only.

Our own session uses pgshard's `pg_server` fixture (the embedded server, started lazily since this
repository does not configure pgshard); the plugin tests run whole inner pytest sessions with pytester.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgshard.server.base import ServerInfo, to_libpq
from pgshard.server.embedded import EmbeddedServer

pytest_plugins = ["pytester"]
collect_ignore = ["projects"]  # inner projects, run by the plugin tests with pytester

_INNER_ENV_DROP = ("PGSHARD_", "PYTEST_XDIST_", "PYTEST_ADDOPTS", "DATABASE_URL")
_INNER_ENV_KEEP = ("PGSHARD_CACHE_DIR",)


def pytest_configure(config: pytest.Config) -> None:
    """This suite keeps to a cache dir (and so a server) of its own, never the machine-wide default that
    other projects' runs share: given one (PGSHARD_CACHE_DIR), that one; else one per checkout. The xdist
    workers inherit it, and so do the inner pytest sessions (tests that want another pass their own)."""
    if not os.environ.get("PGSHARD_CACHE_DIR"):
        import hashlib

        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(config.rootpath) / ".pgshard-cache"
        checkout = hashlib.sha256(str(Path(config.rootpath).resolve()).encode()).hexdigest()[:8]
        os.environ["PGSHARD_CACHE_DIR"] = str(base / f"pgshard-tests-{os.getuid()}-{checkout}")
    # pgshard read its settings before this conftest was imported: a serial run's own server (started lazily,
    # by pg_server) must use this cache dir too, not the machine-wide default other projects share
    import dataclasses

    from pgshard.fixtures import RUN

    run = config.stash.get(RUN, None)
    cache = Path(os.environ["PGSHARD_CACHE_DIR"])
    if run is not None and run.server is None and run.settings.cache_dir != cache:
        run.settings = dataclasses.replace(run.settings, cache_dir=cache)


@pytest.fixture(autouse=True)
def _clean_inner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner pytest sessions must not inherit this session's pgshard or xdist variables, but its cache dir.
    Servers they start stop when they end (no linger) unless a test asks otherwise: assertions on "stopped"
    stay exact."""
    for name in list(os.environ):
        if name.startswith(_INNER_ENV_DROP) and name not in _INNER_ENV_KEEP:
            monkeypatch.delenv(name)
    monkeypatch.setenv("PGSHARD_LINGER", "0")


@pytest.fixture
def admin_conn(pg_server: ServerInfo) -> Iterator[psycopg.Connection]:
    with psycopg.connect(to_libpq(pg_server.url), autocommit=True) as conn:
        yield conn


def remove_cache(cache: Path) -> None:
    """Stop every server of ours under ``cache``, remove it, and check its watchdogs ended with it: a test
    leaves no process behind."""
    import shutil
    import time

    from pgshard.host import identity_alive
    from pgshard.leases import Cluster

    watchdogs = []
    for home in [*cache.glob("pg*-*"), *cache.glob("*/pg*-*")]:
        if home.is_dir():
            Cluster(home, home.with_suffix(".lock")).stop()
            with contextlib.suppress(OSError):
                watchdogs.append((home / "watchdog").read_text())
    shutil.rmtree(cache, ignore_errors=True)
    deadline = time.monotonic() + 60
    while any(identity_alive(w) for w in watchdogs):
        if time.monotonic() > deadline:
            pytest.fail(f"a watchdog outlived its server's cache {cache}: {watchdogs}")
        time.sleep(0.1)


@pytest.fixture
def own_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache dir (so an embedded server) of one test's own, cold, for its inner runs (PGSHARD_CACHE_DIR);
    removed afterwards, its servers and watchdogs checked gone."""
    path = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/var/tmp") / f"pgshard-own-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PGSHARD_CACHE_DIR", str(path))
    yield path
    remove_cache(path)


@pytest.fixture(scope="session")
def second_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerInfo]:
    """A server of its own (own cache dir), standing in for a user's existing server behind --pg-url."""
    cache = Path("/dev/shm" if Path("/dev/shm").is_dir() else tmp_path_factory.getbasetemp()) / (
        f"pgshard-tests-{uuid.uuid4().hex[:8]}")
    server = EmbeddedServer(cache_dir=cache)
    info = server.acquire()
    yield info
    server.release()
    remove_cache(cache)


MIGRATION = '''
"""{rev}"""
import os
from alembic import op
import sqlalchemy as sa

revision = "{rev}"
down_revision = {down!r}
branch_labels = None
depends_on = None
# token: {token}


def upgrade():
    with open(os.environ["PGSHARD_TEST_COUNTER"], "a") as fh:
        fh.write("{rev}\\n")
    {body}


def downgrade():
    pass
'''

ENV_PY = '''
from alembic import context
from sqlalchemy import create_engine, pool

config = context.config


def run():
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
'''


class Project:
    """An inner pytest project with an Alembic chain whose migrations record each run."""

    def __init__(self, pytester: pytest.Pytester, ini: str = "", fail_in: str | None = None) -> None:
        self.pytester = pytester
        self.root = pytester.path
        self.counter = self.root / "migrations-ran.txt"
        self.token = uuid.uuid4().hex  # a fingerprint of its own, independent of other tests
        (self.root / "alembic" / "versions").mkdir(parents=True)
        (self.root / "alembic" / "env.py").write_text(ENV_PY)
        (self.root / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s/alembic\n")
        self.write_migration("0001", None, 'op.create_table("item", sa.Column("id", sa.Integer, primary_key=True), '
                                           'sa.Column("worker", sa.Text, nullable=False))')
        self.write_migration("0002", "0001", 'op.add_column("item", sa.Column("note", sa.Text))'
                             if fail_in != "0002" else 'raise RuntimeError("migration 0002 is broken")')
        pytester.makeini(textwrap.dedent(f"""
            [pytest]
            pgshard_migrate = alembic:alembic.ini
            {ini}
        """))

    def write_migration(self, rev: str, down: str | None, body: str) -> None:
        path = self.root / "alembic" / "versions" / f"{rev}.py"
        path.write_text(MIGRATION.format(rev=rev, down=down, token=self.token, body=body))

    def migrations_ran(self) -> int:
        return len(self.counter.read_text().splitlines()) if self.counter.exists() else 0

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *args)


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Project:
    monkeypatch.setenv("PGSHARD_TEST_COUNTER", str(pytester.path / "migrations-ran.txt"))
    return Project(pytester)


def secret_of(url: str) -> str:
    """The password of a pgshard URL: it lives only in the passfile the URL names."""
    from sqlalchemy.engine import make_url

    passfile = make_url(url).query["passfile"]
    assert isinstance(passfile, str)
    return Path(passfile).read_text().strip().rsplit(":", 1)[1]


def with_password(url: str, password: str | None = None) -> str:
    """The URL as a user would write it: the password inside, no passfile."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    query = {k: v for k, v in parsed.query.items() if k != "passfile"}
    return parsed.set(password=password or secret_of(url), query=query).render_as_string(hide_password=False)


def databases(conn: psycopg.Connection, like: str = "pgshard%") -> list[str]:
    return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1",
                                       (like,)).fetchall()]
