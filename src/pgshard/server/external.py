"""A server the user already runs, named by --pg-url. We only ever use its 'postgres' maintenance
database for admin work; the database named in the URL is never created, dropped or altered. Its password
moves into a passfile at once (see ``without_password``), so no URL pgshard hands around can leak it."""

from __future__ import annotations

from pathlib import Path

from pgshard.server.base import (
    ServerError,
    ServerInfo,
    describe,
    mask_url,
    sqlalchemy_url,
    to_libpq,
    without_password,
)


def external_server(url: str, cache_dir: Path) -> ServerInfo:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(to_libpq(url))
    except psycopg.ProgrammingError as exc:  # ?pgbouncer=true, a typo: libpq takes its own parameters only
        raise ServerError(f"--pg-url (or PGSHARD_URL) {mask_url(url)}: {str(exc).strip()}; remove it from the URL "
                          "(libpq's "
                          "connection parameters: https://www.postgresql.org/docs/current/libpq-connect.html"
                          "#LIBPQ-PARAMKEYWORDS)") from None
    try:
        return describe(sqlalchemy_url(without_password(url, cache_dir), database="postgres"), "url (--pg-url)")
    except ServerError as exc:
        raise ServerError(f"{exc}; check --pg-url (or PGSHARD_URL)") from None
