"""What commit() and rollback() mean inside a test.

The app's commit() releases a savepoint of the test's transaction: it is durable for the rest of the
test, and gone after it. rollback() undoes what happened since the last commit, as in production.
"""

from __future__ import annotations

from blog.models import User
from sqlalchemy import select


def emails(db_session) -> set[str]:
    return set(db_session.scalars(select(User.email)))


def test_rollback_undoes_only_what_came_after_the_apps_commit(client, db_session):
    assert client.post("/users", json={"email": "kept@example.com", "name": "Kept"}).status_code == 201
    db_session.add(User(email="dropped@example.com", name="Dropped"))
    db_session.flush()

    db_session.rollback()

    assert emails(db_session) == {"kept@example.com"}


def test_nested_transaction_rolls_back_on_its_own(db_session):
    with db_session.begin_nested():
        db_session.add(User(email="outer@example.com", name="Outer"))

    nested = db_session.begin_nested()
    db_session.add(User(email="inner@example.com", name="Inner"))
    db_session.flush()
    assert emails(db_session) == {"outer@example.com", "inner@example.com"}
    nested.rollback()

    assert emails(db_session) == {"outer@example.com"}


def test_app_keeps_working_after_an_integrity_error(client, db_session):
    assert client.post("/users", json={"email": "a@example.com", "name": "A"}).status_code == 201
    assert client.post("/users", json={"email": "a@example.com", "name": "A again"}).status_code == 409

    # The failed INSERT was rolled back to its savepoint; the transaction is still usable.
    assert client.post("/users", json={"email": "b@example.com", "name": "B"}).status_code == 201
    assert [user["email"] for user in client.get("/users").json()] == ["a@example.com", "b@example.com"]


def test_app_sees_rows_the_test_has_not_committed(client, db_session):
    user = User(email="pending@example.com", name="Pending")
    db_session.add(user)
    db_session.flush()

    response = client.get(f"/users/{user.id}")

    assert response.status_code == 200
    assert response.json()["email"] == "pending@example.com"
