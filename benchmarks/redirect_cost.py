"""What pgshard_redirect's engine events cost an engine they do not redirect: ``python -m benchmarks.redirect_cost``.

The listeners sit on the Engine and Pool classes, so every engine of the process pays for them. This
times, for a plain psycopg engine on another database name, with the listeners on and off in alternating
blocks (medians): a connect, a pool checkout, a statement; and each listener called alone, which is the
figure noise cannot hide.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool, Pool

from benchmarks.server import default_server_dir, url_of
from pgshard import redirect
from pgshard.server.embedded import EmbeddedServer


def _listeners(on: bool) -> None:
    pairs: list[tuple[type, str, Callable[..., object]]] = [
        (Engine, "do_connect", redirect._on_connect), (Pool, "checkout", redirect._on_checkout),
        (Pool, "checkin", redirect._on_checkin), (Engine, "before_cursor_execute", redirect._on_execute)]
    for target, name, fn in pairs:
        if on and not event.contains(target, name, fn):
            event.listen(target, name, fn, **({"retval": True} if name == "before_cursor_execute" else {}))
        elif not on and event.contains(target, name, fn):
            event.remove(target, name, fn)


def _timed(action: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        action()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10, help="alternating on/off blocks")
    parser.add_argument("--block", type=int, default=30, help="connects per block")
    args = parser.parse_args()
    server = EmbeddedServer(cache_dir=default_server_dir())
    info = server.acquire()
    try:
        redirect.install(["app_elsewhere"], url_of(info.url, "postgres"))  # names and a target, as in a run
        fresh = create_engine(url_of(info.url, "postgres"), poolclass=NullPool)
        pooled = create_engine(url_of(info.url, "postgres"), pool_size=1)
        with pooled.connect():
            pass
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.rounds):
            for on in (True, False):
                _listeners(on)
                times.setdefault(("connect", on), []).extend(_timed(lambda: fresh.connect().close(), args.block))
                times.setdefault(("checkout", on), []).extend(
                    _timed(lambda: pooled.connect().close(), args.block * 10))
                with pooled.connect() as conn:
                    times.setdefault(("statement", on), []).extend(
                        _timed(lambda conn=conn: conn.exec_driver_sql("SELECT 1"), args.block * 10))
        _listeners(True)
        print("median per operation, listeners on / off / difference (non-redirected engine):")
        for what in ("connect", "checkout", "statement"):
            on_ms = statistics.median(times[(what, True)]) * 1000
            off_ms = statistics.median(times[(what, False)]) * 1000
            print(f"  {what:<9} {on_ms:8.3f} ms {off_ms:8.3f} ms {on_ms - off_ms:+8.3f} ms")
        cparams = {"host": "127.0.0.1", "port": 5432, "dbname": "other", "user": "u", "password": "p"}
        dialect = fresh.dialect
        n = 100_000
        per_call = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                redirect._on_connect(dialect, None, [], cparams)
            per_call.append((time.perf_counter() - started) / n)
        print(f"  do_connect listener alone: {statistics.median(per_call) * 1e6:.2f} µs per connect")
        with pooled.connect() as conn:
            per_call = []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(n):
                    redirect._on_execute(conn, None, "SELECT * FROM thing WHERE id = %(id)s", {"id": 1}, None, False)
                per_call.append((time.perf_counter() - started) / n)
        print(f"  before_cursor_execute listener alone: {statistics.median(per_call) * 1e6:.2f} µs per statement")
        fresh.dispose()
        pooled.dispose()
    finally:
        redirect.reset()
        server.release()


if __name__ == "__main__":
    main()
