"""No test sees another test's rows.

Every case below writes a user with the SAME email, by a different route, and asserts it is the only
user in the table. Whatever the order (pytest-randomly) or the split across workers (-n 2), one of
them fails if anything written by one test survives into another.
"""

from __future__ import annotations

import pytest
from blog import database
from blog.models import User
from sqlalchemy import select, text

EMAIL = "same@example.com"


def via_session_commit(db_session, client):
    db_session.add(User(email=EMAIL, name="session commit"))
    db_session.commit()


def via_session_flush(db_session, client):
    db_session.add(User(email=EMAIL, name="session flush"))
    db_session.flush()


def via_app_endpoint(db_session, client):
    response = client.post("/users", json={"email": EMAIL, "name": "app endpoint"})
    assert response.status_code == 201


def via_raw_sql(db_session, client):
    db_session.execute(text("INSERT INTO users (email, name) VALUES (:email, 'raw sql')"), {"email": EMAIL})


def via_app_sessionmaker(db_session, client):
    # The app's own SessionLocal, as a background job would use it: pgshard binds it to this
    # test's connection, so its commit is rolled back with everything else.
    session = database.SessionLocal()
    try:
        session.add(User(email=EMAIL, name="app sessionmaker"))
        session.commit()
    finally:
        session.close()


def via_nested_transaction(db_session, client):
    with db_session.begin_nested():
        db_session.add(User(email=EMAIL, name="nested transaction"))


@pytest.mark.parametrize(
    "write",
    [
        via_session_commit,
        via_session_flush,
        via_app_endpoint,
        via_raw_sql,
        via_app_sessionmaker,
        via_nested_transaction,
    ],
)
def test_each_test_starts_from_an_empty_table(write, db_session, client):
    assert db_session.scalars(select(User.email)).all() == []

    write(db_session, client)

    assert db_session.scalars(select(User.email)).all() == [EMAIL]
