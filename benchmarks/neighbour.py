"""A neighbour load like the one a CI machine shares with other jobs, for ``python -m benchmarks run --neighbour``.

CPU burners alone did not bring back the embedded server's ``-n 2`` slowdown (issue 18), so the neighbour is
what a busy machine really holds besides: another suite with its own PostgreSQL, run with ``-n 2`` over and
over (a copy of the generated project, pgshard on a cache dir of its own: its own embedded server on the same
tmpfs), a writer that fills and empties a file on that tmpfs, and memory held resident. All of it stops, and
its server with it, when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# The writer: 256 MB into a tmpfs file, removed, again; the hog: --neighbour-memory MB touched and held.
_WRITER = """
import os, sys
path = sys.argv[1]
block = os.urandom(1 << 20)
while True:
    with open(path, "wb") as f:
        for _ in range(256):
            f.write(block)
    os.unlink(path)
"""
_HOG = """
import sys, time
held = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(held), 4096):
    held[i] = 1
while True:
    time.sleep(3600)
"""


def _suite_loop(project: Path, cache: Path, log: Path) -> list[str]:
    run = (f"{sys.executable} -m pytest -q -p no:randomly -p no:cacheprovider -n 2 tests "
           f">> {log} 2>&1 || true")
    return ["bash", "-c", f"cd {project} && while true; do PGSHARD_CACHE_DIR={cache} PGSHARD_LINGER=0 {run}; done"]


@contextlib.contextmanager
def neighbour(project: Path, work: Path, memory_mb: int = 2048) -> Iterator[str]:
    """Run the neighbour beside the block; yields a line saying what it is."""
    copy = work / "neighbour-project"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns(".pytest_cache", "__pycache__"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    cache = shm / f"pgshard-bench-neighbour-{os.getuid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSHARD_", "PYTEST_", "BENCH_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), str(copy)])
    procs = [subprocess.Popen(_suite_loop(copy, cache, work / "neighbour.log"), env=env, start_new_session=True),
             subprocess.Popen([sys.executable, "-c", _WRITER, str(shm / f"pgshard-bench-neighbour-{os.getpid()}.bin")],
                              start_new_session=True),
             subprocess.Popen([sys.executable, "-c", _HOG, str(memory_mb)], start_new_session=True)]
    try:
        yield (f"neighbour: the generated suite under pgshard -n 2 in a loop (its own embedded server, cache "
               f"{cache}), a 256 MB tmpfs writer, {memory_mb} MB held resident")
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for leftover in shm.glob("pgshard-bench-neighbour-*.bin"):
            leftover.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "pgshard.cli", "server", "stop"], capture_output=True,
                       env={**env, "PGSHARD_CACHE_DIR": str(cache)})
