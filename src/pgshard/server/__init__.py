"""Where PostgreSQL comes from: an existing server (URL), the embedded one, or docker compose.

``acquire(settings)`` is the one entry point: it returns a lease whose ``info`` describes the server
and whose ``release()`` gives it back (stopping what pgshard started once nobody uses it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgshard.server.base import ServerError, ServerInfo, ServerLease
from pgshard.settings import Settings

if TYPE_CHECKING:
    from pgshard.server.embedded import EmbeddedServer

__all__ = ["ServerError", "ServerInfo", "ServerLease", "acquire", "embedded_lease"]


def acquire(settings: Settings) -> ServerLease:
    if settings.server == "url":
        from pgshard.host import default_cache_dir
        from pgshard.server.external import external_server

        assert settings.url is not None
        return ServerLease(external_server(settings.url, settings.cache_dir or default_cache_dir()), lambda: None)
    if settings.server == "docker":
        from pgshard.server.docker import docker_server

        return docker_server(settings)
    from pgshard.server.embedded import EmbeddedServer

    return embedded_lease(EmbeddedServer.for_settings(settings))


def embedded_lease(embedded: EmbeddedServer) -> ServerLease:
    """The lease of an embedded server already made (run.py plans its port before it starts it)."""
    return ServerLease(embedded.acquire(), embedded.release, notes=embedded.notes)
