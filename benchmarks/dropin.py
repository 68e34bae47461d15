"""Drop-in figures (issue 8): what the eager clone and out-of-process template steps cost.

    python -m benchmarks.dropin [--rounds 3] [--before-src DIR]

1. The shared-database project (tests/projects/shared_db), side by side, interleaved, medians of ``rounds``:
   its own serial run on a plain database without pgshard, pgshard serial, pgshard ``-n 2`` (warm: the
   template is cached), plus one cold pgshard run (``--pg-rebuild``).
2. The ``alembic:`` step on that project: in-process in a fresh interpreter (first call: Alembic and the
   app imported on the way; second call: already imported), against the child process pgshard now spawns.
3. With ``--before-src`` (a checkout of main's ``src``, e.g. ``git archive main src | tar -x -C /tmp/main``):
   examples/blog serial, warm and cold (``--pg-rebuild``), that code against this one, interleaved.

Every row carries /proc/loadavg as it was when the row was measured: on a shared 2-core machine the
absolute numbers move with the load; compare rows measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "tests" / "projects" / "shared_db"
BLOG = REPO / "examples" / "blog"
PGSHARD_INI = ("[pytest]\ntestpaths = tests\npgshard_migrate =\n    command:alembic upgrade head\n"
               "    command:python scripts/seed.py\npgshard_env = DATABASE_URL={url}\n")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSHARD_", "PYTEST_")) and k != "DATABASE_URL"}
    return {**env, **extra}


def pytest_run(cwd: Path, args: Sequence[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"benchmark run failed in {cwd} ({' '.join(args)}):\n{proc.stdout[-3000:]}")
    return seconds


def interleave(contenders: dict[str, Callable[[], float]], rounds: int) -> list[tuple[str, float, str]]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    loads: dict[str, list[str]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            loads[name].append(loadavg())
            times[name].append(run())
    return [(name, statistics.median(times[name]), loads[name][len(loads[name]) // 2]) for name in contenders]


def table(title: str, rows: list[tuple[str, float, str]], unit: str = "s") -> None:
    print(f"\n{title}\n\n| what | median {unit} | /proc/loadavg |\n|---|---|---|")
    for name, value, load in rows:
        shown = f"{value:.2f}" if unit == "s" else f"{value * 1000:.0f}"
        print(f"| {name} | {shown} | {load} |")


def copy_project(root: Path) -> Path:
    shutil.copytree(PROJECT, root, ignore=shutil.ignore_patterns("__pycache__"))
    with (root / "alembic" / "versions" / "0001_users.py").open("a") as fh:
        fh.write(f"# token: {uuid.uuid4().hex}\n")  # a template of its own
    return root


def plain_database(server_url: str, name: str) -> str:
    from pgshard.server.base import to_libpq
    from pgshard.settings import database_url

    with psycopg.connect(to_libpq(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return database_url(server_url, name)


def step_costs(server_url: str, project: Path, rounds: int) -> list[tuple[str, float, str]]:
    """alembic: in-process (fresh interpreter, first and second call) against the child process."""
    from pgshard.build import apply_steps
    from pgshard.migrate import AlembicMigrator

    probe = textwrap.dedent("""
        import json, os, sys, time
        from pathlib import Path
        from pgshard.migrate import AlembicMigrator
        out = []
        for url in sys.argv[2:]:
            os.environ["DATABASE_URL"] = url
            started = time.perf_counter()
            AlembicMigrator("alembic:alembic.ini", Path(sys.argv[1])).apply(url)
            out.append(time.perf_counter() - started)
        print(json.dumps(out))
    """)
    first: list[float] = []
    second: list[float] = []
    child: list[float] = []
    loads: list[str] = []
    for i in range(rounds):
        loads.append(loadavg())
        urls = [plain_database(server_url, f"dropin_step_{i}_{k}") for k in range(3)]
        proc = subprocess.run([sys.executable, "-c", probe, str(project / "alembic.ini"), *urls[:2]], cwd=project,
                              env=clean_env(PYTHONPATH=str(project)), capture_output=True, text=True, check=True)
        a, b = json.loads(proc.stdout)
        first.append(a)
        second.append(b)
        migrator = AlembicMigrator("alembic:alembic.ini", project / "alembic.ini")
        started = time.perf_counter()
        apply_steps([migrator], urls[2], {"DATABASE_URL": urls[2]})
        child.append(time.perf_counter() - started)
    load = loads[len(loads) // 2]
    return [("alembic: in-process, first in a fresh interpreter (imports included) [before]",
             statistics.median(first), load),
            ("alembic: in-process, second call (everything imported) [before]", statistics.median(second), load),
            ("alembic: child process `python -m pgshard.build` [after]", statistics.median(child), load)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dropin", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before-src", type=Path, help="main's src/ to compare examples/blog against")
    args = parser.parse_args(argv)
    from pgshard.server.embedded import EmbeddedServer

    work = Path(tempfile.mkdtemp(prefix="pgshard-dropin-"))
    own_cache = Path("/dev/shm" if Path("/dev/shm").is_dir() else work) / f"pgshard-dropin-{uuid.uuid4().hex[:8]}"
    own_server = EmbeddedServer(cache_dir=own_cache)  # the project's "own" server, apart from pgshard's
    info = own_server.acquire()
    pgshard_cli = [sys.executable, "-m", "pgshard.cli"]
    subprocess.run([*pgshard_cli, "server", "start"], env=clean_env(), check=True, capture_output=True)
    try:
        project = copy_project(work / "shared_db")
        shared = plain_database(info.url, "dropin_shared")
        prepare = clean_env(DATABASE_URL=shared, PYTHONPATH=str(project))
        for command in (["alembic", "upgrade", "head"], [sys.executable, "scripts/seed.py"]):
            subprocess.run(command, cwd=project, env={**prepare, "PATH": f"{Path(sys.executable).parent}:"
                                                      f"{os.environ.get('PATH', '')}"}, check=True)
        (project / "pytest.ini").write_text(PGSHARD_INI)
        own_env = clean_env(DATABASE_URL=shared)
        env = clean_env()
        print(f"load before: {loadavg()}")
        cold_load = loadavg()
        cold = pytest_run(project, [], env)  # first pgshard run: builds this project's template
        rows = interleave({
            "its own serial run (plain database, -p no:pgshard)": lambda: pytest_run(project, ["-p", "no:pgshard"],
                                                                                      own_env),
            "pgshard serial (warm: template cached)": lambda: pytest_run(project, [], env),
            "pgshard -n 2 (warm)": lambda: pytest_run(project, ["-n", "2"], env),
            "pgshard serial, --pg-rebuild (cold template: both command: steps)":
                lambda: pytest_run(project, ["--pg-rebuild"], env),
        }, args.rounds)
        table(f"shared_db project, 34 tests, medians of {args.rounds} (first cold run: {cold:.2f} s at {cold_load})",
              rows)
        table(f"template step cost on shared_db, medians of {args.rounds}", step_costs(info.url, project, args.rounds),
              unit="ms")
        if args.before_src:
            before = clean_env(PYTHONPATH=str(args.before_src.resolve()))
            after = clean_env()
            table(f"examples/blog serial, main ({args.before_src}) against this branch, medians of {args.rounds}",
                  interleave({
                      "main, warm": lambda: pytest_run(BLOG, [], before),
                      "this branch, warm (eager clone)": lambda: pytest_run(BLOG, [], after),
                      "main, cold (--pg-rebuild, alembic in-process)":
                          lambda: pytest_run(BLOG, ["--pg-rebuild"], before),
                      "this branch, cold (--pg-rebuild, alembic in a child)":
                          lambda: pytest_run(BLOG, ["--pg-rebuild"], after),
                  }, args.rounds))
    finally:
        subprocess.run([*pgshard_cli, "server", "stop"], env=clean_env(), check=False, capture_output=True)
        own_server.release()
        shutil.rmtree(own_cache, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
