"""The users API against real PostgreSQL: constraints, status codes, what lands in the table."""

from __future__ import annotations

from blog.models import Post, User
from sqlalchemy import func, select


def test_create_user_returns_201_and_stores_the_row(client, db_session):
    response = client.post("/users", json={"email": "alice@example.com", "name": "Alice"})

    assert response.status_code == 201
    body = response.json()
    assert body["email"] == "alice@example.com"

    user = db_session.scalars(select(User).where(User.email == "alice@example.com")).one()
    assert user.id == body["id"]
    assert user.name == "Alice"
    assert user.created_at is not None  # server_default now(), from the migration


def test_duplicate_email_returns_409_and_keeps_one_row(client, db_session):
    first = client.post("/users", json={"email": "bob@example.com", "name": "Bob"})
    assert first.status_code == 201

    response = client.post("/users", json={"email": "bob@example.com", "name": "Bob 2"})

    # The unique constraint from migration 0001 fired, the app caught it and rolled back.
    assert response.status_code == 409
    assert "already exists" in response.json()["detail"].lower()
    count = db_session.scalar(select(func.count()).select_from(User).where(User.email == "bob@example.com"))
    assert count == 1


def test_get_user(client, db_session):
    user = User(email="carol@example.com", name="Carol")
    db_session.add(user)
    db_session.commit()

    response = client.get(f"/users/{user.id}")

    assert response.status_code == 200
    assert response.json()["name"] == "Carol"


def test_get_unknown_user_returns_404(client):
    response = client.get("/users/999999")

    assert response.status_code == 404


def test_create_post_derives_slug_from_title(client, db_session):
    user_id = client.post("/users", json={"email": "dave@example.com", "name": "Dave"}).json()["id"]

    response = client.post(f"/users/{user_id}/posts", json={"title": "Hello, World!", "body": "First."})

    assert response.status_code == 201
    assert response.json()["slug"] == "hello-world"
    post = db_session.get(Post, response.json()["id"])
    assert post is not None
    assert post.user_id == user_id


def test_create_post_for_unknown_user_returns_404(client, db_session):
    response = client.post("/users/999999/posts", json={"title": "Orphan", "body": "..."})

    assert response.status_code == 404
    assert db_session.scalar(select(func.count()).select_from(Post)) == 0


def test_invalid_payload_returns_422(client, db_session):
    response = client.post("/users", json={"email": "erin@example.com", "name": ""})

    assert response.status_code == 422
    assert db_session.scalar(select(func.count()).select_from(User)) == 0
