"""Run one contender once: a fresh ``python -m pytest`` process, timed from spawn to exit.

The child's environment is scrubbed of pytest/xdist/pgshard variables (the smoke test runs the harness
from inside a pytest run, possibly an xdist worker) and given only what the contender needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from benchmarks.contenders import CONFTESTS, Contender
from benchmarks.generate import Project
from benchmarks.peers import Peers
from benchmarks.realistic import REAL_DB
from benchmarks.server import BARE_DB, SA_ALEMBIC_DB, SA_RECIPE_DB, SQLA_DB, Bench, url_of

REPO = Path(__file__).resolve().parent.parent
_SCRUB = ("PYTEST_", "PGSHARD_", "BENCH_", "COV_CORE_")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class Dirs:
    """Cache directories of the pgshard runs: locks (shared server), and the warm/cold/running contenders' own
    servers."""

    shared: Path
    warm: Path
    cold: Path
    running: Path
    linger: Path

    def for_contender(self, contender: Contender) -> Path:
        return {"shared": self.shared, "warm": self.warm, "cold": self.cold, "running": self.running,
                "linger": self.linger}[contender.server]


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
    peak_mb: float = 0.0  # peak resident memory of the run's process tree (not the shared server)

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def broke(self) -> bool:
        """Its database server went away under it (connections lost) or it hung until its time limit."""
        return "OperationalError" in self.error or self.error.startswith("killed after")


def selection_args(contender: Contender, project: Project, subset: int) -> tuple[list[str], int]:
    if contender.selection == "full":
        return ["tests"], len(project.tests)
    if contender.selection == "subset":
        chosen = list(project.tests[:subset])
        return chosen, len(chosen)
    if contender.selection == "one":
        return [project.tests[0]], 1
    if contender.selection == "all":  # its testpaths; how many tests there are is counted in the run
        return [], -1
    if contender.selection == "four":  # xdist hands out at least 2 tests a worker: both -n 2 workers get some
        return list(project.tests[:4]), 4
    return ["commit_tests"], len(project.commit_tests)


def command(contender: Contender, bench: Bench, selection: list[str], profile: Path | None = None,
            peers: Peers | None = None, shuffle: int | None = None) -> list[str]:
    profiler = ["-m", "benchmarks.cpuprofile", str(profile)] if profile else []  # CPU clock: waits are not work
    python = str(peers.python) if contender.peer and peers else sys.executable
    order = ["-p", "randomly", f"--randomly-seed={shuffle}"] if shuffle is not None else ["-p", "no:randomly"]
    args = [python, *profiler, "-m", "pytest", "-q", *order, "-p", "benchmarks.timer"]
    if contender.real:  # the project's own ini for its own run; pgshard's ini lines for pgshard's
        args += ["-p", "no:pytest_postgresql"]
        args += ["-p", "no:pgshard"] if contender.conftest == "own" else ["-c", "pgshard.ini", "--pg-url", bench.url]
    elif contender.is_pgshard:
        args += ["-p", "no:pytest_postgresql"]
        if contender.server == "shared":
            args += ["--pg-url", bench.url]
    else:
        args += ["-c", "plain.ini", "-p", "no:pgshard", "-p", CONFTESTS + contender.conftest]  # type: ignore[operator]
        if contender.peer and peers:  # py-pglite's fixtures come in through our conftest: its plugin stays out
            args += peers.block_others(None if contender.peer == "py-pglite" else contender.peer)
        elif contender.conftest != "pytest_postgresql_peer":
            args += ["-p", "no:pytest_postgresql"]
    return args + list(contender.args) + list(contender.options) + selection


def sa_alembic_database(contender: Contender) -> str:
    return SA_RECIPE_DB if contender.conftest == "sqlalchemy_alembic_recipe" else SA_ALEMBIC_DB


def peer_env(contender: Contender, bench: Bench, peers: Peers | None) -> dict[str, str]:
    """Where each peer finds its database: the way its own docs configure it."""
    if contender.real and contender.conftest == "own":
        return {"DATABASE_URL": url_of(bench.url, REAL_DB)}
    if contender.peer == "pytest-sqla":
        return {"PYTEST_SQLA_URL": url_of(bench.url, SQLA_DB)}
    if contender.peer == "pytest-sqlalchemy-alembic":  # the app's engine URL; it derives <db>_test_<worker>
        # It hands the URL to Alembic's ConfigParser unescaped: a %-encoded passfile path in the query breaks
        # interpolation, so the password file goes by PGPASSFILE (libpq's variable) instead.
        url = make_url(url_of(bench.url, sa_alembic_database(contender))).difference_update_query(["passfile"])
        return {"DATABASE_URL": url.render_as_string(hide_password=False)}
    if contender.peer == "py-pglite" and peers and peers.pglite_dir:
        return {"BENCH_PGLITE_DIR": str(peers.pglite_dir)}
    return {}


def environment(contender: Contender, bench: Bench, project: Project, dirs: Dirs, timer_out: Path,
                peers: Peers | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB) and k not in ("DATABASE_URL", "PYTHONPATH")}
    before = [os.environ["BENCH_BEFORE_SRC"]] if contender.before and os.environ.get("BENCH_BEFORE_SRC") else []
    env.update(PYTHONPATH=os.pathsep.join([*before, str(REPO), str(project.root)]), BENCH_PG_URL=bench.url,
               BENCH_PROJECT=str(project.root), BENCH_BARE_DB=BARE_DB, BENCH_TIMER_OUT=str(timer_out),
               PGSHARD_CACHE_DIR=str(dirs.for_contender(contender)))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the runs must reuse their bytecode like any rerun does
    passfile = make_url(bench.url).query.get("passfile")
    if isinstance(passfile, str):  # for the peers that connect from host, port and user alone (libpq reads it)
        env["PGPASSFILE"] = passfile
    env.update(contender.env)
    env.update(peer_env(contender, bench, peers))
    return env


def steady_ms(test_seconds: list[float]) -> float:
    """Mean per-test time in ms, without the first and last test (session set-up and tear-down)."""
    inner = test_seconds[1:-1] if len(test_seconds) > 2 else test_seconds
    return statistics.fmean(inner) * 1000 if inner else float("nan")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class TreeMemory:
    """Peak resident memory of a process and all its descendants together (xdist workers, node), sampled
    every 50 ms from /proc in a thread, so the main thread's wait() sees the exit at once (no timing bias)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _tree_kb(self) -> int:
        children, rss = _processes()
        return sum(rss.get(pid, 0) for pid in _descendants(self.pid, children))

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, self._tree_kb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def _descendants(root: int, children: dict[int, list[int]]) -> list[int]:
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _processes() -> tuple[dict[int, list[int]], dict[int, int]]:
    """Children of every process and its resident memory in kB, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21]) * PAGE_KB
    return children, rss


def kill_tree(root: int) -> None:
    """A run past its time limit: end it and everything it started (py-pglite's node runs in a session of its
    own, out of reach of a process-group kill), children first."""
    children, _ = _processes()
    for pid in reversed(_descendants(root, children)):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def time_limit(tests: int) -> float:
    """Generous (a second a test on top of two minutes): only a hung run meets it."""
    return 120.0 + max(tests, 0) * 1.0


def run(contender: Contender, bench: Bench, project: Project, dirs: Dirs, subset: int, round_no: int,
        profile: Path | None = None, peers: Peers | None = None, shuffle: int | None = None,
        tests: tuple[list[str], int] | None = None, phases: Path | None = None) -> RunResult:
    """One timed run; ``shuffle`` (a seed) runs the tests in a random order, ``tests`` overrides the selection."""
    selection, expected = tests or selection_args(contender, project, subset)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        timer_out, log = Path(tmp) / "timer.json", Path(tmp) / "out.txt"
        env = environment(contender, bench, project, dirs, timer_out, peers)
        args = command(contender, bench, selection, profile, peers, shuffle)
        if phases is not None:  # benchmarks/phases.py: where each process's start-up goes
            args[args.index("benchmarks.timer") + 1:args.index("benchmarks.timer") + 1] = ["-p", "benchmarks.phases"]
            env["BENCH_PHASES_OUT"] = str(phases)
        with log.open("w") as out:
            load, cpu, started = os.getloadavg()[0], _cpu(), time.perf_counter()
            proc = subprocess.Popen(args, cwd=project.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            memory = TreeMemory(proc.pid)
            limit = threading.Timer(time_limit(expected), kill_tree, (proc.pid,))
            limit.daemon = True
            limit.start()
            try:
                returncode = proc.wait()  # a blocking wait: the exit is seen at once (polling adds ~50 ms)
                wall, cpu = time.perf_counter() - started, _cpu() - cpu
            except BaseException:  # interrupted: take the run down with us, nothing of it left running
                kill_tree(proc.pid)
                proc.wait()
                raise
            finally:
                limit.cancel()
                peak = memory.stop()
        timer = json.loads(timer_out.read_text()) if timer_out.exists() else {}
        if expected < 0:  # the whole suite of a project we did not write: every test it ran must pass
            expected = max(1, len(timer.get("test_seconds", [])))
        result = RunResult(contender.name, round_no, wall, cpu, load, expected, int(timer.get("passed", 0)),
                           returncode, steady_ms([float(s) for s in timer.get("test_seconds", [])]),
                           peak_mb=round(peak, 1))
        if wall >= time_limit(expected):
            result.error = f"killed after {time_limit(expected):.0f} s (its time limit)\n"
        if returncode != 0 or result.passed != expected:
            text = log.read_text()
            tail = text.strip().splitlines()[-15:]
            result.error += f"exit {returncode}, {result.passed}/{expected} passed:\n" + "\n".join(tail)
            if "OperationalError" in text and "OperationalError" not in result.error:  # pytest cut it short
                result.error += "\n(OperationalError in its output: its database server went away)"
    return result
