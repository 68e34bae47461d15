"""Hand-written conftests of the contenders that are not pgshard, loaded with ``-p`` (and ``-p no:pgshard``).

Each provides the ``db_session`` fixture the generated tests use (and ``commit_db`` where it fits), on the
server the harness hands over in ``BENCH_PG_URL``. They are what a team writes without pgshard.
"""
