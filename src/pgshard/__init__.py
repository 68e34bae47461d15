"""pgshard: real PostgreSQL for pytest, in parallel, with no cross-talk."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pgshard.version import __version__

if TYPE_CHECKING:
    from pgshard.queries import QueryCounter, assert_max_queries

__all__ = ["QueryCounter", "__version__", "assert_max_queries"]


def __getattr__(name: str) -> Any:
    """Lazy: the server watchdog imports pgshard.host and must not pay for SQLAlchemy (130 ms)."""
    if name in ("QueryCounter", "assert_max_queries"):
        from pgshard import queries

        return getattr(queries, name)
    raise AttributeError(f"module 'pgshard' has no attribute {name!r}")
