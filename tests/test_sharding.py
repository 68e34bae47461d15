"""--shard K/N: each test runs on exactly one machine, machines agree without talking, shards balance."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import pgshard
from pgshard.sharding import (
    DurationsRecorder,
    ShardError,
    load_durations,
    parse_shard,
    split,
)

SIZES = (0, 1, 2, 3, 7, 10, 31, 100, 257)


def suite(size: int) -> list[str]:
    """Node ids shaped like real ones: several modules, classes, parametrized ids."""
    ids = []
    for i in range(size):
        module = f"tests/test_mod{i % 5}.py"
        ids.append(f"{module}::test_{i}" if i % 3 else f"{module}::TestThing::test_case[{i}-x]")
    return ids


def shards_of(nodeids: list[str], n: int, durations: dict[str, float] | None = None) -> list[list[str]]:
    return [split(nodeids, k, n, durations)[0] for k in range(1, n + 1)]


def assert_partition(nodeids: list[str], shards: list[list[str]]) -> None:
    seen: list[str] = [nodeid for shard in shards for nodeid in shard]
    assert sorted(seen) == sorted(nodeids), "every test in exactly one shard"


# --- parse_shard -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"), [("1/1", (1, 1)), ("2/4", (2, 4)), ("4/4", (4, 4)), (" 3 / 7 ", (3, 7))]
)
def test_parse_shard_reads_k_of_n(spec: str, expected: tuple[int, int]) -> None:
    assert parse_shard(spec) == expected


@pytest.mark.parametrize(
    "spec", ["0/4", "5/4", "a/b", "1/0", "0/0", "", "1/2/3", "2", "-1/4", "1.0/2", "½/2", "/4"]
)
def test_bad_shard_spec_raises_one_error_naming_the_option(spec: str) -> None:
    with pytest.raises(ShardError) as excinfo:
        parse_shard(spec)
    message = str(excinfo.value)
    assert "--shard" in message
    assert "PGSHARD_SHARD" in message
    assert repr(spec) in message
    assert isinstance(excinfo.value, ValueError)


def test_shard_error_message_reads_as_documented() -> None:
    with pytest.raises(
        ShardError, match=r"^--shard \(or PGSHARD_SHARD\) must look like K/N with 1 <= K <= N, got '5/4'$"
    ):
        parse_shard("5/4")


@pytest.mark.parametrize(("k", "n"), [(0, 3), (4, 3), (1, 0)])
def test_split_rejects_k_outside_1_to_n(k: int, n: int) -> None:
    with pytest.raises(ShardError):
        split(suite(5), k, n, None)


# --- split by count -----------------------------------------------------------------------------------


def test_shards_by_count_cover_the_suite_without_overlap_and_differ_by_at_most_one() -> None:
    for size in SIZES:
        nodeids = suite(size)
        for n in range(1, 8):
            shards = shards_of(nodeids, n)
            assert_partition(nodeids, shards)
            sizes = [len(shard) for shard in shards]
            assert max(sizes) - min(sizes) <= 1, (size, n, sizes)


def test_one_shard_is_the_whole_suite_in_its_order() -> None:
    nodeids = suite(31)
    random.Random(3).shuffle(nodeids)
    assert split(nodeids, 1, 1, None) == (nodeids, None)


def test_selection_keeps_the_original_collection_order() -> None:
    nodeids = suite(40)
    random.Random(5).shuffle(nodeids)
    for k in range(1, 4):
        selected, _ = split(nodeids, k, 3, None)
        positions = [nodeids.index(nodeid) for nodeid in selected]
        assert positions == sorted(positions)


def test_slow_module_is_spread_over_shards_when_balancing_by_count() -> None:
    nodeids = [f"tests/test_slow.py::test_{i:02}" for i in range(8)] + [
        f"tests/test_z.py::test_{i}" for i in range(8)
    ]
    for shard in shards_of(nodeids, 4):
        assert sum(nodeid.startswith("tests/test_slow.py") for nodeid in shard) == 2


def test_empty_suite_selects_nothing() -> None:
    assert split([], 2, 3, None) == ([], None)
    assert split([], 2, 3, {"a": 1.0}) == ([], None)


def test_duplicate_nodeids_go_to_the_same_shard() -> None:
    twice = "tests/test_mod4.py::test_4"
    nodeids = [*suite(9), twice, twice]
    shards = shards_of(nodeids, 4)
    holders = [shard for shard in shards if twice in shard]
    assert len(holders) == 1
    assert holders[0].count(twice) == 3
    assert sum(map(len, shards)) == len(nodeids)


# --- split by durations ------------------------------------------------------------------------------


def random_durations(nodeids: list[str], seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    # Long-tailed like real suites: most tests are quick, a few are very slow.
    return {nodeid: round(rng.expovariate(1 / 0.2), 4) for nodeid in nodeids}


def test_shards_by_duration_cover_the_suite_and_stay_near_the_ideal() -> None:
    for seed, size in enumerate(SIZES):
        nodeids = suite(size)
        durations = random_durations(nodeids, seed)
        for n in range(1, 8):
            shards = shards_of(nodeids, n, durations)
            assert_partition(nodeids, shards)
            if not nodeids:
                continue
            totals = [sum(durations[nodeid] for nodeid in shard) for shard in shards]
            # No split beats max(mean load, longest test); greedy LPT is within 4/3 of the optimum.
            lower_bound = max(sum(durations.values()) / n, max(durations.values()))
            assert max(totals) <= lower_bound * 4 / 3 + 1e-9, (size, n, totals, lower_bound)


def test_durations_beat_counting_on_a_lopsided_suite() -> None:
    nodeids = [f"tests/test_a.py::test_{i}" for i in range(10)]
    durations = {nodeid: 0.01 for nodeid in nodeids} | {nodeids[0]: 5.0, nodeids[1]: 5.0}
    totals = [sum(durations[x] for x in shard) for shard in shards_of(nodeids, 2, durations)]
    assert max(totals) == pytest.approx(5.04)


def test_unknown_tests_count_as_the_median_known_duration() -> None:
    durations = {"t::a": 10.0, "t::b": 10.0, "t::c": 1.0, "t::d": 1.0, "t::e": 1.0}  # median 1, mean 4.6
    nodeids = [*durations, "t::0new"]
    shards = shards_of(nodeids, 2, durations)
    # As 1.0 the new test is placed right after a and b; as 0 it would come last, as the mean third.
    assert shards == [["t::a", "t::d", "t::0new"], ["t::b", "t::c", "t::e"]]


def test_durations_knowing_exactly_half_the_suite_are_still_used() -> None:
    nodeids = ["t::a", "t::b", "t::c", "t::d"]
    durations = {"t::a": 9.0, "t::b": 0.1}  # c and d count as the median, 4.55
    assert split(nodeids, 1, 2, durations) == (["t::a", "t::b"], None)
    assert split(nodeids, 1, 2, None) == (["t::a", "t::c"], None)


def test_stale_durations_are_ignored_with_a_warning_and_count_balancing() -> None:
    nodeids = suite(20)
    stale = {nodeid: 1.0 for nodeid in nodeids[:9]} | {f"tests/gone.py::test_{i}": 1.0 for i in range(50)}
    for k in range(1, 4):
        selected, warning = split(nodeids, k, 3, stale, source="durations file .test_durations")
        assert (selected, None) == split(nodeids, k, 3, None)
        assert warning is not None
        assert "stale" in warning
        assert "9 of the 20" in warning
        assert ".test_durations" in warning


def test_unusable_values_in_a_durations_mapping_count_as_unknown() -> None:
    nodeids = ["t::a", "t::b", "t::c"]
    durations = {"t::a": float("nan"), "t::b": -1.0, "t::c": 2.0}
    _, warning = split(nodeids, 1, 2, durations)
    assert warning is not None and "1 of the 3" in warning


def test_all_zero_durations_still_balance_by_count() -> None:
    nodeids = suite(10)
    shards = shards_of(nodeids, 3, dict.fromkeys(nodeids, 0.0))
    assert sorted(len(shard) for shard in shards) == [3, 3, 4]


# --- determinism ---------------------------------------------------------------------------------------


def test_split_does_not_depend_on_collection_order() -> None:
    nodeids = suite(101)
    durations = random_durations(nodeids, 7)
    for n in (2, 3, 5):
        for use_durations in (None, durations):
            expected = [sorted(shard) for shard in shards_of(nodeids, n, use_durations)]
            rng = random.Random(n)
            for _ in range(5):
                shuffled = nodeids[:]
                rng.shuffle(shuffled)
                got = [sorted(shard) for shard in shards_of(shuffled, n, use_durations)]
                assert got == expected


def test_split_does_not_depend_on_durations_key_order() -> None:
    nodeids = suite(60)
    durations = random_durations(nodeids, 1)
    reordered = dict(sorted(durations.items(), reverse=True))
    assert shards_of(nodeids, 4, durations) == shards_of(nodeids, 4, reordered)


def test_equal_durations_are_tie_broken_by_nodeid() -> None:
    nodeids = suite(30)
    durations = dict.fromkeys(nodeids, 0.5)
    expected = [sorted(shard) for shard in shards_of(nodeids, 4, durations)]
    assert [sorted(shard) for shard in shards_of(nodeids[::-1], 4, durations)] == expected
    assert sorted(map(len, expected)) == [7, 7, 8, 8]


def test_split_does_not_depend_on_pythonhashseed(tmp_path: Path) -> None:
    nodeids = suite(80)
    durations = random_durations(nodeids, 2)
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"nodeids": nodeids, "durations": durations}))
    script = (
        "import json, sys\n"
        "from pgshard.sharding import split\n"
        "d = json.load(open(sys.argv[1]))\n"
        "print(json.dumps([[split(d['nodeids'], k, 3, dur)[0] for k in (1, 2, 3)]"
        " for dur in (None, d['durations'])]))\n"
    )
    src = str(Path(pgshard.__file__).resolve().parent.parent)
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": src}
        proc = subprocess.run(
            [sys.executable, "-c", script, str(data)], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(proc.stdout)
    assert len(outputs) == 1


# --- load_durations --------------------------------------------------------------------------------------


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_missing_durations_file_is_silent(tmp_path: Path) -> None:
    assert load_durations(tmp_path / "nope.json") == (None, None)


@pytest.mark.parametrize("document", [
    {"t::a": 1.5, "t::b": 0},  # pytest-split's .test_durations (what --pg-store-durations writes)
    [["t::a", 1.5], ["t::b", 0]],  # pytest-split's older list of pairs
    {"version": 1, "durations": {"t::a": 1.5, "t::b": 0}},  # pgshard's own earlier format
], ids=["pytest-split", "pytest-split-pairs", "pgshard-v1"])
def test_valid_durations_file_loads(tmp_path: Path, document: object) -> None:
    path = write_json(tmp_path / "d.json", document)
    assert load_durations(path) == ({"t::a": 1.5, "t::b": 0.0}, None)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[1, 2]",
        '"slow"',
        '{"t::a": "slow"}',
        '{"durations": {"t::a": 1}}',
        '{"version": 2, "durations": {"t::a": 1}}',
        '{"version": 1, "durations": [1, 2]}',
        '{"version": 1, "durations": {"t::a": "slow"}}',
        '{"version": 1, "durations": {"t::a": true}}',
        '{"version": 1, "durations": {"t::a": -3}}',
        '{"version": 1, "durations": {"t::a": NaN}}',
    ],
)
def test_unusable_durations_file_warns_and_falls_back(tmp_path: Path, content: str) -> None:
    path = tmp_path / "durations.json"
    path.write_text(content, encoding="utf-8")
    durations, warning = load_durations(path)
    assert durations is None
    assert warning is not None
    assert str(path) in warning
    assert "falling back to test counts" in warning
    assert "\n" not in warning


def test_unreadable_durations_file_warns(tmp_path: Path) -> None:
    (tmp_path / "dir.json").mkdir()
    durations, warning = load_durations(tmp_path / "dir.json")
    assert durations is None
    assert warning is not None and "dir.json" in warning

    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert load_durations(binary)[1] is not None


# --- DurationsRecorder ------------------------------------------------------------------------------------


def test_recorder_adds_up_setup_call_and_teardown() -> None:
    recorder = DurationsRecorder()
    for seconds in (0.25, 1.0, 0.5):
        recorder.add("t::a", seconds)
    recorder.add("t::b", 2.0)
    assert recorder.durations == {"t::a": 1.75, "t::b": 2.0}
    assert len(recorder) == 2


def test_recorder_writes_pytest_splits_format_that_loads_back(tmp_path: Path) -> None:
    recorder = DurationsRecorder()
    recorder.add("t::b", 0.123456)
    recorder.add("t::a", 2.0)
    path = tmp_path / "sub" / "durations.json"
    assert recorder.write(path) is None
    data = json.loads(path.read_text())
    assert data == {"t::a": 2.0, "t::b": 0.1235}  # pytest-split's .test_durations: one file for both tools
    assert list(data) == ["t::a", "t::b"], "sorted keys keep diffs of a committed file small"
    assert load_durations(path) == ({"t::a": 2.0, "t::b": 0.1235}, None)


def test_recorder_merges_with_the_existing_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", {"version": 1, "durations": {"t::other_shard": 3.0, "t::a": 9.0}})
    recorder = DurationsRecorder()
    recorder.add("t::a", 1.0)
    recorder.add("t::new", 0.5)
    recorder.write(path)
    assert load_durations(path)[0] == {"t::other_shard": 3.0, "t::a": 1.0, "t::new": 0.5}


def test_recorder_replaces_a_corrupt_file_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("{oops")
    recorder = DurationsRecorder()
    recorder.add("t::a", 1.0)
    warning = recorder.write(path)
    assert warning is not None and str(path) in warning and "replaced" in warning
    assert load_durations(path) == ({"t::a": 1.0}, None)


def test_recorder_with_nothing_recorded_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    assert DurationsRecorder().write(path) is None
    assert not path.exists()


def test_recorder_write_is_atomic_and_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_json(tmp_path / "d.json", {"version": 1, "durations": {"t::a": 1.0}})
    before = path.read_text()
    recorder = DurationsRecorder()
    recorder.add("t::b", 1.0)

    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    warning = recorder.write(path)  # a warning, not an error: the run's outcome stands (issue 17 item 6)
    assert warning is not None and "could not write the durations file" in warning and "disk full" in warning
    assert "pgshard_durations_file" in warning
    assert path.read_text() == before, "a failed write must not damage the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]

    monkeypatch.undo()
    recorder.write(path)
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


def test_recorded_durations_drive_the_next_split(tmp_path: Path) -> None:
    nodeids = suite(12)
    recorder = DurationsRecorder()
    for i, nodeid in enumerate(nodeids):
        recorder.add(nodeid, 10.0 if i < 2 else 0.1)
    path = tmp_path / "d.json"
    recorder.write(path)
    durations, warning = load_durations(path)
    assert warning is None
    shards = shards_of(nodeids, 2, durations)
    assert [sum(nodeid in shard for nodeid in nodeids[:2]) for shard in shards] == [1, 1]
