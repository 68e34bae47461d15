"""Run one contender once: a fresh ``python -m pytest`` process, timed from spawn to exit.

The child's environment is scrubbed of pytest/xdist/pgshard variables (the smoke test runs the harness
from inside a pytest run, possibly an xdist worker) and given only what the contender needs.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.contenders import CONFTESTS, Contender
from benchmarks.generate import Project
from benchmarks.server import BARE_DB, Bench

REPO = Path(__file__).resolve().parent.parent
_SCRUB = ("PYTEST_", "PGSHARD_", "BENCH_", "COV_CORE_")


@dataclass
class Dirs:
    """Cache directories of the pgshard runs: locks (shared server), and the warm/cold/running contenders' own
    servers."""

    shared: Path
    warm: Path
    cold: Path
    running: Path

    def for_contender(self, contender: Contender) -> Path:
        return {"shared": self.shared, "warm": self.warm, "cold": self.cold, "running": self.running}[
            contender.server]


@dataclass
class RunResult:
    name: str
    round: int
    wall: float
    cpu: float  # user + system seconds of the pytest process and its xdist workers (not the server)
    load: float  # the machine's 1-minute load average when the run started (others' work shows here)
    expected: int
    passed: int
    returncode: int
    steady_ms: float = float("nan")  # mean per-test time without the first and last test (see report.py)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def selection_args(contender: Contender, project: Project, subset: int) -> tuple[list[str], int]:
    if contender.selection == "full":
        return ["tests"], len(project.tests)
    if contender.selection == "subset":
        chosen = list(project.tests[:subset])
        return chosen, len(chosen)
    if contender.selection == "one":
        return [project.tests[0]], 1
    if contender.selection == "four":  # xdist hands out at least 2 tests a worker: both -n 2 workers get some
        return list(project.tests[:4]), 4
    return ["commit_tests"], len(project.commit_tests)


def command(contender: Contender, bench: Bench, selection: list[str], profile: Path | None = None) -> list[str]:
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
    args = [sys.executable, *profiler, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "benchmarks.timer"]
    if contender.is_pgshard:
        args += ["-p", "no:pytest_postgresql"]
        if contender.server == "shared":
            args += ["--pg-url", bench.url]
    else:
        args += ["-c", "plain.ini", "-p", "no:pgshard", "-p", CONFTESTS + contender.conftest]  # type: ignore[operator]
        if contender.conftest != "pytest_postgresql_peer":
            args += ["-p", "no:pytest_postgresql"]
    return args + list(contender.args) + selection


def environment(contender: Contender, bench: Bench, project: Project, dirs: Dirs, timer_out: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB) and k not in ("DATABASE_URL", "PYTHONPATH")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(project.root)]), BENCH_PG_URL=bench.url,
               BENCH_PROJECT=str(project.root), BENCH_BARE_DB=BARE_DB, BENCH_TIMER_OUT=str(timer_out),
               PGSHARD_CACHE_DIR=str(dirs.for_contender(contender)))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the runs must reuse their bytecode like any rerun does
    env.update(contender.env)
    return env


def steady_ms(test_seconds: list[float]) -> float:
    """Mean per-test time in ms, without the first and last test (session set-up and tear-down)."""
    inner = test_seconds[1:-1] if len(test_seconds) > 2 else test_seconds
    return statistics.fmean(inner) * 1000 if inner else float("nan")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(contender: Contender, bench: Bench, project: Project, dirs: Dirs, subset: int, round_no: int,
        profile: Path | None = None) -> RunResult:
    selection, expected = selection_args(contender, project, subset)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        timer_out, log = Path(tmp) / "timer.json", Path(tmp) / "out.txt"
        env = environment(contender, bench, project, dirs, timer_out)
        with log.open("w") as out:
            load, cpu, started = os.getloadavg()[0], _cpu(), time.perf_counter()
            proc = subprocess.run(command(contender, bench, selection, profile), cwd=project.root, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
            wall, cpu = time.perf_counter() - started, _cpu() - cpu
        timer = json.loads(timer_out.read_text()) if timer_out.exists() else {}
        result = RunResult(contender.name, round_no, wall, cpu, load, expected, int(timer.get("passed", 0)),
                           proc.returncode, steady_ms([float(s) for s in timer.get("test_seconds", [])]))
        if proc.returncode != 0 or result.passed != expected:
            tail = log.read_text().strip().splitlines()[-15:]
            result.error = f"exit {proc.returncode}, {result.passed}/{expected} passed:\n" + "\n".join(tail)
    return result
