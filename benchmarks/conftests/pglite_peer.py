"""Peer: py-pglite (PGlite: PostgreSQL compiled to WebAssembly, served by a node process per pytest process).

Its own fixtures do the work: ``pglite_session`` truncates every table before each test (its isolation);
the schema is created once per session with ``create_all`` (PGlite's socket serves one connection at a
time, so Alembic's own engine cannot connect beside the plugin's) and, since TRUNCATE also removes the
seed rows the tests read, the seed is put back before each test, as a user of py-pglite has to.

Set up by the harness, and why:
- node and npm must exist (checked by benchmarks/peers.py); its npm packages are installed once into
  ``BENCH_PGLITE_DIR`` and found from each process's own work dir below it (``auto_install_deps`` off);
- each process gets a work dir of its own, and its generated ``pglite_manager.js`` is deleted before the
  start: py-pglite writes that file only when it is missing, with the socket path of the run that wrote it,
  so a reused work dir would make node listen on a stale socket while Python waits on a new one;
- its manager's ``stop()`` ends with ``_kill_all_pglite_processes()``, which kills EVERY process on the
  machine whose command line contains ``pglite_manager.js`` (and ``start()`` kills those with the same
  cwd): both are switched off here; our process stops only its own node process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from benchapp.models import Base
from benchapp.seed import seed
from py_pglite import PGliteConfig
from py_pglite.sqlalchemy import SQLAlchemyPGliteManager
from py_pglite.sqlalchemy.fixtures import pglite_engine, pglite_session
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

__all__ = ["pglite_engine", "pglite_session"]  # its fixtures, loaded with ours (its plugin is blocked)


class ContainedManager(SQLAlchemyPGliteManager):
    """py-pglite's manager without its machine-wide kills."""

    def _kill_all_pglite_processes(self) -> None:
        pass

    def _kill_existing_processes(self) -> None:
        pass


@pytest.fixture(scope="session")
def pglite_config() -> PGliteConfig:
    work = Path(os.environ["BENCH_PGLITE_DIR"]) / os.environ.get("PYTEST_XDIST_WORKER", "main")
    work.mkdir(parents=True, exist_ok=True)
    (work / "pglite_manager.js").unlink(missing_ok=True)
    return PGliteConfig(work_dir=work, auto_install_deps=False, node_modules_check=False, log_level="WARNING")


@pytest.fixture(scope="session")
def pglite_sqlalchemy_manager(pglite_config: PGliteConfig) -> Iterator[SQLAlchemyPGliteManager]:
    manager = ContainedManager(pglite_config)
    manager.start()
    try:
        if not manager.wait_for_ready():
            raise RuntimeError("PGlite did not become ready")
        yield manager
    finally:
        manager.stop()


@pytest.fixture(scope="session")
def pglite_schema(pglite_engine: Engine) -> None:
    Base.metadata.create_all(pglite_engine)


@pytest.fixture
def db_session(pglite_schema: None, pglite_session: Any) -> Session:
    with pglite_session.bind.begin() as connection:
        seed(connection)
    pglite_session.expire_on_commit = False
    session: Session = pglite_session
    return session
