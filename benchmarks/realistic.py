"""The real-shaped suite: issue 8's drop-in project (``tests/projects/shared_db``: settings read at import,
an engine built at import, a seeded superuser, ``command:`` migrations), as a scenario of the benchmark.

Three contenders on it, interleaved in the rounds like every other: its own serial run on one plain
database without pgshard (migrated and seeded by the harness beforehand, outside the timing, as its README
says: ``alembic upgrade head``, ``python scripts/seed.py``), pgshard serial and pgshard ``-n 2``, configured
by ini lines alone (``pgshard.ini`` below, written next to a copy of the project in the work directory).

Until that project is on this checkout the scenario says so and is left out (``--real-project`` points at
another copy of it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.generate import Project

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "tests" / "projects" / "shared_db"
REAL_DB = "bench_real"  # its own run's plain database
PGSHARD_INI = """\
# Written by benchmarks/realistic.py: the project configured for pgshard by ini lines alone.
[pytest]
testpaths = tests
pgshard_migrate =
    command:alembic upgrade head
    command:python scripts/seed.py
pgshard_env = DATABASE_URL={url}
"""


def missing(source: Path) -> str | None:
    if not (source / "tests").is_dir():
        return (f"{source} is not on this checkout (issue 8's drop-in project); the real-shaped scenario runs "
                "once it is (or pass --real-project)")
    return None


def copy(source: Path, work_dir: Path) -> Project:
    """The project in the work dir (only changed files rewritten: bytecode and fingerprints stay valid)."""
    root = work_dir / "real_project"
    shutil.copytree(source, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    ini = root / "pgshard.ini"
    if not ini.exists() or ini.read_text() != PGSHARD_INI:
        ini.write_text(PGSHARD_INI)
    return Project(root, (), ())


def prepare_own_database(url: str, root: Path) -> None:
    """Migrate and seed its plain database the way its README says, before a run and outside the timing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSHARD_", "PYTEST_"))}
    env.update(DATABASE_URL=url, PYTHONPATH=str(root), PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                                             f"{env.get('PATH', '')}")
    for command in (["alembic", "upgrade", "head"], [sys.executable, "scripts/seed.py"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True, timeout=300)
