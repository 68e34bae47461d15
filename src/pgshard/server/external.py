"""A server the user already runs, named by --pg-url. We only ever use its 'postgres' maintenance
database for admin work; the database named in the URL is never created, dropped or altered."""

from __future__ import annotations

from pgshard.server.base import ServerInfo, describe, sqlalchemy_url


def external_server(url: str) -> ServerInfo:
    return describe(sqlalchemy_url(url, database="postgres"), "url (--pg-url)")
