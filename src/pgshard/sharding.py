"""``--shard K/N``: pick this machine's share of the suite, and the durations file that balances it: the
same ``.test_durations`` file and format as pytest-split's (``--store-durations`` there, ``--pg-store-durations``
here), so a team that has one keeps it.

Every CI machine runs the same collection and must make the same choice without talking to the others,
so the split depends only on the set of node ids and the durations file: never on collection order,
``PYTHONHASHSEED``, the platform or the clock. Node ids are sorted first; every tie is broken by node id.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import re
import secrets
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from pgshard.settings import SettingsError

__all__ = [
    "DURATIONS_VERSION",
    "DurationsRecorder",
    "ShardError",
    "ShardHooks",
    "load_durations",
    "parse_shard",
    "split",
]

DURATIONS_VERSION = 1

_SHARD_RE = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*")


class ShardError(SettingsError):
    """A ``--shard`` value that cannot be used; the message names the option."""

    def __init__(self, spec: str) -> None:
        super().__init__(f"--shard (or PGSHARD_SHARD) must look like K/N with 1 <= K <= N, got {spec!r}")
        self.spec = spec


def parse_shard(spec: str) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``: shard K (1-based) of N."""
    match = _SHARD_RE.fullmatch(spec)
    if match is not None:
        k, n = int(match[1]), int(match[2])
        if 1 <= k <= n:
            return k, n
    raise ShardError(spec)


def _usable(value: object) -> float | None:
    """A duration we can add up: a finite, non-negative number (``bool`` is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _parse_durations(data: object) -> dict[str, float] | str:
    """The durations, or why the document is not a durations file. Read: pytest-split's ``.test_durations``
    (an object mapping test ids to seconds, or its older list of ``[id, seconds]`` pairs) and pgshard's own
    earlier ``{"version": 1, "durations": {...}}``; written: pytest-split's, so both tools share one file."""
    if isinstance(data, list):
        if not all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) for pair in data):
            return "expected an object mapping test ids to seconds, or a list of [test id, seconds] pairs"
        data = dict(data)
    if not isinstance(data, dict):
        return f"expected a JSON object mapping test ids to seconds, got {type(data).__name__}"
    raw: object = data
    if "version" in data and "durations" in data:  # pgshard's earlier format
        if data.get("version") != DURATIONS_VERSION:
            return f'expected "version": {DURATIONS_VERSION}, got {data.get("version")!r}'
        raw = data.get("durations")
        if not isinstance(raw, dict):
            return 'expected "durations" to be an object mapping test ids to seconds'
    assert isinstance(raw, dict)
    durations: dict[str, float] = {}
    for nodeid, value in raw.items():
        seconds = _usable(value)
        if seconds is None:
            return f"duration of {nodeid!r} is {value!r}, not a number of seconds"
        durations[str(nodeid)] = seconds
    return durations


def _read_durations(path: Path) -> tuple[dict[str, float] | None, str | None]:
    """``(durations, None)``, ``(None, None)`` when missing, or ``(None, why it is unusable)``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot be read ({exc})"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"is not valid JSON ({exc.msg} at line {exc.lineno})"
    parsed = _parse_durations(data)
    if isinstance(parsed, str):
        return None, f"is not a durations file ({parsed})"
    return parsed, None


def load_durations(path: Path) -> tuple[dict[str, float] | None, str | None]:
    """Read a durations file: ``(durations, warning)``.

    A missing file is normal (first run) and says nothing. A file we cannot use must not fail the run:
    sharding by count is still correct, only less balanced, so it becomes a warning.
    """
    durations, problem = _read_durations(path)
    if problem is not None:
        return None, f"durations file {path} {problem}; falling back to test counts"
    return durations, None


def _by_count(nodeids: Sequence[str], n: int) -> list[list[str]]:
    # Round-robin over the sorted ids: shard sizes differ by at most one, and a module full of slow
    # tests is spread over every shard instead of landing on one.
    return [list(nodeids[i::n]) for i in range(n)]


def _by_duration(nodeids: Sequence[str], n: int, durations: Mapping[str, float]) -> list[list[str]]:
    known = {nodeid: durations[nodeid] for nodeid in nodeids if nodeid in durations}
    default = statistics.median(known.values()) if known else 0.0
    # Longest processing time first: biggest tests first, each onto the currently lightest shard.
    # Ties on duration go by node id, ties on load by test count then shard index: no ambiguity left.
    order = sorted(nodeids, key=lambda nodeid: (-known.get(nodeid, default), nodeid))
    heap: list[tuple[float, int, int]] = [(0.0, 0, index) for index in range(n)]
    shards: list[list[str]] = [[] for _ in range(n)]
    for nodeid in order:
        total, count, index = heapq.heappop(heap)
        shards[index].append(nodeid)
        heapq.heappush(heap, (total + known.get(nodeid, default), count + 1, index))
    return shards


def split(
    nodeids: Sequence[str],
    k: int,
    n: int,
    durations: Mapping[str, float] | None,
    *,
    source: str = "the durations file",
) -> tuple[list[str], str | None]:
    """Shard ``k`` of ``n`` (1-based): ``(selected node ids in their original order, warning)``.

    With ``durations``, balance total time (tests it does not know count as its median); when it does
    not know most of the suite it is stale, is ignored, and a warning (naming ``source``) says so.
    Without it, balance the number of tests.
    """
    if not 1 <= k <= n:
        raise ShardError(f"{k}/{n}")
    unique = sorted(set(nodeids))
    if not unique:
        return [], None
    warning: str | None = None
    shards: list[list[str]] | None = None
    if durations is not None:
        usable = {nodeid: s for nodeid, value in durations.items() if (s := _usable(value)) is not None}
        known = sum(1 for nodeid in unique if nodeid in usable)
        if 2 * (len(unique) - known) <= len(unique):  # stale only when most tests are unknown
            shards = _by_duration(unique, n, usable)
        else:
            warning = (
                f"{source} knows only {known} of the {len(unique)} collected tests, so it is stale "
                "and was ignored; shards are balanced by test count. Refresh it with a full run and "
                "--pg-store-durations."
            )
    if shards is None:
        shards = _by_count(unique, n)
    selected = set(shards[k - 1])
    return [nodeid for nodeid in nodeids if nodeid in selected], warning


class DurationsRecorder:
    """Adds up each test's setup + call + teardown seconds and merges them into the durations file."""

    def __init__(self) -> None:
        self._durations: dict[str, float] = {}

    def add(self, nodeid: str, seconds: float) -> None:
        """Count one phase (setup, call or teardown) of ``nodeid``; phases and reruns add up."""
        self._durations[nodeid] = self._durations.get(nodeid, 0.0) + max(float(seconds), 0.0)

    @property
    def durations(self) -> dict[str, float]:
        return dict(self._durations)

    def __len__(self) -> int:
        return len(self._durations)

    def write(self, path: Path) -> str | None:
        """Merge into ``path`` (this run's values win) and replace it atomically.

        Merging is what lets each shard record only its own tests. An unusable existing file is
        replaced, and the returned warning says so. Recording nothing leaves the file untouched.
        """
        if not self._durations:
            return None
        existing, problem = _read_durations(path)
        merged = dict(existing or {})
        merged.update(self._durations)
        document = {nodeid: round(merged[nodeid], 4) for nodeid in sorted(merged)}  # pytest-split's format
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        try:
            self._replace(path, text)
        except OSError as exc:  # a read-only checkout, a full disk: the tests' outcome stands
            return (f"could not write the durations file {path} ({exc.strerror or exc}); this run's durations "
                    "were not kept: set pgshard_durations_file (PGSHARD_DURATIONS_FILE) to a writable path")
        if problem is not None:
            return f"durations file {path} {problem}; replaced it with this run's durations"
        return None

    @staticmethod
    def _replace(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A sibling temp file (same filesystem, so os.replace is atomic) opened with "x" under the
        # normal umask: readers see the old file or the new one, never half of one.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "x", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise


# -- pytest hooks (registered by plugin.py only when --shard or --pg-store-durations is given) --------------
class ShardHooks:
    """--shard K/N selection (identical in every xdist worker: the split is deterministic) and
    --pg-store-durations recording (in the controller, which sees every worker's reports)."""

    def __init__(self, config: pytest.Config, run: Any, worker_stats: Callable[[], list[dict[str, Any]]]) -> None:
        self.config = config
        self.run = run  # a pgshard.run.Run: its shard_emptied flag
        self.worker_stats = worker_stats  # what the xdist workers reported at their end
        self.settings = run.settings
        self.shard = parse_shard(self.settings.shard) if self.settings.shard else None
        self.recorder = DurationsRecorder() if self.settings.store_durations else None

    def _warn(self, text: str | None) -> None:
        # Under xdist only workers collect; gw0 speaks for all (xdist forwards its warning to the summary).
        workerinput = getattr(self.config, "workerinput", None)
        if text and (workerinput is None or workerinput.get("workerid") == "gw0"):
            self.config.issue_config_time_warning(pytest.PytestWarning(f"pgshard: {text}"), stacklevel=2)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if self.shard is None:
            return
        path = self.settings.durations_file
        durations, warning = load_durations(path)
        self._warn(warning)
        selected, warning = split([item.nodeid for item in items], *self.shard, durations,
                                  source=f"durations file {path}")
        self._warn(warning)
        keep = set(selected)
        deselected = [item for item in items if item.nodeid not in keep]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if item.nodeid in keep]
            self.run.shard_emptied = not items

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.recorder is not None:
            self.recorder.add(report.nodeid, report.duration)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.recorder is not None and not hasattr(self.config, "workerinput"):
            self._warn(self.recorder.write(self.settings.durations_file))
        emptied = self.run.shard_emptied or any(stats.get("shard_emptied") for stats in self.worker_stats())
        if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and emptied:
            session.exitstatus = pytest.ExitCode.OK  # more shards than tests: an empty shard is not a failure
