"""Counting the SQL a test runs, to catch N+1 queries against the real planner and driver.

The counter listens on every SQLAlchemy Engine in the process (the app's own engine included) while it
is active, and leaves out pgshard's savepoint bookkeeping, which the app did not ask for.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

_BOOKKEEPING = re.compile(r"^\s*(SAVEPOINT|RELEASE SAVEPOINT|ROLLBACK TO SAVEPOINT)\b", re.I)


class QueryCounter:
    def __init__(self) -> None:
        self.statements: list[str] = []
        self._lock = threading.Lock()
        self._listening = False

    @property
    def count(self) -> int:
        return len(self.statements)

    def reset(self) -> None:
        with self._lock:
            self.statements.clear()

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not _BOOKKEEPING.match(statement):
            with self._lock:
                self.statements.append(statement)

    def start(self) -> None:
        if not self._listening:
            event.listen(Engine, "before_cursor_execute", self._record)
            self._listening = True

    def stop(self) -> None:
        if self._listening:
            event.remove(Engine, "before_cursor_execute", self._record)
            self._listening = False

    def __enter__(self) -> QueryCounter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def assert_max(self, limit: int) -> Iterator[QueryCounter]:
        """Fail when the block runs more than ``limit`` statements, listing what it ran."""
        before = self.count
        was_listening = self._listening
        self.start()
        try:
            yield self
        finally:
            if not was_listening:
                self.stop()
        ran = self.statements[before:]
        if len(ran) > limit:
            listing = "\n".join(f"  {i}. {' '.join(s.split())[:300]}" for i, s in enumerate(ran, 1))
            raise AssertionError(f"expected at most {limit} queries, {len(ran)} ran:\n{listing}")


@contextlib.contextmanager
def assert_max_queries(limit: int) -> Iterator[QueryCounter]:
    """``with assert_max_queries(2): ...`` anywhere, with or without the ``query_counter`` fixture."""
    with QueryCounter().assert_max(limit) as counter:
        yield counter
