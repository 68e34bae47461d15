"""What every server source hands on: where the server is and what it is."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from sqlalchemy.engine import make_url

from pgshard.settings import mask_url


class ServerError(RuntimeError):
    """The server could not be found, started or reached; one line, password masked."""

    def __init__(self, message: str) -> None:
        super().__init__(mask_url(message))


@dataclass(frozen=True)
class ServerInfo:
    url: str  # SQLAlchemy URL (psycopg driver) of the maintenance database 'postgres'
    source: str  # human description: "embedded PostgreSQL 15 (/usr/lib/postgresql/15/bin)", "url", ...
    version: str
    major: int
    fsync: bool

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)


def sqlalchemy_url(url: str, database: str | None = None) -> str:
    """Normalise any postgres URL to SQLAlchemy's psycopg 3 form, optionally for another database."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if parsed.get_backend_name() != "postgresql":
        raise ServerError(f"not a PostgreSQL URL: {url}; check --pg-url (PGSHARD_URL)")
    parsed = parsed.set(drivername="postgresql+psycopg")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def to_libpq(url: str) -> str:
    """SQLAlchemy URL -> libpq URL (drops '+driver', keeps query parameters such as host=/socket/dir)."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def connect(url: str, *, autocommit: bool = True, timeout: float = 10) -> psycopg.Connection:
    """A psycopg connection for admin work; failures become one masked ServerError line."""
    try:
        return psycopg.connect(to_libpq(url), autocommit=autocommit, connect_timeout=max(1, int(timeout)))
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ServerError(f"cannot connect to PostgreSQL at {url}: {reason}") from None


def describe(url: str, source: str) -> ServerInfo:
    """Ask the server its version and whether fsync is on (which picks the clone strategy)."""
    with connect(url) as conn:
        row = conn.execute("SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
                           " current_setting('fsync')").fetchone()
    assert row is not None
    return ServerInfo(url=url, source=source, version=str(row[0]).split()[0], major=int(row[1]) // 10000,
                      fsync=row[2] == "on")
