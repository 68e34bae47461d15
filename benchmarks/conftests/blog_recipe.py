"""Strategy (e): the blog post's recipe, in our own words. Per test: a new NullPool engine, a subprocess
``alembic upgrade head``, a session; after it, rollback and ``drop_all``.

One deliberate difference: the published recipe leaves ``alembic_version`` behind after ``drop_all``, so
from the second test on its ``upgrade head`` is a no-op and the tables are missing. We drop it too, so
every test really gets its migrated schema (which is what the recipe means to do).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from benchapp.models import Base
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from benchmarks.conftests._common import PROJECT, admin_connection, create_database, drop_database

NAME = "bench_blog_recipe"


@pytest.fixture(scope="session")
def blog_database() -> Iterator[str]:
    admin = admin_connection()
    yield create_database(admin, NAME)
    drop_database(admin, NAME)
    admin.close()


@pytest.fixture
def db_session(blog_database: str) -> Iterator[Session]:
    engine = create_engine(blog_database, poolclass=NullPool)
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], check=True, cwd=PROJECT,
                   env={**os.environ, "DATABASE_URL": blog_database}, capture_output=True)
    session = sessionmaker(bind=engine, expire_on_commit=False)()
    yield session
    session.rollback()
    session.close()
    Base.metadata.drop_all(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
