"""A server the user already runs, named by --pg-url. We only ever use its 'postgres' maintenance
database for admin work; the database named in the URL is never created, dropped or altered. Its password
moves into a passfile at once (see ``without_password``), so no URL pgshard hands around can leak it."""

from __future__ import annotations

from pathlib import Path

from pgshard.server.base import ServerError, ServerInfo, describe, sqlalchemy_url, without_password


def external_server(url: str, cache_dir: Path) -> ServerInfo:
    try:
        return describe(sqlalchemy_url(without_password(url, cache_dir), database="postgres"), "url (--pg-url)")
    except ServerError as exc:
        raise ServerError(f"{exc}; check --pg-url (or PGSHARD_URL)") from None
