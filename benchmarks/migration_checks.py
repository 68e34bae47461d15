"""What pgshard_check costs on a cold build, beside pytest-alembic's own checks on the same project (issue 20).

    python -m benchmarks.migration_checks --revisions 10,100 --rounds 3

For each history length, benchmarks/migration_history makes the project twice: one for pgshard (one test on
db_session, ``pgshard_migrate = alembic:alembic.ini``), one for pytest-alembic (a conftest whose
``alembic_engine`` is a fresh database on the same server, env.py pointed at it by DATABASE_URL). Round by
round, interleaved, each a pytest process of its own:

- ``build``: pgshard, ``--pg-rebuild``, no pgshard_check (the cold build itself);
- ``build+checks``: the same with ``heads``, ``models:app.models:Base`` and ``downgrade``;
- ``warm``, ``warm+checks``: both projects again without ``--pg-rebuild`` (templates and verdict cached);
- ``pytest-alembic``: ``pytest --test-alembic -p no:pgshard`` running its test_single_head_revision,
  test_model_definitions_match_ddl and test_up_down_consistency.

Wall time and CPU time (user+system of the process and its children) per run; the checks' cost is the
median of per-round differences ``build+checks - build``. /proc/loadavg beside each round. pytest-alembic
must be installed in the interpreter running this (it is no dependency of pgshard's). Writes
benchmarks/results/migration-checks.md (or --out).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import migration_history

CHECKS = "heads\n    models:app.models:Base\n    downgrade"
# as a real suite does, the test module imports the models (so both projects' runs pay for that import)
PGSHARD_TEST = "from app.models import T1\n\n\ndef test_head(db_session):\n" \
               "    assert db_session.query(T1).count() == 0\n"
PYTEST_ALEMBIC_CONFTEST = '''
import os
import uuid

import psycopg
import pytest
import sqlalchemy as sa

from pgshard.server.base import to_libpq


@pytest.fixture
def alembic_engine(monkeypatch):
    admin = os.environ["BENCH_ADMIN_URL"]
    name = f"bench_pa_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(to_libpq(admin), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = sa.engine.make_url(admin).set(database=name).render_as_string(hide_password=False)
    monkeypatch.setenv("DATABASE_URL", url)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()
    with psycopg.connect(to_libpq(admin), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
'''
PYTEST_ALEMBIC_TESTS = "single_head_revision or model_definitions_match_ddl or up_down_consistency"


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """Wall and CPU seconds of one pytest process (and its children), and its last line."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} in {cwd} exited {proc.returncode}:\n"
                         f"{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return wall, cpu, lines[-1] if lines else ""


def _projects(root: Path, revisions: int) -> tuple[Path, Path, Path]:
    plain, checked, alembic = root / f"r{revisions}-plain", root / f"r{revisions}-checked", root / f"r{revisions}-pa"
    for path, checks in ((plain, ""), (checked, CHECKS)):
        migration_history.write(path, revisions)
        (path / "pytest.ini").write_text("[pytest]\npgshard_migrate = alembic:alembic.ini\n"
                                         "pgshard_env = DATABASE_URL={url}\n"
                                         + (f"pgshard_check =\n    {checks}\n" if checks else ""))
        (path / "test_head.py").write_text(PGSHARD_TEST)
    migration_history.write(alembic, revisions)
    (alembic / "pytest.ini").write_text("[pytest]\npytest_alembic_tests_path = conftest.py\n")
    (alembic / "conftest.py").write_text(PYTEST_ALEMBIC_CONFTEST)
    return plain, checked, alembic


def main() -> None:
    parser = argparse.ArgumentParser(description="pgshard_check's cost beside pytest-alembic's")
    parser.add_argument("--revisions", default="10,100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "migration-checks.md")
    args = parser.parse_args()
    try:
        import pytest_alembic  # noqa: F401
    except ImportError:
        raise SystemExit("pytest-alembic is not installed here: pip install pytest-alembic") from None
    root = Path(tempfile.mkdtemp(prefix="pgshard-bench-checks-"))
    root.chmod(0o711)  # as root, the server account must reach the cache dir inside it
    cache = root / "cache"
    env = {**os.environ, "PGSHARD_CACHE_DIR": str(cache), "PGSHARD_LINGER": "0"}
    env.pop("DATABASE_URL", None)
    started = subprocess.run([sys.executable, "-m", "pgshard.cli", "server", "start"], env=env,
                             capture_output=True, text=True, check=True).stdout
    admin_url = next(line.split(None, 1)[1] for line in started.splitlines() if line.startswith("url:"))
    env_pa = {**env, "BENCH_ADMIN_URL": admin_url}
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    rows: list[str] = []
    try:
        for revisions in (int(n) for n in args.revisions.split(",")):
            plain, checked, alembic = _projects(root, revisions)
            _timed([*pytest], checked, env)  # untimed: imports warm, the template of this project exists
            _timed([*pytest], plain, env)
            runs: dict[str, list[tuple[float, float]]] = {
                k: [] for k in ("build", "build+checks", "warm", "warm+checks", "pytest-alembic")}
            loads = []
            for _ in range(args.rounds):
                loads.append(_load())
                runs["build"].append(_timed([*pytest, "--pg-rebuild"], plain, env)[:2])
                runs["build+checks"].append(_timed([*pytest, "--pg-rebuild", "-v"], checked, env)[:2])
                runs["warm"].append(_timed([*pytest, "-v"], plain, env)[:2])
                runs["warm+checks"].append(_timed([*pytest, "-v"], checked, env)[:2])
                runs["pytest-alembic"].append(_timed([*pytest, "-p", "no:pgshard", "--test-alembic", "-k",
                                                      PYTEST_ALEMBIC_TESTS], alembic, env_pa)[:2])
                print(revisions, {k: v[-1] for k, v in runs.items()}, "load", loads[-1], flush=True)
            pairs = list(zip(runs["build"], runs["build+checks"], strict=True))
            check_wall = statistics.median(c[0] - b[0] for b, c in pairs)
            check_cpu = statistics.median(c[1] - b[1] for b, c in pairs)
            rows.append(f"| {revisions} | " + " | ".join(
                f"{statistics.median(w for w, _ in runs[k]):.2f} / {statistics.median(c for _, c in runs[k]):.2f}"
                for k in runs) + f" | {check_wall:.2f} / {check_cpu:.2f} | {', '.join(loads)} |")
    finally:
        subprocess.run([sys.executable, "-m", "pgshard.cli", "server", "stop"], env=env, capture_output=True)
    text = "\n".join([
        "# pgshard_check's cost on a cold build, beside pytest-alembic",
        "",
        f"`python -m benchmarks.migration_checks --revisions {args.revisions} --rounds {args.rounds}` "
        f"({time.strftime('%Y-%m-%d %H:%M')}, pytest-alembic {_version('pytest-alembic')}, "
        f"alembic {_version('alembic')}, SQLAlchemy {_version('sqlalchemy')}). Seconds, wall / CPU (user+system "
        "of the pytest process and its children), medians of the rounds; each contender is one pytest process, "
        "interleaved round by round, on one embedded PostgreSQL 15. The checks' cost is the median of per-round "
        "differences (build+checks - build). pytest-alembic runs its test_single_head_revision, "
        "test_model_definitions_match_ddl (which upgrades to head first) and test_up_down_consistency, each on a "
        "fresh database of the same server.",
        "",
        "| revisions | build | build+checks | warm | warm+checks | pytest-alembic | the checks' cost "
        "| 1-min load at each round |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    args.out.write_text(text)
    print(text)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
