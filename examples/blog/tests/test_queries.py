"""N+1 detection: the query counter sees every statement the app sends to PostgreSQL."""

from __future__ import annotations

import pytest
from blog.models import Post, User
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from pgshard import assert_max_queries

USERS = 5
POSTS_PER_USER = 2


@pytest.fixture
def authors(db_session):
    """Five users with two posts each, committed; the session starts cold, like a new request."""
    for i in range(USERS):
        db_session.add(
            User(
                email=f"author{i}@example.com",
                name=f"Author {i}",
                posts=[Post(title=f"Post {j}", slug=f"post-{j}", body="...") for j in range(POSTS_PER_USER)],
            )
        )
    db_session.commit()
    # Without this, the posts collections would still be loaded in the identity map and a lazy
    # load would never reach the database.
    db_session.expunge_all()


@pytest.mark.usefixtures("authors")
def test_list_users_endpoint_loads_posts_in_one_query(client, query_counter):
    with query_counter.assert_max(1):
        response = client.get("/users")

    assert response.status_code == 200
    users = response.json()
    assert len(users) == USERS
    assert all(len(user["posts"]) == POSTS_PER_USER for user in users)


@pytest.mark.usefixtures("authors")
def test_joinedload_fetches_users_and_posts_in_one_query(db_session, query_counter):
    with query_counter.assert_max(1):
        users = db_session.scalars(select(User).options(joinedload(User.posts))).unique().all()
        loaded_posts = sum(len(user.posts) for user in users)

    assert loaded_posts == USERS * POSTS_PER_USER


@pytest.mark.usefixtures("authors")
def test_lazy_loading_is_caught_as_n_plus_one(db_session, query_counter):
    # The same bound as above, with the default lazy loading: one SELECT per user's posts.
    with pytest.raises(AssertionError) as excinfo, query_counter.assert_max(1):
        users = db_session.scalars(select(User)).all()
        for user in users:
            _ = user.posts

    # The failure lists the captured SQL, so the extra queries are visible in the report.
    assert "posts" in str(excinfo.value).lower()


@pytest.mark.usefixtures("authors")
def test_query_counter_counts_one_query_per_lazy_load(db_session, query_counter):
    query_counter.reset()

    users = db_session.scalars(select(User)).all()
    for user in users:
        _ = user.posts

    assert query_counter.count == 1 + USERS
    assert len(query_counter.statements) == query_counter.count
    assert sum("posts" in statement.lower() for statement in query_counter.statements) == USERS


def test_get_user_is_a_single_query(client, db_session):
    user = User(email="single@example.com", name="Single")
    db_session.add(user)
    db_session.commit()
    user_id = user.id
    db_session.expunge_all()

    with assert_max_queries(1):
        response = client.get(f"/users/{user_id}")

    assert response.status_code == 200
