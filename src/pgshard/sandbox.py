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
import functools
import sys
import threading
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
    if (getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)) == NOT_IN_TRANSACTION:
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


def in_transactions(connection: Connection) -> Connection:
    """The test's connection out of autocommit, so its outer transaction and savepoints are real: an app
    engine made with ``isolation_level="AUTOCOMMIT"`` (common in test settings) would otherwise run
    ``SAVEPOINT`` outside any transaction. Only this connection changes, and only while it is checked out:
    SQLAlchemy resets its isolation level when it goes back to the pool, so the app's others keep theirs."""
    if getattr(connection.connection.dbapi_connection, "autocommit", False) is True:
        return connection.execution_options(isolation_level=connection.dialect.default_isolation_level
                                            or "READ COMMITTED")
    return connection


@contextlib.contextmanager
def sandbox(engine: Engine) -> Iterator[Sandbox]:
    _explain_errors_on(engine)
    connection = in_transactions(engine.connect())
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


def is_async_engine(engine: Any) -> bool:
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    return module is not None and isinstance(engine, module.AsyncEngine)


def app_engine(engine: Any, maker: Any) -> Any:
    """The app's own engine (sync or async): ``pgshard_engine`` when given, else the bind of its
    sessionmaker; None when it has neither (pgshard's engine is used then)."""
    if engine is None and maker is not None and isinstance(getattr(maker, "kw", None), dict):
        engine = maker.kw.get("bind")
    if engine is None or isinstance(engine, Engine) or is_async_engine(engine):
        return engine
    raise SandboxError(f"pgshard_engine must name a SQLAlchemy Engine or AsyncEngine, got {type(engine).__name__}")


_CONNECTING_METHODS = ("execute", "scalar", "scalars", "get", "get_one", "stream", "stream_scalars", "delete",
                       "merge", "flush", "commit", "rollback", "refresh", "run_sync", "connection")
_SYNC_BRIDGED = ("execute", "scalar", "scalars", "get", "get_one", "flush", "commit", "rollback", "refresh",
                 "merge", "connection", "close", "begin", "begin_nested")


class _BridgedTransaction:
    """A SessionTransaction of a bridged session whose own I/O (commit, rollback, the end of its ``with``
    block) runs where the session's does."""

    def __init__(self, transaction: Any, run: Any) -> None:
        self._transaction = transaction
        self._run = run

    def __enter__(self) -> _BridgedTransaction:
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        return self._run(self._transaction.__exit__, *exc_info)

    def commit(self) -> None:
        self._run(self._transaction.commit)

    def rollback(self) -> None:
        self._run(self._transaction.rollback)

    def close(self) -> None:
        self._run(self._transaction.close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transaction, name)


class AsyncSandbox:
    """The async twin of ``sandbox``: one connection of the app's async engine (or pgshard's) in an
    outer transaction, opened on first use in the loop it must live in, since asyncpg and psycopg
    connections belong to one loop. In an async test that is the test's own loop (pytest-asyncio strict
    or auto, anyio); when a sync client or a sync session must reach it too, it is ``portal``'s (anyio's
    blocking portal, a loop on a thread of its own): the sync ``client`` runs its requests there, a sync
    ``db_session`` reaches it through ``sync_session``, async sessions through ``in_loop``. Every session
    made by ``session_class()`` joins it in savepoint mode, the test's own and the app's.
    """

    def __init__(self, engine: Any, portal: Any = None) -> None:
        self.engine = engine  # an AsyncEngine: the app's, or one of ours
        self.portal = portal
        self.loop_thread = portal.call(threading.get_ident) if portal is not None else None
        self.connection: Any = None  # AsyncConnection once opened
        self.loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> Any:
        if self.connection is None:
            self.loop = asyncio.get_running_loop()
            connection = await self.engine.connect()
            await connection.run_sync(in_transactions)
            _explain_errors_on(self.engine.sync_engine)
            await connection.begin()
            self.connection = connection
        return self.connection

    def session_class(self, base: Any = None) -> Any:
        """A subclass of ``base`` (an AsyncSession class) whose sessions bind to the sandbox before
        their first statement, and whose I/O runs in the sandbox's loop when called from another one
        (an async test whose sync client or db_session put the sandbox on a portal)."""
        from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction

        base = base or AsyncSession
        sandbox = self

        async def join(session: Any) -> None:
            connection = await sandbox.open()
            if getattr(session, "bind", None) is not connection:  # SQLAlchemy 2.0: no .bind when made unbound
                session.bind = connection
                session.sync_session.bind = connection.sync_connection
                session.sync_session.join_transaction_mode = "create_savepoint"

        def bridged(class_: Any, name: str, joins: bool) -> Any:
            async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
                async def call() -> Any:
                    if joins:
                        await join(self if isinstance(self, AsyncSession) else self.session)
                    return await getattr(class_, name)(self, *args, **kwargs)

                return await sandbox.in_loop(call)

            method.__name__ = name
            return method

        transaction = type("SandboxAsyncSessionTransaction", (AsyncSessionTransaction,), {
            "start": bridged(AsyncSessionTransaction, "start", joins=True),
            **{name: bridged(AsyncSessionTransaction, name, joins=False)
               for name in ("commit", "rollback", "__aexit__")},
        })
        namespace: dict[str, Any] = {name: bridged(base, name, joins=True) for name in _CONNECTING_METHODS}
        namespace["close"] = bridged(base, "close", joins=False)
        namespace["begin"] = lambda self: transaction(self)
        namespace["begin_nested"] = lambda self: transaction(self, nested=True)
        return type(f"Sandbox{base.__name__}", (base,), namespace)

    async def in_loop(self, call: Any) -> Any:
        """Await ``call()`` in the sandbox's loop: here when this is it, else on its portal."""
        if self.portal is None or threading.get_ident() == self.loop_thread:
            return await call()
        return await asyncio.wrap_future(self.portal.start_task_soon(call))

    def sync_session(self, **kw: Any) -> Session:
        """A sync ``Session`` on the sandbox's connection for a sync test: each of its I/O methods runs in
        the portal's loop inside a greenlet (as AsyncSession does), so it drives the async driver and
        sees what the app's requests wrote, and the other way round."""
        from sqlalchemy.util import greenlet_spawn

        portal = self.portal
        assert portal is not None, "sync_session needs a sandbox on a portal"
        connection = portal.call(self.open)
        loop_thread = self.loop_thread

        def run(func: Any, *args: Any, **kwargs: Any) -> Any:
            call = functools.partial(func, *args, **kwargs)
            if threading.get_ident() == loop_thread:  # already inside (a nested call)
                return call()
            return portal.call(greenlet_spawn, call)

        def bridged(name: str) -> Any:
            def method(session: Session, *args: Any, **kwargs: Any) -> Any:
                result = run(getattr(Session, name), session, *args, **kwargs)
                if name in ("begin", "begin_nested") and threading.get_ident() != loop_thread:
                    return _BridgedTransaction(result, run)
                return result

            method.__name__ = name
            return method

        class_ = type("SandboxBridgedSession", (Session,), {name: bridged(name) for name in _SYNC_BRIDGED})
        session: Session = class_(bind=connection.sync_connection, join_transaction_mode="create_savepoint", **kw)
        return session

    async def _close(self, connection: Any) -> None:
        await connection.rollback()
        await connection.close()
        # Empty the pool in this loop: its connections belong to it, and a later test may run in another.
        await self.engine.dispose()

    def discard(self) -> None:
        """Roll back and close in the connection's loop when it is still open; else end the connection at
        the driver level (the server rolls back what a vanished client left open)."""
        connection, self.connection = self.connection, None
        if connection is None:
            return
        loop = self.loop
        if self.portal is not None:
            self.portal.call(self._close, connection)
            return
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


__all__ = ["AsyncSandbox", "Sandbox", "SandboxError", "app_engine", "rebind", "sandbox"]
