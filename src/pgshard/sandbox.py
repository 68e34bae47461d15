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


@contextlib.contextmanager
def rebind_class(maker: Any, class_: Any) -> Iterator[None]:
    """Make an (async) sessionmaker produce ``class_`` for a block, then restore it."""
    saved = maker.class_
    maker.class_ = class_
    try:
        yield
    finally:
        maker.class_ = saved


def is_async_maker(maker: Any) -> bool:
    module = sys.modules.get("sqlalchemy.ext.asyncio")  # not imported: the app has no async maker
    return module is not None and isinstance(maker, module.async_sessionmaker)


def is_sync_maker(maker: Any) -> bool:
    return isinstance(maker, sessionmaker)


_CONNECTING_METHODS = ("execute", "scalar", "scalars", "get", "get_one", "stream", "stream_scalars", "delete",
                       "merge", "flush", "commit", "rollback", "refresh", "run_sync", "connection")


class AsyncSandbox:
    """The async twin of ``sandbox``: one connection in an outer transaction, opened on first use in
    whatever event loop the test runs (pytest-asyncio strict or auto, anyio), since asyncpg and psycopg
    connections belong to one loop and a plain fixture cannot know the test's loop in advance. Every
    session made by ``session_class()`` joins it in savepoint mode, the test's own and the app's."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection: Any = None  # AsyncConnection once opened
        self.loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> Any:
        if self.connection is None:
            from sqlalchemy.ext.asyncio import create_async_engine
            from sqlalchemy.pool import NullPool

            self.loop = asyncio.get_running_loop()
            engine = create_async_engine(self.url, poolclass=NullPool)
            _explain_errors_on(engine.sync_engine)
            connection = await engine.connect()
            await connection.begin()
            self.connection = connection
        return self.connection

    def session_class(self, base: Any = None) -> Any:
        """A subclass of ``base`` (an AsyncSession class) whose sessions bind to the sandbox before
        their first statement."""
        from sqlalchemy.ext.asyncio import AsyncSession

        base = base or AsyncSession
        sandbox = self

        async def join(session: Any) -> None:
            connection = await sandbox.open()
            if session.bind is not connection:
                session.bind = connection
                session.sync_session.bind = connection.sync_connection
                session.sync_session.join_transaction_mode = "create_savepoint"

        def connecting(name: str) -> Any:
            async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
                await join(self)
                return await getattr(base, name)(self, *args, **kwargs)

            method.__name__ = name
            return method

        return type(f"Sandbox{base.__name__}", (base,), {name: connecting(name) for name in _CONNECTING_METHODS})

    async def _close(self, connection: Any) -> None:
        await connection.rollback()
        await connection.close()
        await connection.engine.dispose()

    def discard(self) -> None:
        """Roll back and close in the test's loop when it is still open; else end the connection at the
        driver level (the server rolls back what a vanished client left open)."""
        connection, self.connection = self.connection, None
        if connection is None:
            return
        loop = self.loop
        if loop is not None and not loop.is_closed() and not loop.is_running():
            loop.run_until_complete(self._close(connection))
            return
        fairy = connection.sync_connection.connection
        driver: Any = fairy.driver_connection
        fairy.detach()  # no pool to return it to: we end it ourselves
        if hasattr(driver, "terminate"):  # asyncpg
            with contextlib.suppress(RuntimeError):
                driver.terminate()
        else:  # psycopg AsyncConnection: close the libpq connection, no await needed
            driver.pgconn.finish()


__all__ = ["AsyncSandbox", "Sandbox", "SandboxError", "rebind", "sandbox"]
