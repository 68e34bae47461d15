"""Where start-up goes, per process: ``python -m benchmarks phases`` loads this plugin into bare and pgshard
runs (``-p benchmarks.phases``) and prints, for the controller and each xdist worker, the time from the
process's own start to each phase (interpreter and plugins loaded, configured, collected, first test set up
and run, session finished, process done), medians over interleaved rounds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_marks: dict[str, float] = {}


def _since_process_start() -> float:
    """Seconds since this process was started (its start time in /proc, against the boot clock)."""
    fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    started = int(fields[19]) / _CLOCK_TICKS
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started


def mark(name: str) -> None:
    _marks.setdefault(name, _since_process_start())


def _who(config: pytest.Config) -> str:
    workerinput = getattr(config, "workerinput", None)
    return str(workerinput["workerid"]) if workerinput else "main"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    mark("1 plugins loaded, configure")


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    mark("2 session started")


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    mark("3 collected")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    mark("4 first test: setup starts")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    mark("5 first test: body starts")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    mark("6 session finished (clones dropped)")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    mark("7 unconfigured (server released)")
    target = os.environ.get("BENCH_PHASES_OUT")
    if target:
        with open(target, "a") as out:
            out.write(json.dumps({"who": _who(config), "marks": _marks}) + "\n")
