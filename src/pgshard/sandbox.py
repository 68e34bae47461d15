"""Per-test isolation: one connection, an outer transaction, and sessions that only ever see savepoints.

The application's own ``commit()`` releases a savepoint, its ``rollback()`` rolls one back, and at the
end of the test the outer transaction is rolled back: nothing the test wrote survives it. What differs
from production: sequences still advance (they are not transactional), ``now()`` is the same for the
whole test (it is the transaction's start time), and deferred constraints are checked at the outer
commit that never comes, so they do not fire: use ``@pytest.mark.db_commit`` for those.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
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


@contextlib.asynccontextmanager
async def async_sandbox(url: str) -> AsyncIterator[Any]:
    """The async twin of ``sandbox``: an AsyncSession in savepoint mode over its own connection,
    created on the running event loop (asyncpg and psycopg connections belong to one loop)."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    from sqlalchemy.pool import NullPool

    engine = create_async_engine(url, poolclass=NullPool)
    _explain_errors_on(engine.sync_engine)
    try:
        async with engine.connect() as connection:
            transaction = await connection.begin()
            session = AsyncSession(bind=connection, join_transaction_mode="create_savepoint",
                                   expire_on_commit=False)
            try:
                yield session
            finally:
                await session.close()
                if transaction.is_active:
                    await transaction.rollback()
    finally:
        await engine.dispose()


__all__ = ["DBAPIError", "Sandbox", "SandboxError", "async_sandbox", "rebind", "sandbox"]
