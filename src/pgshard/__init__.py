"""pgshard: real PostgreSQL for pytest, in parallel, with no cross-talk."""

from __future__ import annotations

from pgshard.queries import QueryCounter, assert_max_queries

__version__ = "0.1.0"

__all__ = ["QueryCounter", "__version__", "assert_max_queries"]
