"""The async endpoint, called through httpx.AsyncClient on the app's ASGI interface."""

from __future__ import annotations

import pytest
from blog.models import User

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_stats_counts_users_and_posts(async_client):
    created = await async_client.post("/users", json={"email": "ann@example.com", "name": "Ann"})
    assert created.status_code == 201
    user_id = created.json()["id"]
    for title in ("One", "Two"):
        response = await async_client.post(f"/users/{user_id}/posts", json={"title": title, "body": "..."})
        assert response.status_code == 201

    response = await async_client.get("/stats")

    assert response.status_code == 200
    assert response.json() == {"users": 1, "posts": 2}


async def test_stats_sees_rows_written_through_db_session(async_client, db_session):
    db_session.add_all([User(email=f"u{i}@example.com", name=f"U{i}") for i in range(3)])
    db_session.commit()

    response = await async_client.get("/stats")

    assert response.json() == {"users": 3, "posts": 0}


async def test_duplicate_email_over_async_client(async_client):
    payload = {"email": "twice@example.com", "name": "Twice"}
    assert (await async_client.post("/users", json=payload)).status_code == 201

    response = await async_client.post("/users", json=payload)

    assert response.status_code == 409
