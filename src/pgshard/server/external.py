"""A server the user already runs, named by --pg-url. We only ever use its 'postgres' maintenance
database for admin work; the database named in the URL is never created, dropped or altered."""

from __future__ import annotations

from pgshard.server.base import ServerError, ServerInfo, describe, sqlalchemy_url


def external_server(url: str) -> ServerInfo:
    try:
        return describe(sqlalchemy_url(url, database="postgres"), "url (--pg-url)")
    except ServerError as exc:
        raise ServerError(f"{exc}; check --pg-url (or PGSHARD_URL)") from None
