"""Engine, session factory and the request-scoped session dependency.

The engine is built at import time from ``DATABASE_URL``, as most FastAPI apps do. That is why the
test setup must set ``DATABASE_URL`` before anything imports the app (pgshard's ``pgshard_env``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+psycopg://localhost/blog")

engine = create_engine(DATABASE_URL, pool_pre_ping=True)

# expire_on_commit=False: objects returned from an endpoint after commit() are serialized without
# going back to the database for every attribute.
SessionLocal = sessionmaker(bind=engine, expire_on_commit=False)


def get_db() -> Iterator[Session]:
    """One session per request, closed when the request is done."""
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()
