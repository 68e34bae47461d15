"""Per-test isolation: one connection, an outer transaction, and sessions that only ever see savepoints.

The application's own ``commit()`` releases a savepoint, its ``rollback()`` rolls one back, and at the
end of the test the outer transaction is rolled back: nothing the test wrote survives it. What differs
from production: sequences still advance (they are not transactional), ``now()`` is the same for the
whole test (it is the transaction's start time), and deferred constraints are checked at the outer
commit that never comes, so they do not fire: use ``@pytest.mark.db_commit`` for those.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

NOT_IN_TRANSACTION = "25001"  # active_sql_transaction: "... cannot run inside a transaction block"


class SandboxError(RuntimeError):
    """Misuse of the per-test sandbox, with what to do instead."""


def _explain_transaction_only(context: Any) -> BaseException | None:
    original = context.original_exception
    if getattr(original, "sqlstate", None) == NOT_IN_TRANSACTION:
        statement = " ".join((context.statement or "").split())[:80]
        return SandboxError(
            f"'{statement}' cannot run inside a transaction, and db_session wraps every test in one: "
            "mark the test @pytest.mark.db_commit to run it on a fresh database with real commits")
    return None


def _explain_errors_on(engine: Engine) -> None:
    if not event.contains(engine, "handle_error", _explain_transaction_only):
        event.listen(engine, "handle_error", _explain_transaction_only)


@dataclass
class Sandbox:
    """The test's connection inside an outer transaction that is rolled back at the end."""

    connection: Connection

    def session(self, **kw: Any) -> Session:
        return Session(bind=self.connection, join_transaction_mode="create_savepoint", **kw)


@contextlib.contextmanager
def sandbox(engine: Engine) -> Iterator[Sandbox]:
    _explain_errors_on(engine)
    connection = engine.connect()
    transaction = connection.begin()
    try:
        yield Sandbox(connection)
    finally:
        if transaction.is_active:
            transaction.rollback()
        connection.close()


@contextlib.contextmanager
def rebind(maker: Any, **kw: Any) -> Iterator[None]:
    """Point an application's sessionmaker (sync or async) elsewhere for a block, then restore it."""
    if not isinstance(getattr(maker, "kw", None), dict):
        raise SandboxError(f"pgshard_sessionmaker must name a sessionmaker, got {type(maker).__name__}")
    saved = dict(maker.kw)
    maker.configure(**kw)
    try:
        yield
    finally:
        maker.kw.clear()
        maker.kw.update(saved)


def is_async_maker(maker: Any) -> bool:
    module = sys.modules.get("sqlalchemy.ext.asyncio")  # not imported: the app has no async maker
    return module is not None and isinstance(maker, module.async_sessionmaker)


def is_sync_maker(maker: Any) -> bool:
    return isinstance(maker, sessionmaker)


_CONNECTING_METHODS = ("execute", "scalar", "scalars", "get", "get_one", "stream", "stream_scalars", "delete",
                       "merge", "flush", "commit", "rollback", "refresh", "run_sync", "connection")


def async_sandbox_session(url: str) -> Any:
    """An AsyncSession in savepoint mode whose connection opens on first use, in whatever event loop the
    test runs (pytest-asyncio strict or auto, anyio): asyncpg and psycopg connections belong to one loop,
    and a plain fixture cannot know the test's loop in advance. ``discard()`` ends it without a loop:
    closing the socket makes the server roll the outer transaction back."""
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine
    from sqlalchemy.pool import NullPool

    class SandboxAsyncSession(AsyncSession):
        _sandbox: AsyncConnection | None = None
        _loop: asyncio.AbstractEventLoop | None = None

        async def _open_sandbox(self) -> None:
            if self._sandbox is None:
                self._loop = asyncio.get_running_loop()
                engine = create_async_engine(url, poolclass=NullPool)
                _explain_errors_on(engine.sync_engine)
                connection = await engine.connect()
                await connection.begin()
                self._sandbox = connection
                self.bind = connection
                self.sync_session.bind = connection.sync_connection
                self.sync_session.join_transaction_mode = "create_savepoint"

        async def _close_sandbox(self, connection: AsyncConnection) -> None:
            await AsyncSession.close(self)
            await connection.rollback()
            await connection.close()
            await connection.engine.dispose()

        def discard(self) -> None:
            """Roll back and close in the test's loop when it is still open; else end the connection
            at the driver level (the server rolls back what a vanished client left open)."""
            connection, self._sandbox = self._sandbox, None
            if connection is None:
                return
            loop = self._loop
            if loop is not None and not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(self._close_sandbox(connection))
                return
            fairy = connection.sync_connection.connection  # type: ignore[union-attr]
            driver: Any = fairy.driver_connection
            fairy.detach()  # no pool to return it to: we end it ourselves
            if hasattr(driver, "terminate"):  # asyncpg
                with contextlib.suppress(RuntimeError):
                    driver.terminate()
            else:  # psycopg AsyncConnection: close the libpq connection, no await needed
                driver.pgconn.finish()

    def _connecting(name: str) -> Any:
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            await self._open_sandbox()
            return await getattr(AsyncSession, name)(self, *args, **kwargs)

        method.__name__ = name
        return method

    for name in _CONNECTING_METHODS:
        setattr(SandboxAsyncSession, name, _connecting(name))
    return SandboxAsyncSession(expire_on_commit=False)


__all__ = ["Sandbox", "SandboxError", "async_sandbox_session", "rebind", "sandbox"]
