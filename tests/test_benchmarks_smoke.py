"""The benchmark harness keeps working: a tiny generated suite, one round, the cheap contenders, real PostgreSQL.

The full benchmark (``python -m benchmarks run``) takes minutes and stays out of CI; this runs the same code
path end to end (generator, server, hand-written conftests, pgshard by ini, timer, report) in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pgshard.host import default_cache_dir

REPO = Path(__file__).resolve().parent.parent
CHEAP = ["bare", "pgshard", "truncate", "drop_create", "clone", "commit_pool", "commit_naive"]


def test_benchmark_harness_times_every_cheap_contender_on_a_tiny_suite(tmp_path: Path) -> None:
    results = tmp_path / "results"
    server_dir = default_cache_dir().with_name(default_cache_dir().name + "-bench-smoke")  # not the real run's
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--size", "6", "--rounds", "1", "--subset", "3",
         "--only", ",".join(CHEAP), "--work-dir", str(tmp_path / "work"), "--results-dir", str(results),
         "--server-dir", str(server_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    data = json.loads((results / "results.json").read_text())
    stats = data["contenders"]
    assert set(stats) == {*CHEAP, "bare_subset"}  # the subset strategies brought their baseline along
    for name, stat in stats.items():
        assert stat["errors"] == [], name
        assert len(stat["walls"]) == 1 and stat["walls"][0] > 0, name
    assert all(run["passed"] == run["expected"] > 0 for run in data["runs"])
    assert {run["expected"] for run in data["runs"] if run["name"] == "pgshard"} == {6}
    assert {run["expected"] for run in data["runs"] if run["name"] == "truncate"} == {3}
    for name in ("pgshard", "truncate", "drop_create", "clone"):  # each measured against bare on its tests
        assert isinstance(stats[name]["inrun_overhead_ms"], float), name
        assert isinstance(stats[name]["overhead_ms"], float), name
    # Rebuilding the schema per test must cost more than a savepoint, whatever the noise of a tiny run.
    assert stats["drop_create"]["inrun_overhead_ms"] > stats["pgshard"]["inrun_overhead_ms"]

    markdown = (results / "results.md").read_text()
    for stat in stats.values():
        assert stat["label"] in markdown
    assert data["machine"]["postgresql"] and data["machine"]["cores"] >= 1
    assert "| target |" in proc.stdout  # the headline table is printed too
