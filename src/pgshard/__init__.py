"""pgshard: real PostgreSQL for pytest, in parallel, with no cross-talk."""

from __future__ import annotations

from pgshard.queries import QueryCounter, assert_max_queries
from pgshard.version import __version__

__all__ = ["QueryCounter", "__version__", "assert_max_queries"]
