"""The benchmark harness keeps working: a tiny generated suite, one round, every contender that installs here,
real PostgreSQL.

The full benchmark (``python -m benchmarks run``) takes many minutes and stays out of CI; this runs the same
code path end to end (generator, server, hand-written conftests, the peers in their own venv, pgshard by ini,
start-up contenders, isolation probes, timer, memory sampler, report) on a few tests each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.runner import RunResult
from pgshard.host import default_cache_dir

REPO = Path(__file__).resolve().parent.parent
CHEAP = ["bare", "pgshard", "per_worker", "truncate", "drop_create", "clone", "commit_pool", "commit_naive"]
PEERS = ["pytest_postgresql", "sqla", "sa_alembic", "sa_alembic_recipe", "pglite"]
STARTUP = ["bare_one", "start_warm_server", "bare_four_n2", "start_n2_server"]
# What each contender's isolation is documented to be: the probes (run shuffled) must agree.
ISOLATES = {"bare": False, "pgshard": True, "per_worker": True, "pytest_postgresql": True, "sqla": True,
            "sa_alembic": False,
            "sa_alembic_recipe": True, "pglite": True}


def test_benchmark_harness_runs_every_contender_that_installs_on_a_tiny_suite(tmp_path: Path) -> None:
    """One harness run (one server directory: two at once would refuse each other), checked whole: every
    contender timed and passing, peers installed or dropped with a reason, memory measured, the isolation
    probes agreeing with what each contender documents, start-up measured against the bare floor."""
    results = tmp_path / "results"
    # this suite's own cache dir (one per checkout, tests/conftest.py), never the machine-wide one: two
    # checkouts' suites at once would refuse each other's benchmark server
    suite_cache = Path(os.environ.get("PGSHARD_CACHE_DIR") or default_cache_dir())
    server_dir = suite_cache.with_name(suite_cache.name + "-bench-smoke")  # not the real run's
    harness = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "run", "--size", "6", "--rounds", "1", "--subset", "3",
         "--only", ",".join(CHEAP + PEERS + STARTUP), "--work-dir", str(tmp_path / "work"),
         "--results-dir", str(results), "--server-dir", str(server_dir)],  # peers: benchmarks/work (reused)
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = harness.communicate(timeout=1800)  # only a hang meets this
    except subprocess.TimeoutExpired:
        harness.terminate()  # SIGTERM: the harness stops its runs and servers on the way out
        stdout, stderr = harness.communicate()
    proc = subprocess.CompletedProcess(harness.args, harness.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((results / "results.json").read_text())

    stats = data["contenders"]
    peers = data["machine"].get("peers", {})
    dropped = {name for name, what in peers.items() if str(what).startswith("dropped")}
    for name in dropped:  # a peer that cannot install here is said so, with the reason
        assert f"peer {name} DROPPED: " in proc.stdout
    assert len(peers) == 4  # each of the four peers either ran or was dropped with its reason
    assert set(CHEAP + STARTUP) | {"bare_subset"} | {p for p in PEERS if p in stats} <= set(stats)
    # py-pglite's node server dies or hangs under load (benchmarks/README.md): such a run of that peer is a
    # finding the harness reports (and exits 0 on), never one of ours; every other run must pass
    runs = [RunResult(**run) for run in data["runs"]]
    broken = {r.name for r in runs if r.name == "pglite" and not r.ok and r.broke}
    if broken:
        assert "peer run pglite broke (its server died or hung)" in proc.stdout
    for name, stat in stats.items():
        if name in broken:
            continue
        assert stat["errors"] == [], name
        assert len(stat["walls"]) == 1 and stat["walls"][0] > 0, name
        assert stat["peak_rss_mb"] and stat["peak_rss_mb"] > 10, name  # a python process tree, measured
    assert all(r.passed == r.expected > 0 for r in runs if r.name not in broken)
    assert {run["expected"] for run in data["runs"] if run["name"] == "pgshard"} == {6}
    assert {run["expected"] for run in data["runs"] if run["name"] == "truncate"} == {3}
    for name in ("pgshard", "per_worker", "truncate", "drop_create", "clone"):  # against bare on its tests
        assert isinstance(stats[name]["inrun_overhead_ms"], float), name
        assert isinstance(stats[name]["overhead_ms"], float), name
        assert isinstance(stats[name]["cpu_overhead_ms"], float), name  # CPU time beside wall time
    # Rebuilding the schema per test must cost more than a savepoint, whatever the noise of a tiny run.
    assert stats["drop_create"]["inrun_overhead_ms"] > stats["pgshard"]["inrun_overhead_ms"]

    found = data["config"]["isolation"]  # the probes, shuffled, against what each documents
    # the same for the probes: a pglite probe run that broke is no verdict; ours always are
    unsure = {name for name, v in found.items() if name == "pglite" and not v["isolated"] and v["broke"]}
    assert {name: v["isolated"] for name, v in found.items() if name not in unsure} == {
        n: v for n, v in ISOLATES.items() if n in stats and n not in unsure}, {n: found[n]["tail"] for n in found}
    for name, verdict in found.items():
        assert verdict["expected"] == 8, name
        if not ISOLATES[name]:  # the first probe passes; the ones after it see its row
            assert 0 < verdict["passed"] < verdict["expected"], name

    goals = {t["what"]: t for t in data["targets"]}
    for prefix in ("warm start over bare pytest", "-n 2 start over bare -n 2"):
        target = next(t for what, t in goals.items() if what.startswith(prefix))
        assert isinstance(target["measured"], float)  # a difference of two measured walls, either sign

    markdown = (results / "results.md").read_text()
    for stat in stats.values():
        assert stat["label"] in markdown
    assert "## Isolation, shuffled order" in markdown
    assert data["machine"]["postgresql"] and data["machine"]["cores"] >= 1
    assert data["machine"]["loadavg_before"] and data["machine"]["loadavg_after"]
    assert "| target |" in proc.stdout  # the headline table is printed too


def test_a_peer_run_whose_server_broke_is_a_finding_and_any_other_failure_fails_the_harness() -> None:
    from benchmarks.cli import _exit_code

    def result(name: str, error: str = "") -> RunResult:
        return RunResult(name, 1, 1.0, 1.0, 0.0, 6, 0 if error else 6, 1 if error else 0, error=error)

    hung = result("pglite", "killed after 126 s (its time limit)\nexit -9, 0/6 passed:\n")
    lost = result("pglite", "exit 1, 3/6 passed:\nsqlalchemy.exc.OperationalError: server closed the connection")
    assert _exit_code([result("pgshard"), hung, lost], {"pglite"}) == 0
    assert _exit_code([result("pgshard", "killed after 126 s (its time limit)\n")], {"pglite"}) == 1  # ours
    assert _exit_code([result("pglite", "exit 1, 5/6 passed:\nAssertionError")], {"pglite"}) == 1  # not broke
