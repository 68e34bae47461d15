"""Every contender the harness can run: which conftest (or pgshard), on which tests, with which options.

Selections: ``full`` is the whole generated suite, ``subset`` its first ``--subset`` tests (for the
strategies that cost ~0.1-1 s per test), ``one`` its first test (start-up cost), ``commit`` the db_commit
suite. Per-test overhead is always measured against ``bare`` on the same selection. The ``bare`` runs
under ``-n 2`` share one database, which the tests allow (each writes values of its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GROUPS = ("strategies", "peers", "scaling", "startup", "realistic")
CONFTESTS = "benchmarks.conftests."


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    groups: tuple[str, ...]
    selection: str  # full, subset, one, four, commit, all (the real-shaped project's whole suite)
    conftest: str | None = None  # module under benchmarks/conftests; None: pgshard, configured by the ini
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # shared (--pg-url), warm (own embedded, cached, stopped), cold (own embedded, fresh dir), running (own
    # embedded kept up between runs, as `pgshard server start` does), linger (own embedded, up for
    # pgshard_linger seconds after each run: the default local loop)
    server: str = "shared"
    warmup: bool = False  # run once, untimed, before round 1 (bytecode, templates)
    peer: str | None = None  # the PyPI distribution it benchmarks: runs in the peers venv (benchmarks/peers.py)
    options: tuple[str, ...] = ()  # how that peer is configured (extra pytest arguments; not a variant)
    real: bool = False  # runs on the real-shaped project (benchmarks/realistic.py), not the generated one
    before: bool = False  # runs the pgshard sources given with --before-src (a before/after comparison)

    @property
    def is_pgshard(self) -> bool:
        return self.conftest is None

    @property
    def baseline(self) -> str | None:
        """The bare run on the same tests, which this contender's overhead is measured against."""
        if self.conftest == "bare" or self.selection in ("commit", "all") or self.args or self.env:
            return None
        return {"full": "bare", "subset": "bare_subset", "one": "bare_one", "four": "bare_four_n2"}[self.selection]


WORK = {"BENCH_WORK_MS": "10"}
SQLA = ("-o", "sqla_schema=none")  # the harness migrates its database, as a CI step would
# With pytest-asyncio installed it switches to async fixtures that strict mode refuses in a sync suite: a sync
# project has no pytest-asyncio, so its runs leave that plugin out.
SA_ALEMBIC = ("-o", 'sqlalchemy_alembic_configs={"session_maker": "benchapp.db:SessionLocal"}', "-p", "no:asyncio")

# The peers users pick today, on the same tests (see benchmarks/peers.py and the conftests for their set-up).
PEERS: tuple[Contender, ...] = (
    Contender("pytest_postgresql", "pytest-postgresql (clone per test)", ("peers",), "full",
              "pytest_postgresql_peer", peer="pytest-postgresql"),
    Contender("sqla", "pytest-sqla (rollback per test)", ("peers",), "full", "sqla_peer", peer="pytest-sqla",
              options=SQLA),
    Contender("sa_alembic", "pytest-sqlalchemy-alembic, no isolation (as documented)", ("peers",), "full",
              "sqlalchemy_alembic_peer", peer="pytest-sqlalchemy-alembic", options=(*SA_ALEMBIC, "--createdb")),
    Contender("sa_alembic_recipe", "pytest-sqlalchemy-alembic + rollback recipe by hand", ("peers",), "full",
              "sqlalchemy_alembic_recipe", peer="pytest-sqlalchemy-alembic", options=SA_ALEMBIC, warmup=True),
    Contender("pglite", "py-pglite (its TRUNCATE + re-seed per test)", ("peers",), "full", "pglite_peer",
              peer="py-pglite"),
)

ALL: tuple[Contender, ...] = (
    Contender("bare", "bare connection, no isolation", GROUPS[:3], "full", "bare", warmup=True),
    Contender("pgshard", "pgshard savepoint (db_session)", GROUPS[:3], "full", warmup=True),
    Contender("per_worker", "hand-written conftest (per-worker db + rollback recipe)", GROUPS[:3], "full",
              "per_worker", warmup=True),
    Contender("pgshard_before", "pgshard savepoint, --before-src", GROUPS[:3], "full", warmup=True, before=True),
    Contender("truncate", "TRUNCATE 30 tables + re-seed", ("strategies",), "subset", "truncate"),
    PEERS[0],
    *PEERS[1:],
    Contender("bare_subset", "bare connection, no isolation", ("strategies", "peers"), "subset", "bare"),
    Contender("drop_create", "drop_all + create_all + seed", ("strategies",), "subset", "drop_create"),
    Contender("clone", "CREATE DATABASE TEMPLATE per test", ("strategies",), "subset", "clone_per_test"),
    Contender("blog_recipe", "blog post recipe (alembic subprocess)", ("strategies", "peers"), "subset",
              "blog_recipe"),
    Contender("pgshard_n2", "pgshard -n 2", ("scaling", "peers"), "full", args=("-n", "2")),
    Contender("pgshard_nauto", "pgshard -n auto", ("scaling",), "full", args=("-n", "auto")),
    Contender("bare_n2", "bare connection, -n 2 (xdist alone)", ("scaling", "peers"), "full", "bare",
              args=("-n", "2")),
    Contender("per_worker_n2", "hand-written conftest, -n 2", ("scaling", "peers"), "full", "per_worker",
              args=("-n", "2")),
    Contender("pgshard_n2_embedded", "pgshard -n 2, embedded server (lingering)", ("scaling", "peers"), "full",
              args=("-n", "2"), server="linger", warmup=True, env={"PGSHARD_LINGER": "600"}),
    *[Contender(f"{c.name}_n2", f"{c.label}, -n 2", ("peers",), "full", c.conftest, args=("-n", "2"), peer=c.peer,
                options=c.options, warmup=c.warmup) for c in PEERS],
    Contender("work_serial", "pgshard serial, 10 ms work/test", ("scaling",), "full", env=WORK),
    Contender("work_n2", "pgshard -n 2, 10 ms work/test", ("scaling",), "full", args=("-n", "2"), env=WORK),
    Contender("work_bare_serial", "bare serial, 10 ms work/test", ("scaling",), "full", "bare", env=WORK),
    Contender("work_bare_n2", "bare -n 2, 10 ms work/test (xdist alone)", ("scaling",), "full", "bare",
              args=("-n", "2"), env=WORK),
    Contender("commit_pool", "pgshard db_commit (pre-warmed pool)", ("scaling",), "commit", warmup=True),
    Contender("commit_naive", "naive clone per db_commit test", ("scaling",), "commit", "clone_per_test"),
    Contender("bare_one", "bare connection, 1 test", ("scaling", "startup"), "one", "bare"),
    Contender("bare_four_n2", "bare connection, -n 2, 4 tests", ("scaling", "startup"), "four", "bare",
              args=("-n", "2")),
    Contender("start_n2_server", "-n 2: embedded kept up, 4 tests", ("scaling", "startup"), "four",
              args=("-n", "2"), server="running"),
    Contender("start_warm_server_before", "warm: embedded kept up, --before-src", ("startup",), "one",
              server="running", before=True),
    Contender("start_n2_server_before", "-n 2: embedded kept up, 4 tests, --before-src", ("startup",), "four",
              args=("-n", "2"), server="running", before=True),
    Contender("start_warm_url", "warm: server running, template cached", ("scaling",), "one"),
    Contender("start_warm_server", "warm: embedded kept up (`pgshard server start`)", ("scaling", "startup"), "one",
              server="running", warmup=True),
    Contender("start_warm_embedded", "warm: embedded server stopped, cache kept", ("scaling",), "one",
              server="warm", warmup=True, env={"PGSHARD_LINGER": "0"}),
    Contender("start_warm_linger", "warm: embedded lingering (pgshard_linger)", ("scaling", "startup"), "one",
              server="linger", warmup=True, env={"PGSHARD_LINGER": "600"}),
    Contender("start_n2_linger", "-n 2: embedded lingering, 4 tests", ("scaling", "startup"), "four",
              args=("-n", "2"), server="linger", env={"PGSHARD_LINGER": "600"}),
    Contender("start_cold_rebuild", "cold: --pg-rebuild (template built)", ("scaling",), "one",
              args=("--pg-rebuild",)),
    Contender("start_cold_fresh", "cold: fresh cache dir (initdb + build)", ("scaling",), "one", server="cold"),
    Contender("start_cold_fresh_before", "cold: fresh cache dir, --before-src", ("startup",), "one", server="cold",
              before=True),
    Contender("start_n2_cold", "-n 2: fresh cache dir (initdb + build), 4 tests", ("startup",), "four",
              args=("-n", "2"), server="cold"),
    Contender("start_n2_cold_before", "-n 2: fresh cache dir, 4 tests, --before-src", ("startup",), "four",
              args=("-n", "2"), server="cold", before=True),
    Contender("real_own", "real-shaped project: its own serial run (one plain database)", ("realistic",), "all",
              "own", real=True),
    Contender("real_pgshard", "real-shaped project: pgshard serial (ini lines only)", ("realistic",), "all",
              real=True, warmup=True),
    Contender("real_pgshard_n2", "real-shaped project: pgshard -n 2", ("realistic",), "all", args=("-n", "2"),
              real=True),
    *[Contender(f"{c.name}_one", f"{c.label}, 1 test", ("peers",), "one", c.conftest, peer=c.peer,
                options=c.options, warmup=c.warmup) for c in PEERS],
)
BY_NAME = {c.name: c for c in ALL}


def select(only: str | None) -> list[Contender]:
    """Contenders of the named groups and/or contender names (comma separated), plus their baselines."""
    if not only:
        return list(ALL)
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    unknown = wanted - set(GROUPS) - set(BY_NAME)
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(sorted(unknown))}; "
                         f"groups: {', '.join(GROUPS)}; contenders: {', '.join(BY_NAME)}")
    chosen = {c.name for c in ALL if c.name in wanted or wanted & set(c.groups)}
    chosen |= {c.baseline for c in ALL if c.name in chosen and c.baseline}
    return [c for c in ALL if c.name in chosen]
