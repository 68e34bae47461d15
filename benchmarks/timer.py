"""The in-run timer, loaded into every benchmarked pytest run with ``-p benchmarks.timer``.

It writes to ``BENCH_TIMER_OUT`` how many tests passed and failed and, per test in the order they ran,
the sum of its setup, call and teardown durations (pytest's own timings). The harness checks the first
and derives the in-run per-test cost from the second. Under xdist it runs in the controller, which
receives every report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

_durations: dict[str, float] = {}  # insertion order = order the tests ran in (serial runs)
_failed: set[str] = set()
_passed: set[str] = set()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    if report.failed:
        _failed.add(report.nodeid)
    elif report.when == "call" and report.passed:
        _passed.add(report.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get("BENCH_TIMER_OUT")
    if not target or hasattr(session.config, "workerinput"):
        return
    data = {"passed": len(_passed - _failed), "failed": sorted(_failed)[:20], "n_failed": len(_failed),
            "test_seconds": list(_durations.values())}
    Path(target).write_text(json.dumps(data))
