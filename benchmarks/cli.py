"""``python -m benchmarks run [--size 1000] [--rounds 3] [--only strategies,peers,scaling]``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import contenders as registry
from benchmarks import realistic, report
from benchmarks.contenders import Contender
from benchmarks.generate import Project, generate
from benchmarks.peers import Peers
from benchmarks.peers import ensure as ensure_peers
from benchmarks.realistic import REAL_DB
from benchmarks.runner import Dirs, RunResult, run, sa_alembic_database
from benchmarks.server import (
    SQLA_DB,
    Bench,
    bench_server,
    code_version,
    default_server_dir,
    keep_running,
    machine,
    stop_embedded,
    url_of,
)

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("run", help="generate the suite, run every contender in alternating rounds, report")
    bench.add_argument("--rounds", type=int, default=3, help="rounds; each runs every contender once (default 3)")
    bench.add_argument("--only", help=f"groups ({', '.join(registry.GROUPS)}) and/or contender names, "
                                      f"comma separated: {', '.join(registry.BY_NAME)}")
    bench.add_argument("--neighbour", action="store_true",
                       help="run every round beside a neighbour load (benchmarks/neighbour.py): another suite with "
                            "its own PostgreSQL under -n 2 in a loop, a tmpfs writer, memory held")
    bench.add_argument("--neighbour-memory", type=int, default=2048, help="MB the neighbour holds (default 2048)")
    again = sub.add_parser("report", help="render results.md and results.png again from results.json")
    for each in (bench, again):
        each.add_argument("--results-dir", type=Path, default=HERE / "results")
    prof = sub.add_parser("profile", help="run one contender once under cProfile and print where time goes")
    prof.add_argument("contender", choices=list(registry.BY_NAME))
    prof.add_argument("--top", type=int, default=40, help="how many functions to print (default 40)")
    stages = sub.add_parser("phases", help="where start-up goes, per process: bare vs pgshard, serial and -n 2")
    stages.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    for each in (bench, prof, stages):
        each.add_argument("--size", type=int, default=1000, help="tests in the generated suite (default 1000)")
        each.add_argument("--subset", type=int, default=40, help="tests the expensive strategies run on (default 40)")
        each.add_argument("--work-dir", type=Path, default=HERE / "work", help="where the suite is generated")
        each.add_argument("--peers-dir", type=Path, default=HERE / "work",
                          help="where the peers' venv and node packages live (default: %(default)s)")
        each.add_argument("--real-project", type=Path, default=realistic.DEFAULT,
                          help="the real-shaped project (default: %(default)s)")
        each.add_argument("--before-src", type=Path, help="another pgshard's src/ (e.g. `git archive main src | "
                          "tar -x -C /tmp/before`): the *_before contenders run it, for before/after start-up")
        each.add_argument("--server-dir", type=Path, default=default_server_dir(),
                          help="cache directory of the benchmark's PostgreSQL server (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command != "report" and min(args.size, getattr(args, "rounds", 1), args.subset) < 1:
        parser.error("--size, --rounds and --subset must be positive")
    return args


def _prepare(contender: Contender, bench: Bench, dirs: Dirs) -> None:
    """Untimed set-up before a run: a clean bare database, an empty cache dir for the cold start."""
    if contender.conftest == "bare":
        bench.reset_bare()
    if contender.peer == "pytest-sqla":
        bench.reset_bare(SQLA_DB)
    if contender.peer == "pytest-sqlalchemy-alembic":  # the app's own database exists; it connects there first
        bench.ensure_database(sa_alembic_database(contender))
    if contender.server == "cold":
        stop_embedded(dirs.cold, remove=True)


def _run(contender: Contender, bench: Bench, project: Project, dirs: Dirs, subset: int, round_no: int,
         peers: Peers | None = None, real: Project | None = None) -> RunResult:
    _prepare(contender, bench, dirs)
    if contender.real and real is not None:
        project = real
        if contender.conftest == "own":  # its plain database, migrated and seeded as its README says
            bench.admin(f'DROP DATABASE IF EXISTS "{REAL_DB}" WITH (FORCE)', f'CREATE DATABASE "{REAL_DB}"')
            realistic.prepare_own_database(url_of(bench.url, REAL_DB), project.root)
    result = run(contender, bench, project, dirs, subset, round_no, peers=peers)
    status = "ok" if result.ok else "FAILED"
    tag = "warm-up" if round_no == 0 else f"round {round_no}"
    print(f"  [{tag}] {contender.name:<22} {result.wall:8.2f} s  {result.passed}/{result.expected} {status}",
          flush=True)
    if not result.ok:
        print("    " + result.error.replace("\n", "\n    "), flush=True)
    return result


def _dirs(server_dir: Path) -> Dirs:
    def sibling(suffix: str) -> Path:
        return server_dir.with_name(server_dir.name + suffix)

    return Dirs(server_dir, sibling("-warm"), sibling("-cold"), sibling("-running"), sibling("-linger"))


@contextlib.contextmanager
def servers(chosen: list[Contender], dirs: Dirs) -> Iterator[None]:
    """The contenders' own embedded servers: the ``running`` one kept up for the whole benchmark (what
    `pgshard server start` does, the stand-in for a lingering server), and none of them left behind."""
    if any(c.server == "running" for c in chosen):
        keep_running(dirs.running)
    try:
        yield
    finally:
        for path in (dirs.warm, dirs.cold, dirs.running, dirs.linger):
            stop_embedded(path, remove=True)


def real_project(chosen: list[Contender], args: argparse.Namespace) -> tuple[list[Contender], Project | None]:
    if not any(c.real for c in chosen):
        return chosen, None
    why = realistic.missing(args.real_project)
    if why:
        print(f"real-shaped scenario skipped: {why}", flush=True)
        return [c for c in chosen if not c.real], None
    return chosen, realistic.copy(args.real_project.resolve(), args.work_dir.resolve())


def install_peers(chosen: list[Contender], work_dir: Path) -> tuple[list[Contender], Peers | None]:
    """The peers venv, when any chosen contender needs it; contenders whose peer cannot install are dropped
    (and said so), the rest run."""
    wanted = sorted({c.peer for c in chosen if c.peer})
    if not wanted:
        return chosen, None
    peers = ensure_peers(work_dir, wanted)
    for dist, version in sorted(peers.versions.items()):
        print(f"peer {dist} {version}", flush=True)
    for dist, why in sorted(peers.dropped.items()):
        print(f"peer {dist} DROPPED: {why}", flush=True)
    return [c for c in chosen if not c.peer or peers.has(c.peer)], peers


# Serial runs of every kind of isolation (and of none): each is checked with the probes in a shuffled order.
ISOLATION = ("bare", "pgshard", "per_worker", "pytest_postgresql", "sqla", "sa_alembic", "sa_alembic_recipe", "pglite")
SEED = 20261126


def isolation(chosen: list[Contender], bench: Bench, project: Project, dirs: Dirs,
              peers: Peers | None) -> dict[str, dict[str, Any]]:
    """Run the isolation probes once per contender, shuffled; a contender that isolates passes them all."""
    found: dict[str, dict[str, Any]] = {}
    for contender in chosen:
        if contender.name not in ISOLATION:
            continue
        _prepare(contender, bench, dirs)
        tests = (list(project.isolation_tests), len(project.isolation_tests))
        result = run(contender, bench, project, dirs, 0, 0, peers=peers, shuffle=SEED, tests=tests)
        found[contender.name] = {"passed": result.passed, "expected": result.expected,
                                 "isolated": result.ok, "seed": SEED,
                                 "broke": result.broke,
                                 "tail": result.error[-2000:]}
        verdict = "isolated" if result.ok else f"NOT isolated ({result.expected - result.passed} probes failed)"
        print(f"  [isolation] {contender.name:<22} {result.passed}/{result.expected} shuffled: {verdict}", flush=True)
    return found


def profile(args: argparse.Namespace) -> int:
    """One warm-up run, then one under cProfile; prints the top functions by cumulative time."""
    import pstats

    contender = registry.BY_NAME[args.contender]
    project = generate(args.work_dir.resolve(), args.size)
    dirs = _dirs(args.server_dir.resolve())
    chosen, peers = install_peers([contender], args.peers_dir.resolve())
    chosen, real = real_project(chosen, args)
    if not chosen:
        return 1
    out = project.root.parent / f"profile-{contender.name}.prof"  # the work dir: never committed by accident
    with bench_server(dirs.shared) as bench, servers([contender], dirs):
        bench.prepare_base(project.root)
        _run(contender, bench, project, dirs, args.subset, 0, peers, real)
        _prepare(contender, bench, dirs)
        result = run(contender, bench, real if contender.real and real else project, dirs, args.subset, 1,
                     profile=out, peers=peers)
    print(f"{contender.name}: {result.wall:.2f} s wall, under cProfile on the CPU clock (pytest's own process "
          f"only); profile in {out}")
    pstats.Stats(str(out)).sort_stats("cumulative").print_stats(args.top)
    return 0 if result.ok else 1


PHASE_CONTENDERS = ("bare_one", "start_warm_linger", "start_warm_server", "start_warm_server_before", "bare_four_n2",
                    "start_n2_linger", "start_n2_server", "start_n2_server_before")


def phases(args: argparse.Namespace) -> int:
    """Interleaved rounds of the start-up contenders with benchmarks/phases.py loaded; medians per phase."""
    import statistics

    chosen = [registry.BY_NAME[n] for n in PHASE_CONTENDERS if args.before_src or not n.endswith("_before")]
    if args.before_src:
        os.environ["BENCH_BEFORE_SRC"] = str(args.before_src.resolve())
    project = generate(args.work_dir.resolve(), args.size)
    dirs = _dirs(args.server_dir.resolve())
    out = project.root.parent / "phases.jsonl"
    found: dict[str, dict[str, dict[str, list[float]]]] = {}
    walls: dict[str, list[float]] = {}
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    with bench_server(dirs.shared) as bench, servers(chosen, dirs):
        bench.prepare_base(project.root)
        for contender in chosen:  # untimed warm-up: bytecode, template
            _prepare(contender, bench, dirs)
            run(contender, bench, project, dirs, args.subset, 0)
        for round_no in range(1, args.rounds + 1):
            for contender in chosen:
                out.unlink(missing_ok=True)
                _prepare(contender, bench, dirs)
                result = run(contender, bench, project, dirs, args.subset, round_no, phases=out)
                if not result.ok:
                    print(result.error)
                    return 1
                walls.setdefault(contender.name, []).append(result.wall)
                for line in out.read_text().splitlines():
                    entry = json.loads(line)
                    who = "worker" if entry["who"].startswith("gw") else entry["who"]
                    for phase, seconds in entry["marks"].items():
                        found.setdefault(contender.name, {}).setdefault(who, {}).setdefault(phase, []).append(seconds)
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}\n")
    print(f"seconds since the process started, medians of {args.rounds} interleaved rounds (workers pooled)\n")
    for name in [c.name for c in chosen]:
        print(f"{name}: wall {statistics.median(walls[name]):.3f} s")
        for who, marks in sorted(found.get(name, {}).items()):
            line = "  ".join(f"{phase[2:]} {statistics.median(v):.3f}" for phase, v in sorted(marks.items()))
            print(f"  {who:<6} {line}")
    return 0


def _print(stats: dict[str, report.Stat], goals: list[report.Target], facts: dict[str, Any]) -> None:
    print(f"\n{facts['cores']} cores ({facts['cpu']}), PostgreSQL {facts['postgresql']}, "
          f"data dir on {facts['data_dir_filesystem']}, Python {facts['python']}; {facts.get('load_during_runs', '')}")
    print("\n" + "\n".join(report.headline(stats, goals)))
    print("\n" + "\n".join(report.overhead_table(stats, report.SECTIONS[0][2])))


def rerender(args: argparse.Namespace) -> int:
    data = json.loads((args.results_dir / "results.json").read_text())
    results = [RunResult(**run) for run in data["runs"]]
    chosen = [registry.BY_NAME[name] for name in data["contenders"]]
    stats, goals = report.write(args.results_dir, chosen, results, data["machine"], data["config"])
    _print(stats, goals, data["machine"])
    return 0


def run_benchmarks(args: argparse.Namespace) -> int:
    chosen = registry.select(args.only)
    started = time.perf_counter()
    load_before = Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else ""
    project = generate(args.work_dir.resolve(), args.size)
    chosen, peers = install_peers(chosen, args.peers_dir.resolve())
    chosen, real = real_project(chosen, args)
    if args.before_src:  # read by the runner: PYTHONPATH of the --before-src contenders
        os.environ["BENCH_BEFORE_SRC"] = str(args.before_src.resolve())
    else:
        chosen = [c for c in chosen if not c.before]
    server_dir = args.server_dir.resolve()
    dirs = _dirs(server_dir)
    results: list[RunResult] = []
    neighbour_line = ""
    code = code_version()
    print(f"pgshard benchmarks ({code}): {len(project.tests)} tests, {args.rounds} round(s), {len(chosen)} contenders; "
          f"project in {project.root}", flush=True)
    with bench_server(server_dir) as bench, contextlib.ExitStack() as stack:
        if args.neighbour:
            from benchmarks.neighbour import neighbour

            neighbour_line = stack.enter_context(neighbour(project.root, args.work_dir.resolve(),
                                                           args.neighbour_memory))
            print(neighbour_line, flush=True)
        with servers(chosen, dirs):
            bench.prepare_base(project.root)
            for contender in list(chosen):
                if contender.warmup:
                    warm = _run(contender, bench, project, dirs, args.subset, 0, peers, real)
                    if not warm.ok:  # reported among the errors; the others still run
                        results.append(warm)
                        chosen.remove(contender)
            hung: set[str] = set()  # a contender that hung once is not run again: each hang costs its time limit
            for round_no in range(1, args.rounds + 1):
                for contender in chosen:
                    if contender.name in hung:
                        continue
                    result = _run(contender, bench, project, dirs, args.subset, round_no, peers, real)
                    results.append(result)
                    if result.error.startswith("killed after"):
                        hung.add(contender.name)
                        print(f"    {contender.name} hung: not run again in later rounds", flush=True)
            isolated = isolation(chosen, bench, project, dirs, peers)
        facts = machine(bench)
    facts["loadavg_before"] = load_before
    facts["neighbour"] = neighbour_line if args.neighbour else ""
    facts["loadavg_after"] = Path("/proc/loadavg").read_text().strip() if load_before else ""
    if peers is not None:
        facts["peers"] = {**peers.versions, **{dist: f"dropped: {why}" for dist, why in peers.dropped.items()}}
        facts["peers_python"] = str(peers.python)
    facts["load_during_runs"] = report.load_summary(results, int(facts["cores"] or 1))
    config = {"command": "python -m benchmarks " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
              "size": len(project.tests), "rounds": args.rounds, "subset": min(args.subset, len(project.tests)),
              "commit_tests": len(project.commit_tests), "only": args.only, "pgshard": code,
              "total_seconds": round(time.perf_counter() - started, 1), "isolation": isolated}
    if code_version() != code:  # someone changed pgshard while we measured: the rounds mix two versions
        config["pgshard_changed_during_run"] = code_version()
        print(f"WARNING: pgshard's sources changed during the run (now {code_version()}); rerun to compare like "
              "with like", flush=True)
    stats, goals = report.write(args.results_dir, chosen, results, facts, config)
    _print(stats, goals, facts)
    print(f"\nresults: {args.results_dir / 'results.md'} (+ .json, .png); took {config['total_seconds']} s")
    return _exit_code(results, {name for name, c in registry.BY_NAME.items() if c.peer})


def _exit_code(results: list[RunResult], peers: set[str]) -> int:
    """1 when a run failed; a peer's run whose own server died or hung is a finding about that peer (reported
    in the results with its output), not a failure of the harness: py-pglite's node server does that under
    load (benchmarks/README.md)."""
    findings = sorted({r.name for r in results if not r.ok and r.broke and r.name in peers})
    for name in findings:
        print(f"peer run {name} broke (its server died or hung): reported in the results, not counted as a "
              "failure of the harness", flush=True)
    return 0 if all(r.ok or (r.broke and r.name in peers) for r in results) else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # Started in the background, a harness inherits an ignored SIGINT: take both signals back, so that an
    # interrupted run still stops its servers (the finally blocks) instead of leaving them behind.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    args = parse(argv)
    args.argv = argv
    commands = {"run": run_benchmarks, "profile": profile, "report": rerender, "phases": phases}
    return commands[args.command](args)
