"""Turn the raw runs into numbers (medians, overheads, ratios, targets) and write results.{json,md,png}.

Per-test overhead, two ways, both against ``bare`` (the same tests, no isolation) in the same round:
- in-run (the headline): mean of pytest's own setup+call+teardown per test, leaving out the first and the
  last test (they carry the session-scoped set-up and tear-down), minus bare's; median over rounds. This is
  the steady-state cost of the isolation itself.
- wall: (wall time of the run - wall time of bare) / tests; median over rounds. It also charges the
  strategy's one-off costs (template build, clone, imports) to the tests of that run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.contenders import Contender
from benchmarks.runner import RunResult


@dataclass
class Stat:
    name: str
    label: str
    selection: str
    tests: int
    walls: list[float]
    wall: float  # median
    cpu: float  # median CPU seconds of the pytest processes
    inrun_ms: float  # median over rounds of the steady-state in-run time per test
    overhead_ms: float | None = None  # per test, vs bare on the same tests (wall method)
    inrun_overhead_ms: float | None = None  # per test, vs bare (in-run method: the headline)
    errors: list[str] = field(default_factory=list)
    round_walls: list[tuple[int, float]] = field(default_factory=list)  # (round, wall) of the good runs
    round_steady: list[tuple[int, float]] = field(default_factory=list)  # (round, in-run ms per test)
    within_noise: bool = False  # its in-run overhead cannot be told apart from bare's (see summarise)
    cpu_overhead_ms: float | None = None  # per test, CPU of the pytest processes vs bare's in the same round
    peak_rss_mb: float | None = None  # median peak resident memory of the process tree (pytest, workers, server
    # processes the run started itself; not the shared server)


@dataclass
class Target:
    what: str
    goal: str
    measured: float | None
    unit: str
    met: bool | None
    note: str = ""


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(contenders: list[Contender], results: list[RunResult]) -> dict[str, Stat]:
    stats: dict[str, Stat] = {}
    for c in contenders:
        mine = [r for r in results if r.name == c.name]
        good = [r for r in mine if r.ok]
        stats[c.name] = Stat(c.name, c.label, c.selection, mine[0].expected if mine else 0,
                             [r.wall for r in good], _median([r.wall for r in good]), _median([r.cpu for r in good]),
                             _median([r.steady_ms for r in good if r.steady_ms == r.steady_ms]),
                             errors=[r.error for r in mine if not r.ok],
                             round_walls=[(r.round, r.wall) for r in good],
                             round_steady=[(r.round, r.steady_ms) for r in good if r.steady_ms == r.steady_ms],
                             peak_rss_mb=_median([r.peak_mb for r in good if r.peak_mb]) if good else None)
    for c in contenders:
        base = stats.get(c.baseline or "")
        stat = stats[c.name]
        if base is None or not stat.walls or not base.walls:
            continue
        by_round = {r.round: r.wall for r in results if r.name == base.name and r.ok}
        paired = [r.wall - by_round[r.round] for r in results if r.name == c.name and r.ok and r.round in by_round]
        stat.overhead_ms = _median(paired) / stat.tests * 1000 if paired else None
        cpu_by_round = {r.round: r.cpu for r in results if r.name == base.name and r.ok}
        cpu_paired = [r.cpu - cpu_by_round[r.round] for r in results
                      if r.name == c.name and r.ok and r.round in cpu_by_round]
        stat.cpu_overhead_ms = _median(cpu_paired) / stat.tests * 1000 if cpu_paired else None
        stat.inrun_overhead_ms = stat.inrun_ms - base.inrun_ms
        base_steady = dict(base.round_steady)
        per_round = [ms - base_steady[r] for r, ms in stat.round_steady if r in base_steady]
        # Within noise: some round measured it no dearer than no isolation at all. A ratio over such a
        # denominator is noise divided by noise, so none is printed.
        stat.within_noise = bool(per_round) and (min(per_round) <= 0 or stat.inrun_overhead_ms <= 0)
    return stats


def _ratio(stats: dict[str, Stat], num: str, den: str, key: Callable[[Stat], float | None]) -> float | None:
    if num not in stats or den not in stats:
        return None
    if key(stats[den]) is stats[den].inrun_overhead_ms and stats[den].within_noise:
        return None  # see NOISE
    a, b = key(stats[num]), key(stats[den])
    if a is None or b is None or b <= 0 or a != a or b != b:
        return None
    return a / b


def at_least(goal: float) -> Callable[[float], bool]:
    return lambda value: value >= goal


def targets(stats: dict[str, Stat], size: int) -> list[Target]:
    """The project's targets, for the contenders that ran (a failed contender shows as n/a)."""
    inrun: Callable[[Stat], float | None] = lambda s: s.inrun_overhead_ms  # noqa: E731
    overhead: Callable[[Stat], float | None] = lambda s: s.overhead_ms  # noqa: E731
    wall: Callable[[Stat], float | None] = lambda s: s.wall  # noqa: E731
    out = []

    def add(names: tuple[str, ...], what: str, goal: str, measured: float | None, unit: str,
            ok: Callable[[float], bool], note: str = "") -> None:
        if all(name in stats for name in names):
            out.append(Target(what, goal, measured, unit, None if measured is None else ok(measured), note))

    noisy = "pgshard" in stats and stats["pgshard"].within_noise
    for other, goal, label in (("blog_recipe", 100, "the blog post's recipe"), ("clone", 20, "a clone per test")):
        by_wall = _ratio(stats, other, "pgshard", overhead)
        note = f"wall method: {_f(by_wall, 0)}x"
        if noisy and other in stats:
            note = (f"pgshard is {NOISE} ({_f(stats['pgshard'].inrun_overhead_ms)} ms), so no ratio; "
                    f"{label}: {_f(stats[other].inrun_overhead_ms)} ms a test")
        add((other, "pgshard"), f"per-test overhead: pgshard vs {label}", f">= {goal}x lower",
            _ratio(stats, other, "pgshard", inrun), "x", at_least(goal), note)
    add(("pytest_postgresql", "pgshard"), f"{size}-test suite end to end vs pytest-postgresql", ">= 10x faster",
        _ratio(stats, "pytest_postgresql", "pgshard", wall), "x", at_least(10))
    bare = _ratio(stats, "work_bare_serial", "work_bare_n2", wall)
    note = f"bare (no pgshard) gets {_f(bare)}x" if bare else ""
    if "work_serial" in stats and "work_n2" in stats:
        note += f"; CPU s serial -> -n 2: {stats['work_serial'].cpu:.1f} -> {stats['work_n2'].cpu:.1f}"
    add(("work_serial", "work_n2"), "-n 2 vs serial, 10 ms of work per test", ">= 1.6x faster",
        _ratio(stats, "work_serial", "work_n2", wall), "x", at_least(1.6), note.strip("; "))
    start: dict[str, float] = {
        n: stats[n].wall - stats["bare_one"].wall for n in ("start_warm_url", "start_warm_embedded")
        if n in stats and "bare_one" in stats and stats[n].walls and stats["bare_one"].walls}
    note = ""
    if "start_warm_url" in start and "start_warm_embedded" in start:
        server_seconds = start["start_warm_embedded"] - start["start_warm_url"]
        note = f"of which starting and stopping the server: {server_seconds:.2f} s"
    for name, label in (("start_warm_url", "server running"), ("start_warm_embedded", "embedded server stopped")):
        add((name, "bare_one"), f"warm-start overhead ({label})", "<= 0.5 s", start.get(name), "s",
            lambda seconds: seconds <= 0.5, note if name == "start_warm_embedded" else "")
    for name, floor, what, goal in (
            ("start_warm_linger", "bare_one", "warm start over bare pytest (server lingering), 1 test", 0.1),
            ("start_n2_linger", "bare_four_n2", "-n 2 start over bare -n 2 (server lingering), 4 tests", 0.2),
            ("start_warm_server", "bare_one", "warm start over bare pytest (server kept up), 1 test", 0.1),
            ("start_n2_server", "bare_four_n2", "-n 2 start over bare -n 2 (server kept up), 4 tests", 0.2),
            ("start_warm_server_before", "bare_one", "the same warm start, --before-src", 0.1),
            ("start_n2_server_before", "bare_four_n2", "the same -n 2 start, --before-src", 0.2)):
        delta = paired_delta(stats, name, floor)
        add((name, floor), what, f"<= {goal} s", delta, "s", lambda seconds, goal=goal: seconds <= goal,
            f"median of per-round differences; bare {_f(stats[floor].wall)} s" if floor in stats else "")
    return out


def paired_delta(stats: dict[str, Stat], name: str, floor: str) -> float | None:
    """Median over rounds of (wall of ``name`` - wall of ``floor`` in the same round): the rounds interleave
    the two, so a slow spell of the machine hits both sides of each difference."""
    if name not in stats or floor not in stats:
        return None
    floor_by_round = dict(stats[floor].round_walls)
    diffs = [wall - floor_by_round[r] for r, wall in stats[name].round_walls if r in floor_by_round]
    return _median(diffs) if diffs else None


# -- rendering ------------------------------------------------------------------------------------------------
def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:,.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *["| " + " | ".join(row) + " |" for row in rows]]


def headline(stats: dict[str, Stat], goals: list[Target]) -> list[str]:
    verdict = {True: "met", False: "MISSED", None: "n/a"}
    rows = [[t.what, t.goal, f"{_f(t.measured, 2 if (t.measured or 0) < 10 else 1)} {t.unit}", verdict[t.met],
             t.note] for t in goals]
    return _table(["target", "goal", "measured", "", "note"], rows)


NOISE = "within noise of no isolation"


def overhead_table(stats: dict[str, Stat], names: list[str]) -> list[str]:
    ref = stats.get("pgshard")
    rows = []
    for name in names:
        s = stats.get(name)
        if s is None:
            continue
        ratio = _ratio(stats, name, "pgshard", lambda x: x.inrun_overhead_ms) if ref else None
        if s.within_noise:
            compared = NOISE
        elif ref is not None and ref.within_noise and name != "pgshard":
            compared = f"pgshard is {NOISE}"
        else:
            compared = "" if ratio is None else f"{ratio:.2f}x" if ratio < 10 else f"{ratio:,.0f}x"
        rows.append([s.label, str(s.tests), _f(s.inrun_overhead_ms, 2), _f(s.overhead_ms, 2),
                     _f(s.cpu_overhead_ms, 2), _f(s.wall), compared])
    return _table(["contender", "tests", "overhead ms/test (in-run)", "overhead ms/test (wall)",
                   "CPU ms/test over bare", "wall s", "vs pgshard (in-run)"], rows)


def wall_table(stats: dict[str, Stat], names: list[str], ref: str, delta: bool = False) -> list[str]:
    rows = []
    for name in names:
        s = stats.get(name)
        if s is None or ref not in stats:
            continue
        if delta:
            compared = f"{s.wall - stats[ref].wall:+.2f} s"
        else:
            ratio = _ratio(stats, name, ref, lambda x: x.wall)
            compared = "" if ratio is None else f"{ratio:.2f}x"
        rows.append([s.label, str(s.tests), _f(s.wall), ", ".join(_f(w) for w in s.walls), _f(s.cpu),
                     _f(s.peak_rss_mb, 0), compared])
    what = "time minus" if delta else "time relative to"
    return _table(["contender", "tests", "wall s (median)", "rounds", "CPU s", "peak MB", f"{what} {stats[ref].label}"]
                  if ref in stats else ["(no reference run)"], rows)


SECTIONS: list[tuple[str, str, list[str], str | None]] = [
    ("Per-test floor: pgshard against the hand-written per-worker conftest (SQLAlchemy's recipe)", "overhead",
     ["pgshard", "pgshard_before", "per_worker"], None),
    ("Per-test overhead of isolation strategies and peers", "overhead",
     ["pgshard", "per_worker", "sa_alembic_recipe", "sqla", "pglite", "pytest_postgresql", "truncate",
      "drop_create", "clone", "blog_recipe", "sa_alembic"], None),
    ("Peers: whole suite, serial", "wall",
     ["bare", "pgshard", "sa_alembic", "sa_alembic_recipe", "sqla", "pglite", "pytest_postgresql"], "pgshard"),
    ("Peers: whole suite, -n 2", "wall",
     ["bare_n2", "pgshard_n2", "sa_alembic_n2", "sa_alembic_recipe_n2", "sqla_n2", "pglite_n2",
      "pytest_postgresql_n2"], "pgshard_n2"),
    ("Peers: start-up, one test (warm: each has run before)", "wall",
     ["bare_one", "start_warm_server", "start_warm_url", "sa_alembic_one", "sa_alembic_recipe_one", "sqla_one",
      "pglite_one", "pytest_postgresql_one"], "bare_one"),
    ("Whole suite, serial, end to end", "wall", ["bare", "pgshard", "pytest_postgresql"], "pgshard"),
    ("Parallel: -n 2 / -n auto", "wall", ["pgshard", "pgshard_n2", "pgshard_n2_embedded", "pgshard_nauto",
                                          "per_worker_n2", "bare", "bare_n2"], "pgshard"),
    ("-n 2: pgshard's embedded server, pgshard on --pg-url, the hand-written conftest (run with --neighbour: "
     "beside a neighbour load)", "wall", ["pgshard_n2_embedded", "pgshard_n2", "per_worker_n2", "bare_n2"],
     "pgshard_n2"),
    ("Parallel with 10 ms of work per test", "wall", ["work_serial", "work_n2", "work_bare_serial", "work_bare_n2"],
     "work_serial"),
    ("db_commit tests: pre-warmed pool vs a naive clone per test", "wall", ["commit_pool", "commit_naive"],
     "commit_pool"),
    ("Start-up: one test, cold and warm", "wall",
     ["bare_one", "start_warm_linger", "start_warm_server", "start_warm_server_before", "start_warm_url",
      "start_warm_embedded",
      "start_cold_rebuild", "start_cold_fresh", "start_cold_fresh_before"], "bare_one"),
    ("Start-up under -n 2: four tests", "wall", ["bare_four_n2", "start_n2_linger", "start_n2_server",
                                                 "start_n2_server_before", "start_n2_cold", "start_n2_cold_before"],
     "bare_four_n2"),
    ("Real-shaped project (settings at import, seeded superuser, command: migrations)", "wall",
     ["real_own", "real_pgshard", "real_pgshard_n2"], "real_own"),
]


def markdown(stats: dict[str, Stat], goals: list[Target], machine: dict[str, Any], config: dict[str, Any]) -> str:
    lines = ["# pgshard benchmark results", "", f"Command: `{config['command']}`  ", f"Date: {machine['date']}  ",
             f"pgshard: {config.get('pgshard', 'unknown')}", "",
             "## Targets", "", *headline(stats, goals), ""]
    for title, kind, names, ref in SECTIONS:
        if not any(n in stats for n in names):
            continue
        lines += [f"## {title}", ""]
        if kind == "overhead":
            lines += overhead_table(stats, names)
        else:
            lines += wall_table(stats, names, ref or names[0], delta=ref in ("bare_one", "bare_four_n2"))
        lines.append("")
    isolation = config.get("isolation") or {}
    if isolation:
        lines += ["## Isolation, shuffled order", "",
                  f"{len(isolation)} contenders ran the isolation probes (each "
                  "commits the same unique coupon code and expects to see only its own) in a random order "
                  f"(pytest-randomly, seed {next(iter(isolation.values()))['seed']}).", ""]
        lines += _table(["contender", "probes passed", "verdict"],
                        [[stats[n].label if n in stats else n, f"{v['passed']}/{v['expected']}",
                          "isolated" if v["isolated"] else "NOT isolated"] for n, v in isolation.items()])
        lines.append("")
    subset = [s.label for s in stats.values() if s.selection == "subset" and s.name != "bare_subset"]
    if subset:
        lines += [f"The expensive strategies ({', '.join(subset)}) ran on the first {config['subset']} tests only;",
                  "their overhead is per test, against bare on those same tests.", ""]
    lines += ["## Machine", "", *_table(["", ""], [[k, str(v)] for k, v in machine.items()]), "",
              "## Method", "", f"{config['rounds']} round(s); each round runs every contender once, in the same order, "
              "each in a fresh `python -m pytest` process on the same PostgreSQL server; medians over rounds.",
              "Per-test overhead, in-run (headline): mean of pytest's setup+call+teardown per test, first and "
              "last test left out, minus bare's on the same tests. Wall: (wall of the run - wall of bare, same "
              "round) / tests, so it includes one-off costs. CPU s: user+system time of the pytest processes "
              "(not the server's). See benchmarks/README.md.", ""]
    if config.get("pgshard_changed_during_run"):
        lines += [f"**pgshard's sources changed during this run** (to {config['pgshard_changed_during_run']}): "
                  "its rounds mix two versions.", ""]
    errors = [(s.label, e) for s in stats.values() for e in s.errors]
    if errors:
        lines += ["## Errors", ""] + [f"- {label}:\n\n```\n{e}\n```" for label, e in errors]
    return "\n".join(lines) + "\n"


def chart(stats: dict[str, Stat], path: Path) -> bool:
    """The PNG; False when matplotlib is missing (it is in the ``bench`` extra, not in ``dev``)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("per-test overhead (in-run), ms, log scale",
               [(s.label, s.inrun_overhead_ms) for n in SECTIONS[1][2]
                if (s := stats.get(n)) and s.inrun_overhead_ms and s.inrun_overhead_ms > 0], True)]
    for title, _, names, _ in SECTIONS[1:]:
        bars = [(s.label, s.wall) for n in names if (s := stats.get(n)) and s.walls]
        panels.append((title + ", wall s", bars, False))
    panels = [panel for panel in panels if len(panel[1]) > 1]  # a single bar compares nothing
    if not panels:
        return True
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.1 + sum(0.45 * len(p[1]) + 0.8 for p in panels)))
    for ax, (title, bars, log) in zip(axes if len(panels) > 1 else [axes], panels, strict=True):
        labels, values = [b[0] for b in bars], [b[1] for b in bars]
        ax.barh(range(len(values)), values, color="#4C72B0")
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9, loc="left")
        if log:
            ax.set_xscale("log")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.2f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def load_summary(results: list[RunResult], cores: int) -> str:
    """How busy the machine was (others' work included): noise shows here first."""
    loads = sorted(r.load for r in results) or [float("nan")]
    return (f"1-min load average at the start of each run: median {statistics.median(loads):.2f}, "
            f"max {loads[-1]:.2f} ({cores} = every core busy)")


def write(results_dir: Path, contenders: list[Contender], results: list[RunResult], machine: dict[str, Any],
          config: dict[str, Any]) -> tuple[dict[str, Stat], list[Target]]:
    stats = summarise(contenders, results)
    goals = targets(stats, config["size"])
    results_dir.mkdir(parents=True, exist_ok=True)
    data = {"config": config, "machine": machine, "targets": [asdict(t) for t in goals],
            "contenders": {n: asdict(s) for n, s in stats.items()},
            "runs": [asdict(r) for r in results]}
    (results_dir / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (results_dir / "results.md").write_text(markdown(stats, goals, machine, config))
    if not chart(stats, results_dir / "results.png"):
        print("matplotlib is not installed: no results.png (pip install -e '.[bench]')")
    return stats, goals
