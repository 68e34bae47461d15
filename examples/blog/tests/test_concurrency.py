"""Several connections at once, real commits: tests marked db_commit get a database of their own."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import pytest
from blog import database
from blog.models import User
from sqlalchemy import make_url, select, text
from sqlalchemy.exc import IntegrityError

THREADS = 10

pytestmark = pytest.mark.db_commit


def test_app_points_at_this_tests_database(commit_db):
    assert make_url(os.environ["DATABASE_URL"]).database == commit_db.name
    # Looked up at call time: the app's sessionmaker, as the app itself would use it.
    with database.SessionLocal() as session:
        assert session.scalar(text("SELECT current_database()")) == commit_db.name


def test_concurrent_writes_from_ten_threads(commit_db):
    # Every thread holds its own connection with an open transaction before anyone commits.
    barrier = Barrier(THREADS)

    def create_user(i: int) -> int:
        session = database.SessionLocal()
        try:
            user = User(email=f"user{i}@example.com", name=f"User {i}")
            session.add(user)
            session.flush()
            barrier.wait(timeout=30)
            session.commit()
            return user.id
        finally:
            session.close()

    with ThreadPoolExecutor(max_workers=THREADS) as executor:
        ids = list(executor.map(create_user, range(THREADS)))

    assert len(set(ids)) == THREADS
    with commit_db.engine.connect() as connection:
        rows = connection.execute(select(User.id, User.email)).all()
    assert {row.id for row in rows} == set(ids)
    assert {row.email for row in rows} == {f"user{i}@example.com" for i in range(THREADS)}


def test_unique_email_holds_under_concurrent_inserts(commit_db):
    # Ten sessions race to insert the same email (also used by the test above: the two only pass
    # together because each has its own database). PostgreSQL lets exactly one win.
    barrier = Barrier(THREADS)

    def try_insert(i: int) -> bool:
        session = database.SessionLocal()
        try:
            session.add(User(email="user0@example.com", name=f"Racer {i}"))
            barrier.wait(timeout=30)
            session.commit()
            return True
        except IntegrityError:
            session.rollback()
            return False
        finally:
            session.close()

    with ThreadPoolExecutor(max_workers=THREADS) as executor:
        outcomes = list(executor.map(try_insert, range(THREADS)))

    assert outcomes.count(True) == 1
    with commit_db.engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM users")) == 1
