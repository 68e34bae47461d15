"""What every server backend shares: one error type, URL helpers, and the readiness wait.

URLs travel through pgshard in SQLAlchemy form (``postgresql+psycopg://...``) because that is what users
put in their settings; libpq and psycopg want the plain form. Every URL that reaches a message goes
through :func:`mask_url` first, so a password never lands in a terminal or a CI log.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from pgshard.host import UnsafeDirectory, ensure_private_dir
from pgshard.settings import mask_url, passfile_passwords, url_endpoint

if TYPE_CHECKING:  # imported where a connection is made: an xdist controller on a warm server makes none
    import psycopg

__all__ = ["ServerError", "ServerInfo", "connect", "describe", "mask_url", "own_conninfo", "sqlalchemy_url",
           "to_libpq", "wait_until_ready", "without_password"]

# libpq fills every connection parameter a conninfo leaves unset from its environment (PGPASSWORD, PGHOST,
# PGOPTIONS, ...): a CI job that exports PGPASSWORD for its psql steps would otherwise log pgshard in with that
# password instead of its passfile's. pgshard's own connections set each one: an empty value counts as set (the
# password one then falls through to the passfile, the host one to the default socket, and so on).
_PINNED = {"host": "", "hostaddr": "", "port": "", "user": "", "dbname": "", "password": "", "options": "",
           "sslmode": "prefer", "target_session_attrs": "any", "application_name": "pgshard"}
_SERVICE_LOCK = threading.Lock()
_LOCAL = ("", "127.0.0.1", "localhost", "::1")


def _pins(url: str) -> dict[str, str]:
    """The pins for ``url``. ``sslmode`` only for a server on this machine (the embedded one, a socket): for
    a remote one an exported ``PGSSLMODE=verify-full`` is a safeguard we must not lower to libpq's default."""
    host = url_endpoint(make_url(url))[0]
    if host in _LOCAL or host.startswith("/"):
        return _PINNED
    return {k: v for k, v in _PINNED.items() if k != "sslmode"}

# Refusals that no amount of waiting fixes: wrong password or role, missing database, pg_hba.conf.
# libpq reports connection-time errors as text only (psycopg leaves ``sqlstate`` unset), so we match the
# server's words; on a server speaking another language we simply keep retrying until the timeout.
_PERMANENT_SQLSTATES = frozenset({"28P01", "28000", "3D000"})
_PERMANENT_PHRASES = ("authentication failed", "does not exist", "no pg_hba.conf entry")

class ServerError(RuntimeError):
    """PostgreSQL could not be started, reached or stopped; one line meant for the user.

    The message is masked on the way in, so a URL pasted into it can never leak its password.
    """

    def __init__(self, message: str) -> None:
        super().__init__(mask_url(" ".join(message.split())))


def _parse_postgres_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError) as exc:
        raise ServerError(
            f"--pg-url (or PGSHARD_URL) is not a database URL: {mask_url(url)!r}; "
            "expected postgresql+psycopg://user:password@host:port/dbname"
        ) from exc
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ServerError(f"--pg-url (or PGSHARD_URL) must point at PostgreSQL, got {mask_url(url)!r}")
    return parsed


def to_libpq(url: str) -> str:
    """Turn a SQLAlchemy URL into a libpq URI: drop the ``+driver``, keep query parameters.

    Built by hand rather than with ``render_as_string``: SQLAlchemy writes a space as ``+`` in query
    values and leaves it raw in user names, and libpq reads neither (``?host=/run/my%20pg`` must survive).
    """
    parsed = _parse_postgres_url(url)
    userinfo = ""
    if parsed.username is not None:
        userinfo = quote(parsed.username, safe="")
        if parsed.password is not None:
            userinfo += ":" + quote(str(parsed.password), safe="")
        userinfo += "@"
    host = parsed.host or ""
    host = f"[{host}]" if ":" in host else quote(host, safe="")
    port = "" if parsed.port is None else f":{parsed.port}"
    database = "" if parsed.database is None else "/" + quote(parsed.database, safe="")
    pairs = [
        f"{quote(key, safe='')}={quote(value, safe='/,:')}"
        for key, values in parsed.query.items()
        for value in ((values,) if isinstance(values, str) else values)
    ]
    query = "?" + "&".join(pairs) if pairs else ""
    return f"postgresql://{userinfo}{host}{port}{database}{query}"


def own_conninfo(url: str) -> str:
    """The libpq conninfo of one of pgshard's own connections to ``url``: what the URL says, and every
    parameter it leaves out set to libpq's default rather than taken from a PG* environment variable."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    given = conninfo_to_dict(to_libpq(url))
    if "service" in given:  # the user's own service file says where and who: empty pins would hide its lines
        return make_conninfo(to_libpq(url))
    return make_conninfo(to_libpq(url), **{k: v for k, v in _pins(url).items() if k not in given})


def own_connect_args(url: str) -> dict[str, str]:
    """``connect_args`` for an engine of pgshard's own on ``url`` (the fixtures' engines, a metadata build):
    the same pins as :func:`own_conninfo` for a libpq driver; for asyncpg, which reads PGPASSWORD before a
    passfile and takes no empty values, the passfile's password itself (reports are scrubbed of it)."""
    parsed = make_url(url)
    if "service" in parsed.query:
        return {}
    if parsed.get_driver_name() == "asyncpg":
        passfile = parsed.query.get("passfile")
        found = passfile_passwords(passfile) if parsed.password is None and isinstance(passfile, str) else []
        return {"password": found[0]} if found else {}
    given = {*parsed.query, *(("password",) if parsed.password is not None else ())}
    return {k: v for k, v in _pins(url).items() if k not in given and k not in ("host", "port", "user", "dbname")}


@contextlib.contextmanager
def _no_service(url: str) -> Iterator[None]:
    """PGSERVICE is the one variable a conninfo cannot override (``service=`` names a service too): while one
    of pgshard's own connections starts, it is hidden, unless the URL names a service itself."""
    if "PGSERVICE" not in os.environ or "service=" in url:
        yield
        return
    with _SERVICE_LOCK:
        value = os.environ.pop("PGSERVICE", None)
        try:
            yield
        finally:
            if value is not None:
                os.environ["PGSERVICE"] = value


def own_engine(url: str, **kwargs: Any) -> Any:
    """An engine of pgshard's own on ``url`` (sync, or async for an async driver): the same pins as
    :func:`own_connection`, PGSERVICE hidden while each connection starts."""
    from sqlalchemy import create_engine, event

    parsed = make_url(url)
    engine: Any
    if parsed.get_dialect().is_async:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(parsed, connect_args=own_connect_args(url), **kwargs)
        sync_engine = engine.sync_engine
    else:
        engine = sync_engine = create_engine(parsed, connect_args=own_connect_args(url), **kwargs)
    if "PGSERVICE" in os.environ:
        @event.listens_for(sync_engine, "do_connect")
        def _connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
            with _no_service(url):
                return dialect.connect(*cargs, **cparams)
    return engine


def own_connection(url: str, *, autocommit: bool = True, timeout: float = 10) -> psycopg.Connection:
    """A psycopg connection of pgshard's own (no PG* variable steers it); psycopg's errors unchanged."""
    import psycopg

    conninfo = own_conninfo(url)
    with _no_service(url):
        return psycopg.connect(conninfo, autocommit=autocommit, connect_timeout=max(1, int(timeout)))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _is_permanent(exc: psycopg.Error, message: str) -> bool:
    if exc.sqlstate in _PERMANENT_SQLSTATES:
        return True
    if "no password supplied" in message:  # libpq's own refusal: no passfile entry, no password in the URL
        return True
    return "FATAL:" in message and any(phrase in message for phrase in _PERMANENT_PHRASES)


def wait_until_ready(url: str, timeout: float) -> None:
    """Block until PostgreSQL at ``url`` answers ``SELECT 1``, or raise :class:`ServerError`.

    A server that is still starting refuses connections or answers "starting up"; both are retried.
    A wrong password or a missing database will not fix itself, so those fail at once.
    """
    import psycopg

    deadline = time.monotonic() + timeout
    delay = 0.02
    last_error = "no connection attempt was made"
    while True:
        try:
            with own_connection(url, timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.Error as exc:
            last_error = _one_line(exc)
            if _is_permanent(exc, last_error):
                raise ServerError(
                    f"PostgreSQL at {mask_url(url)} refused the connection: {last_error}"
                ) from exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServerError(f"PostgreSQL at {mask_url(url)} was not ready after {timeout:g}s: {last_error}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.25)


@dataclass(frozen=True)
class ServerInfo:
    url: str = field(repr=False)  # SQLAlchemy URL (psycopg driver) of the maintenance database 'postgres'
    source: str  # human description: "embedded PostgreSQL 15 (/usr/lib/postgresql/15/bin)", "url", ...
    version: str
    major: int
    fsync: bool
    reflink: bool = False  # its data directory's filesystem clones files by reflink (known for the embedded one)

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    def __repr__(self) -> str:  # tracebacks show reprs: never the password
        return f"ServerInfo({self.masked_url}, {self.source!r}, {self.version})"


@dataclass
class ServerLease:
    info: ServerInfo
    _release: Callable[[], object] = field(repr=False)
    released: bool = False
    notes: list[str] = field(default_factory=list)  # said once to the user (a damaged cache re-created)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release()


def sqlalchemy_url(url: str, database: str | None = None) -> str:
    """Normalise any postgres URL to SQLAlchemy's psycopg 3 form, optionally for another database."""
    parsed = _parse_postgres_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://")
                                 else url)
    parsed = parsed.set(drivername="postgresql+psycopg")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def without_password(url: str, cache_dir: Path) -> str:
    """A user's URL (--pg-url) with its password moved into a passfile (0600, in the cache dir) that the URL
    names instead: every URL pgshard derives from it (the workers', the clones', pgshard_env's) then carries
    no secret for a traceback, --showlocals or a junit XML to print. libpq (psycopg, psycopg2) and asyncpg
    read the ``passfile`` parameter."""
    parsed = _parse_postgres_url(url)
    if parsed.password is None or "passfile" in parsed.query:
        return url
    password = str(parsed.password)
    user = parsed.username or ""
    directory = cache_dir / "passfiles"
    try:
        # as root the embedded server's account must traverse the cache dir later: made as it would make it
        ensure_private_dir(cache_dir, 0o711 if os.geteuid() == 0 else 0o700, "pgshard_cache_dir (PGSHARD_CACHE_DIR)")
        ensure_private_dir(directory, 0o700, "pgshard_cache_dir (PGSHARD_CACHE_DIR)")
    except UnsafeDirectory as exc:
        raise ServerError(str(exc)) from None
    host, port = url_endpoint(parsed)
    service = parsed.query.get("service", "")
    path = directory / hashlib.sha256(f"{host}:{port}:{service}:{user}".encode()).hexdigest()[:16]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".passfile")  # 0600, ours; replaced whole, never half-written
    with os.fdopen(fd, "w") as handle:  # any host/port/database: only URLs naming this file reach for it
        handle.write(f"*:*:*:{_pgpass_escape(user) or '*'}:{_pgpass_escape(password)}\n")
    os.replace(tmp, path)
    # URL.set(password=None) means "unchanged": replace the field itself
    stripped = parsed._replace(password=None).update_query_dict({"passfile": str(path)})
    return stripped.render_as_string(hide_password=False)


def passfile_secrets(url: str) -> list[str]:
    """The passwords in the passfile ``url`` names (to mask wherever a driver may have copied them)."""
    passfile = make_url(url).query.get("passfile")
    return passfile_passwords(passfile) if isinstance(passfile, str) else []


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def connect(url: str, *, autocommit: bool = True, timeout: float = 10) -> psycopg.Connection:
    """A psycopg connection for admin work; failures become one masked ServerError line."""
    import psycopg

    try:
        return own_connection(url, autocommit=autocommit, timeout=timeout)
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if "password authentication failed" in reason:
            forget_facts(url)
        from pgshard.faults import environment

        steered = environment(exc, os.environ, own=True)  # PGSSLMODE, kept for a remote server: named
        raise ServerError(steered.removeprefix("pgshard: ") if steered else
                          f"cannot connect to PostgreSQL at {url}: {reason}") from None
    except psycopg.ProgrammingError as exc:  # a parameter libpq does not know
        raise ServerError(f"cannot connect to PostgreSQL at {url}: {exc}") from None


FACTS_FILE = "facts.json"  # the embedded server's version and fsync, beside its passfile


def forget_facts(url: str) -> None:
    """The passfile no longer opens the server (its password was changed in place): the embedded server's
    cached facts must not spare the next run the connection that finds this out and repairs it."""
    passfile = make_url(url).query.get("passfile")
    if isinstance(passfile, str):
        (Path(passfile).parent / FACTS_FILE).unlink(missing_ok=True)


REFLINK_FROM_MAJOR = 18  # file_copy_method = clone: CREATE DATABASE ... STRATEGY FILE_COPY by reflink
_FICLONE = 0x40049409  # Linux's ioctl: make the destination file share the source's blocks (XFS, btrfs)


def supports_reflink(directory: Path) -> bool:
    """Whether files in ``directory`` can be cloned by reflink (what PostgreSQL 18's file_copy_method = clone
    asks of the filesystem): tried on two scratch files of its own; False where it cannot tell."""
    import fcntl

    if not sys.platform.startswith("linux"):
        return False
    try:
        with tempfile.TemporaryFile(dir=directory) as source, tempfile.TemporaryFile(dir=directory) as target:
            source.write(b"pgshard" * 1024)
            source.flush()
            fcntl.ioctl(target.fileno(), _FICLONE, source.fileno())
    except OSError:
        return False
    return True


def describe(url: str, source: str) -> ServerInfo:
    """Ask the server its version and whether fsync is on (which picks the clone strategy)."""
    with connect(url) as conn:
        row = conn.execute("SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
                           " current_setting('fsync')").fetchone()
    assert row is not None
    return ServerInfo(url=url, source=source, version=str(row[0]).split()[0], major=int(row[1]) // 10000,
                      fsync=row[2] == "on")
