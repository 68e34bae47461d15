"""pgshard's benchmarks: a generated 30-table suite run under pgshard, hand-written strategies and peers.

``python -m benchmarks run`` (see benchmarks/README.md). Nothing here is imported by pgshard itself.
"""
