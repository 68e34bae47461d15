"""Per-test cost of ``db_session`` on the app's own engine against pgshard's engine (pg_engine), measured in
one invocation with the two alternating round by round (ABBA order); medians of pytest's per-test durations.

    python -m benchmarks.fidelity [--tests 200] [--rounds 5]

The generated project is one sync app (psycopg, its engine built from DATABASE_URL as most apps do) and
N tests that write through ``db_session``, commit (a savepoint release) and read back. Both name the app's
sessionmaker (pgshard_sessionmaker, rebound per test); for "app engine" it is bound to the app's engine, so
the tests connect through it; for "pg_engine" it is unbound, so they run on pgshard's own, as every test
did before. Everything else is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

APP = '''
import os
from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

engine = create_engine(os.environ["DATABASE_URL"])
# Unbound, the sessionmaker names no engine of the app's: pgshard's own (pg_engine) is used.
SessionLocal = sessionmaker(bind=engine if os.environ["BENCH_BIND"] == "1" else None, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "thing"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
'''

TESTS = '''
import pytest
from sqlalchemy import func, select
import app


@pytest.mark.parametrize("n", range({tests}))
def test_write_and_read(n, db_session):
    db_session.add(app.Thing(name=f"t{{n}}"))
    db_session.commit()
    assert db_session.scalar(select(func.count()).select_from(app.Thing)) == 1
'''

INI = """
[pytest]
pgshard_migrate = metadata:app:Base
pgshard_env = DATABASE_URL={url}
pgshard_sessionmaker = app:SessionLocal
pythonpath = .
"""

CONTENDERS = {"app engine": "1", "pg_engine": "0"}  # BENCH_BIND: the app's sessionmaker bound to its engine


def _run_once(root: Path, bind: str) -> list[float]:
    (root / "pytest.ini").write_text(INI)
    out = root / "timer.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSHARD_", "PYTEST_"))}
    env.update(BENCH_BIND=bind, BENCH_TIMER_OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), str(root)]))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                    "-p", "benchmarks.timer"], cwd=root, env=env, check=True, capture_output=True)
    data = json.loads(out.read_text())
    if data["n_failed"]:
        raise SystemExit(f"benchmark tests failed: {data['failed']}")
    return list(data["test_seconds"])[1:]  # the first test also pays for the worker's clone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="pgshard-fidelity-") as tmp:
        root = Path(tmp)
        (root / "app.py").write_text(textwrap.dedent(APP))
        (root / "test_bench.py").write_text(TESTS.format(tests=args.tests))
        for round_ in range(args.rounds):
            order = list(CONTENDERS.items())
            for name, bind in order if round_ % 2 == 0 else order[::-1]:  # ABBA: neither always goes first
                samples[name].extend(_run_once(root, bind))
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    print(f"db_session per test, {args.tests} tests x {args.rounds} rounds, alternating; loadavg {' '.join(load)}")
    for name, values in samples.items():
        values.sort()
        print(f"  {name:<11} median {statistics.median(values) * 1000:.2f} ms   "
              f"p90 {values[int(len(values) * 0.9)] * 1000:.2f} ms   n={len(values)}")


if __name__ == "__main__":
    main()
