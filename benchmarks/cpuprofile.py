"""``python -m benchmarks.cpuprofile OUT -m MODULE ARGS...``: run a module under cProfile timed by the
process's CPU clock, not the wall clock, so time spent waiting on the server (or on a busy machine's
scheduler) is not charged to the function that waited. The per-test overhead questions are CPU questions."""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> None:
    out, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: python -m benchmarks.cpuprofile OUT -m MODULE [ARGS...]")
    sys.argv = [module, *rest]
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
