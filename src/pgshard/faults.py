"""Errors that are not pgshard's own but that every test of a run would hit the same way: a role without
CREATEDB, a full disk, a server that died, no free connection slot.

Shown raw, each one is a traceback per test (thousands of lines for one cause). ``classify`` recognises
them from the exception chain (SQLSTATE when the driver has one, else the server's words: libpq reports
connection-time refusals as text only) so the plugin can print one line saying what to do, and stop.
Pure logic: no connection, no pytest; ``Run.explain`` adds the server's facts to the line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from pgshard.settings import mask_url

# kind -> (SQLSTATEs, lower-case phrases of the server or libpq)
_RULES: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("privilege", frozenset({"42501"}), ("permission denied to create database",)),
    ("disk", frozenset({"53100"}), ("no space left on device", "could not extend file", "check free disk space")),
    ("connections", frozenset({"53300"}), ("too many clients already", "remaining connection slots are reserved",
                                          "too many connections for role")),
    ("corrupt", frozenset({"XX001", "XX002"}), ("invalid page in block", "could not read block",
                                                 "index contains unexpected zero page")),
    ("died", frozenset({"57P01", "57P02", "57P03"}), (
        "connection refused", "server closed the connection unexpectedly", "the database system is shutting down",
        "the database system is in recovery mode", "the database system is not yet accepting connections",
        "the database system is starting up", "terminating connection due to", "is the server running",
        "no such file or directory\n\tis the server", "consuming input failed", "the connection is closed",
        "connection was closed in the middle of operation")),
)
# Exceptions from these packages speak for the database; another library's "connection refused" does not.
_DATABASE_MODULES = ("psycopg", "psycopg2", "asyncpg", "sqlalchemy", "pgshard")
_WRAPPER = re.compile(r"^\([\w.]+\) ")


# libpq's variables that reach the app's own connections (pgshard's ignore them: server/base.py own_conninfo),
# each with the SQLSTATEs and words of the refusal it causes there
_ENVIRONMENT: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("PGPASSWORD", frozenset({"28P01"}), ("password authentication failed",)),
    ("PGOPTIONS", frozenset({"25006"}), ("read-only transaction", "unrecognized configuration parameter",
                                         "invalid value for parameter", "invalid command-line argument")),
    ("PGSSLMODE", frozenset(), ("server does not support ssl", "ssl negotiation", "ssl connection", "sslmode")),
    ("PGTARGETSESSIONATTRS", frozenset(), ("session is read-only", "hot standby mode", "session is not read-only",
                                           "target_session_attrs")),
    ("PGSERVICE", frozenset(), ("definition of service",)),
    ("PGSSLROOTCERT", frozenset(), ("root certificate",)),
)


_UNPINNED = frozenset({"PGSSLMODE", "PGSSLROOTCERT"})  # what pgshard's own connections to a remote server keep


@dataclass(frozen=True)
class Fault:
    kind: str  # privilege, disk, connections, corrupt, died
    detail: str  # the database's own words, one line, masked


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's error
        todo += [orig if isinstance(orig, BaseException) else None, current.__cause__, current.__context__]


def _speaks_for_database(exc: BaseException) -> bool:
    module = type(exc).__module__.split(".")[0]
    return module in _DATABASE_MODULES or isinstance(exc, ConnectionRefusedError)


def _detail(exc: BaseException, phrase: str | None) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if phrase is not None:
        lines = [line for line in lines if phrase in line.lower()] or lines
    text = lines[0] if lines else type(exc).__name__
    text = mask_url(" ".join(_WRAPPER.sub("", text).split()))  # SQLAlchemy's "(psycopg.OperationalError) "
    return text if len(text) <= 200 else text[:200] + " ..."


# What only a crash and restart of the server says (a test's own pg_terminate_backend says 57P01 instead):
# a server that answers again after one of these still lost this run's sessions.
_CRASH_STATES = frozenset({"57P02", "57P03"})
_CRASH_PHRASES = ("crash of another server process", "in recovery mode", "not yet accepting connections",
                  "is starting up")


def crashed(exc: BaseException) -> bool:
    """Whether ``exc`` (anywhere in its chain) is the server's word for a crash and restart."""
    for current in _chain(exc):
        if not _speaks_for_database(current):
            continue
        sqlstate = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        text = str(current).lower()
        if sqlstate in _CRASH_STATES or any(phrase in text for phrase in _CRASH_PHRASES):
            return True
    return False


def classify(exc: BaseException) -> Fault | None:
    """The foreign fault behind ``exc`` (anywhere in its chain), or None for an ordinary error."""
    for current in _chain(exc):
        if not _speaks_for_database(current) or isinstance(getattr(current, "orig", None), BaseException):
            continue  # a SQLAlchemy wrapper: its driver error (next in the chain) is judged instead
        sqlstate = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        text = str(current).lower()
        for kind, states, phrases in _RULES:
            if sqlstate in states:
                return Fault(kind, _detail(current, None))
            for phrase in phrases:
                if phrase in text:
                    return Fault(kind, _detail(current, phrase.split("\n")[0]))
    return None


def environment(exc: BaseException, environ: Mapping[str, str], *, own: bool = False) -> str | None:
    """One line when ``exc`` is the refusal an exported libpq variable causes on the app's connections
    (pgshard's own connections ignore them, the app's driver does not), or (``own``) on pgshard's own to a
    remote server (PGSSLMODE, which they keep there); None otherwise."""
    for current in _chain(exc):
        if not _speaks_for_database(current):
            continue
        sqlstate = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        text = str(current).lower()
        for name, states, phrases in _ENVIRONMENT:
            if own and name not in _UNPINNED:
                continue  # pgshard's own connections set it: it cannot be the cause there
            if name in environ and (sqlstate in states or any(phrase in text for phrase in phrases)):
                shown = "" if name == "PGPASSWORD" else f"={environ[name]}"
                if own:
                    return (f"pgshard: {name}{shown} is exported, and libpq applies it to pgshard's connections to "
                            f"this remote server ({_detail(current, None)}): set sslmode in --pg-url, or unset "
                            f"{name} for the test run (env -u {name} pytest ...)")
                return (f"pgshard: {name}{shown} is exported, and libpq applies it to the app's connections "
                        f"({_detail(current, None)}); unset it for the test run (env -u {name} pytest ...): "
                        "pgshard's own connections ignore it")
    return None


def advice(fault: Fault, *, user: str, server: str, cache_dir: str | None, log: str | None,
           template: str | None = None) -> str:
    """The one line for a fault: its cause in the database's words, and what to do."""
    if fault.kind == "corrupt":
        source = f"the template {template}, which every clone copies," if template else "the template"
        also = " (`pgshard clean --server` re-creates the whole embedded server)" if cache_dir else ""
        return (f"pgshard: the database has a damaged page ({fault.detail}): {source} is damaged on disk; "
                f"rebuild it with `pytest --pg-rebuild`{also}")
    if fault.kind == "privilege":
        return (f"pgshard: the role {user} may not create databases on {server} ({fault.detail}): the role needs "
                f"CREATEDB (ALTER ROLE {user} CREATEDB), or give --pg-url a role that has it")
    if fault.kind == "disk":
        where = (f"free space in the cache dir {cache_dir} or set pgshard_cache_dir (PGSHARD_CACHE_DIR)"
                 if cache_dir else f"free space on the disk of the server at {server}")
        return f"pgshard: the server's disk is full ({fault.detail}): {where}"
    if fault.kind == "connections":
        return (f"pgshard: PostgreSQL at {server} has no free connection slot ({fault.detail}): lower -n or raise "
                "max_connections on the server")
    where = f"see its log at {log}" if log else f"check the server at {server}"
    return f"pgshard: the server died mid-run ({fault.detail}); {where}"
