"""Send connections meant for named databases to this worker's database, through SQLAlchemy's engine events.

Suites written for one shared database hard-code its name (or overwrite ``os.environ`` with it before the
engine is built), and drop and recreate it themselves. Rewriting such an app is what pgshard promises not
to ask for, so the redirection happens below the app, in four documented event hooks registered on the
classes (so engines built before or after, sync or the ``sync_engine`` of an async one, are all covered):

- ``do_connect`` (Engine): a connection whose parameters name a redirected database - or a maintenance
  database (``postgres``, ``template1``) on a server a redirected URL names, as sqlalchemy-utils uses -
  connects with pgshard's host, port, credentials and database instead (on a copy of the parameters;
  the app's own do_connect listeners still run after ours). The final connect parameters are what we
  look at, so neither the URL's spelling nor the driver (psycopg, psycopg2: ``dbname``; asyncpg, pg8000:
  ``database``) can hide the name.
- ``before_cursor_execute`` (Engine, retval): ``CREATE/DROP DATABASE <redirected name>`` becomes an action
  on the current target database through a :class:`DatabaseLifecycle` (pgshard's own, marked databases
  only) and the statement a no-op, or a server-side error saying what PostgreSQL would have said; catalog
  lookups by the redirected name on a redirected connection ask about the target instead, so
  ``database_exists()`` answers truthfully.
- ``checkout``/``checkin`` (Pool): every redirected connection is stamped with the generation of the
  target it was made for; one made for an earlier target is never handed out again (the documented
  DisconnectionError makes the pool reconnect), and idle ones are closed when the target changes.

The text of it (the names, the DDL pattern, the statements it answers with) is redirect_sql.py's. This
module imports only the settings layer and that: the lifecycle (which creates and drops databases through
admin.Admin) is handed in by the run, so the layering stays downward.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from pgshard.redirect_sql import DDL, Names, ask_about_target, identifier, is_glob, raise_sql
from pgshard.settings import passfile_passwords, url_endpoint

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "CHILD_NAMES",
    "MAINTENANCE_DATABASES",
    "DatabaseLifecycle",
    "Names",
    "child_environment",
    "follow",
    "from_environment",
    "handle_ddl",
    "install",
    "is_glob",
    "reset",
    "retarget",
]

MAINTENANCE_DATABASES = frozenset({"postgres", "template1", "template0"})
_GENERATION = "pgshard_redirect_generation"  # ConnectionPoolEntry.info: made for this target generation
_REDIRECTED = "pgshard_redirected"  # ConnectionPoolEntry.info: this connection's parameters were rewritten
_ON = "pgshard_on"  # ConnectionPoolEntry.info: the database a rewritten connection was made to
_ROUTING_KEYS = ("host", "hostaddr", "port", "user", "password", "service", "passfile", "sslmode", "sslcert",
                 "sslkey", "sslrootcert", "sslcrl", "sslpassword", "ssl", "dsn")


class DatabaseLifecycle(Protocol):
    """What the app's CREATE/DROP DATABASE of a redirected name turns into (pgshard's Run implements it)."""

    def create_database(self, name: str) -> bool:
        """Create our database ``name`` afresh; False when it already exists."""

    def drop_database(self, name: str) -> bool:
        """Drop our database ``name``; False when it does not exist."""


@dataclass
class _State:
    names: Names = field(default_factory=Names)
    target: URL | None = None
    generation: int = 0
    servers: set[tuple[str, int]] = field(default_factory=set)  # where redirected URLs pointed
    lifecycle: DatabaseLifecycle | None = None
    followed: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)  # dialects of followed engines
    idle: weakref.WeakSet[ConnectionPoolEntry] = field(default_factory=weakref.WeakSet)
    lock: threading.RLock = field(default_factory=threading.RLock)
    listening: bool = False
    statements: bool = False


_state = _State()


# -- public interface ----------------------------------------------------------------------------------------
def install(names: Iterable[str], target_url: str) -> None:
    """Process-wide, idempotent: every SQLAlchemy Engine (sync, or an AsyncEngine's sync_engine) whose URL
    names a database in ``names`` connects to ``target_url``'s host/port/user/password/database instead."""
    wanted = Names(names)
    with _state.lock:
        _listen(statements=bool(wanted))
        changed = _state.target is not None and _state.target != make_url(target_url)
        _state.names = wanted
        _state.target = make_url(target_url)
        if changed:
            _state.generation += 1
    if changed:
        _release_idle()


def follow(engine: Engine | AsyncEngine) -> None:
    """This engine object (an Engine or an AsyncEngine) connects to the current target whatever its URL
    says: the app's own engine keeps its driver, connect_args and listeners but lands on our database."""
    sync_engine = getattr(engine, "sync_engine", engine)
    if not isinstance(sync_engine, Engine):
        raise TypeError(f"pgshard can only follow a SQLAlchemy Engine or AsyncEngine, got {type(engine).__name__}")
    with _state.lock:
        _listen(statements=_state.statements)
        if sync_engine.dialect in _state.followed:
            return
        _state.followed.add(sync_engine.dialect)  # one dialect object per engine: it is what do_connect sees
        # Its pool may already hold connections made before it was followed (unstamped): on this pool, a
        # connection not made for the current target is never handed out.
        event.listen(sync_engine, "checkout", _followed_checkout(sync_engine.dialect))


@contextlib.contextmanager
def retarget(url: str) -> Iterator[None]:
    """For a block (a db_commit test) every redirected/followed engine connects to ``url``; pooled
    connections made for the previous target are not handed out inside the block nor after it."""
    with _state.lock:
        _listen(statements=_state.statements)
        previous = _state.target
        _state.target = make_url(url)
        _state.generation += 1
    _release_idle()
    try:
        yield
    finally:
        with _state.lock:
            _state.target = previous
            _state.generation += 1
        _release_idle()


CHILD_NAMES = "PGSHARD_BUILD_REDIRECT"  # the names, for a child process that builds the template


def child_environment() -> dict[str, str]:
    """What a child process (the template build) needs to redirect the same names: see from_environment."""
    return {CHILD_NAMES: "\n".join(_state.names)} if _state.names else {}


def from_environment(target_url: str, lifecycle: DatabaseLifecycle) -> None:
    """In that child: redirect the names its parent redirects (if any) to ``target_url``."""
    names = os.environ.get(CHILD_NAMES, "").split()
    if names:
        install(names, target_url)
        handle_ddl(lifecycle)


def handle_ddl(lifecycle: DatabaseLifecycle | None) -> None:
    """Who acts on the app's CREATE/DROP DATABASE of a redirected name (None: refuse them)."""
    _state.lifecycle = lifecycle


def reset() -> None:
    """Forget names, target, followed engines and lifecycle (tests; the listeners stay, and do nothing)."""
    with _state.lock:
        _state.names = Names()
        _state.target = None
        _state.generation += 1
        _state.servers.clear()
        _state.lifecycle = None
        _state.followed = weakref.WeakSet()
    _release_idle()


# -- listeners -----------------------------------------------------------------------------------------------
def _listen(*, statements: bool) -> None:
    if not _state.listening:
        event.listen(Engine, "do_connect", _on_connect)
        event.listen(Pool, "checkout", _on_checkout)
        event.listen(Pool, "checkin", _on_checkin)
        _state.listening = True
    if statements and not _state.statements:  # only when names are redirected: no cost per statement else
        event.listen(Engine, "before_cursor_execute", _on_execute, retval=True)
        _state.statements = True


def _endpoint(params: Mapping[str, Any]) -> tuple[str, int]:
    host = params.get("host") or ""
    if isinstance(host, (list, tuple)):
        host = host[0] if host else ""
    port = params.get("port") or 5432
    if isinstance(port, (list, tuple)):
        port = port[0] if port else 5432
    return str(host), int(port)


def _url_endpoint(url: URL) -> tuple[str, int]:
    host, port = url_endpoint(url)
    return _endpoint({"host": host, "port": port})


def _database_key(dialect: Any, cparams: Mapping[str, Any]) -> str:
    if "database" in cparams or dialect.driver in ("asyncpg", "pg8000"):
        return "database"
    return "dbname"


def _known_servers() -> set[tuple[str, int]]:
    """Servers a redirected URL names: seen on earlier connects, or in an env var (sqlalchemy-utils'
    create_database connects to ``postgres`` there before anything connected to the redirected name)."""
    found = set(_state.servers)
    for value in list(os.environ.values()):
        if "://" not in value or not value.startswith("postgres"):
            continue
        try:
            url = make_url(value)
        except Exception:  # not every env var that looks like a URL is one
            continue
        if url.database in _state.names:
            found.add(_url_endpoint(url))
    return found


def _on_connect(dialect: Any, record: ConnectionPoolEntry | None, cargs: list[Any],
                cparams: dict[str, Any]) -> Any:
    """Connect a redirected or followed connection with rewritten parameters; None: not ours, SQLAlchemy
    connects as usual."""
    target = _state.target
    if record is not None:
        record.info.pop(_GENERATION, None)
        record.info.pop(_REDIRECTED, None)
        record.info.pop(_ON, None)
    if target is None or dialect.name != "postgresql":
        return None
    key = _database_key(dialect, cparams)
    asked = cparams.get(key)
    if dialect in _state.followed or asked in _state.names:
        if asked in _state.names:
            _state.servers.add(_endpoint(cparams))
        database = target.database
        generation: int | None = _state.generation
    elif (asked in MAINTENANCE_DATABASES and _endpoint(cparams) != _url_endpoint(target)
          and _endpoint(cparams) in _known_servers()):
        database, generation = "postgres", None  # the app's maintenance connection: our server's postgres
    else:
        return None
    params = dict(cparams)  # never the dict itself: SQLAlchemy 2.0 hands the same one to every connect
    for name in _ROUTING_KEYS:
        params.pop(name, None)
    params.pop("dbname" if key == "database" else "database", None)
    host, port = url_endpoint(target)
    params[key] = database
    params.update({"host": host} if host else {})
    params.update({"port": port} if port is not None else {})
    if dialect.driver in ("psycopg", "psycopg2", "psycopg_async"):  # libpq: the target's own routing keys too
        params.update({name: str(value) for name, value in target.query.items()
                       if name in _ROUTING_KEYS and name not in ("host", "port") and isinstance(value, str)})
    if target.username is not None:
        params["user"] = target.username
    if target.password is not None:
        params["password"] = str(target.password)
    elif isinstance(passfile := target.query.get("passfile"), str):  # pgshard's URLs name a passfile
        params["passfile"] = passfile
        # and its password itself: an exported PGPASSWORD would win over the passfile (reports are scrubbed)
        for password in passfile_passwords(passfile)[:1]:
            params["password"] = password
    if record is not None:
        record.info[_REDIRECTED] = True
        record.info[_ON] = database
        if generation is not None:
            record.info[_GENERATION] = generation
    return _connect(dialect, record, list(cargs), params)


def _connect(dialect: Any, record: ConnectionPoolEntry | None, cargs: list[Any], params: dict[str, Any]) -> Any:
    """Connect with our copy of the parameters the way SQLAlchemy would: the app's own do_connect
    listeners (registered on its engine, so after ours) still run, on the copy, then the dialect."""
    listeners = list(dialect.dispatch.do_connect)
    ours = next((i for i, fn in enumerate(listeners) if getattr(fn, "__wrapped__", fn) is _on_connect), -1)
    for fn in listeners[ours + 1:]:
        connection = fn(dialect, record, cargs, params)
        if connection is not None:
            return connection
    return dialect.connect(*cargs, **params)


def _on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
    if _GENERATION in record.info:
        with _state.lock:  # threads of the app check connections in and out while a target changes
            _state.idle.discard(record)
    made_for = record.info.get(_GENERATION)
    if made_for is not None and made_for != _state.generation:
        raise exc.DisconnectionError("pgshard: this pooled connection was made for an earlier target database")


def _followed_checkout(dialect: Any) -> Callable[[Any, ConnectionPoolEntry, Any], None]:
    """A checkout listener for one followed engine's pool (only while it is followed: see reset())."""
    followed = weakref.ref(dialect)

    def on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        if (_state.target is not None and record.info.get(_GENERATION) != _state.generation
                and followed() in _state.followed):
            raise exc.DisconnectionError("pgshard: this pooled connection was not made for the current target")

    return on_checkout


def _on_checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    if dbapi_connection is not None and _GENERATION in record.info:
        with _state.lock:
            _state.idle.add(record)


def _closable_now(dbapi_connection: Any) -> bool:
    """Sync drivers close at once; of the async adapters only those with a non-blocking terminate()
    (asyncpg) can be closed outside their event loop. Others are replaced at their next checkout."""
    return not type(dbapi_connection).__module__.startswith("sqlalchemy.") or hasattr(dbapi_connection, "terminate")


def _release_idle() -> None:
    """Close idle pooled connections made for an earlier target, so none lingers on a clone being dropped."""
    with _state.lock:
        stale = [record for record in _state.idle if record.info.get(_GENERATION) != _state.generation]
        _state.idle.difference_update(stale)
    for record in stale:
        if record.dbapi_connection is not None and _closable_now(record.dbapi_connection):
            with contextlib.suppress(Exception):
                record.invalidate()


# -- statements ----------------------------------------------------------------------------------------------
def _ddl(verb: str, name: str, if_exists: bool, on: str | None) -> str:
    """The app's CREATE/DROP DATABASE of redirected ``name``, issued on a connection to database ``on``."""
    target = _state.target
    lifecycle = _state.lifecycle
    if target is None or lifecycle is None or not target.database:
        return raise_sql("55000", f"pgshard: {verb.upper()} DATABASE {name} is redirected by pgshard_redirect, "
                                  "but this process has no database of its own to act on")
    ours = target.database
    if on == ours:
        # Issued on a connection to the very database it stands for (a suite whose "maintenance" URL is the
        # one pgshard_env points at): dropping it would end that connection, and PostgreSQL cannot drop the
        # database a session is on. The worker's clone, fresh from the template, stands in for the database
        # the suite drops and creates: both are done, as far as the suite can tell. Only for a database
        # pgshard made (its ownership comment, checked on the server: this module knows no Admin).
        marked = ("left(coalesce(shobj_description((SELECT oid FROM pg_database WHERE datname = current_database()), "
                  "'pg_database'), ''), 8) = 'pgshard:'")
        return raise_sql("55000", f"pgshard: {ours} (where {name} is redirected) was not created by pgshard: it "
                                  "never acts on it", unless=marked)
    try:
        if verb.lower() == "drop":
            done = lifecycle.drop_database(ours)
            with _state.lock:
                _state.generation += 1  # connections to the dropped database are gone: never hand them out
            _release_idle()
            if not done and not if_exists:
                return raise_sql("3D000", f'database "{name}" does not exist (pgshard: redirected to {ours})')
        elif not lifecycle.create_database(ours):
            return raise_sql("42P04", f'database "{name}" already exists (pgshard: redirected to {ours})')
    except Exception as error:  # one line in the app's own error path, not a traceback from an event
        return raise_sql("55000", f"pgshard: {verb.upper()} DATABASE {name} (redirected to {ours}) failed: "
                                  f"{' '.join(str(error).split())}")
    return "SELECT 1"


def _on_execute(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> tuple[str, Any]:
    names = _state.names
    if not names:
        return statement, parameters
    ddl = DDL.match(statement)
    if ddl is not None:
        name = identifier(ddl["name"])
        if name in names:  # on any connection: a redirected name is never created or dropped anywhere else
            on = conn.info.get(_ON) if conn.info.get(_REDIRECTED) else conn.engine.url.database
            return _ddl(ddl["verb"], name, bool(ddl["if"]), on), parameters
    if "pg_database" in statement and _state.target is not None and conn.info.get(_REDIRECTED):
        statement, parameters = ask_about_target(statement, parameters, names, _state.target.database or "")
    return statement, parameters
