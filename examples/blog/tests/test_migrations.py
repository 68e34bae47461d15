"""The schema under test is the one Alembic builds, constraints included."""

from __future__ import annotations

from pathlib import Path

import psycopg.errors
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from blog.models import Post, User
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def alembic_config() -> Config:
    return Config(str(ALEMBIC_INI))


def test_database_is_at_the_latest_migration(db_session):
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()

    assert db_session.scalar(text("SELECT version_num FROM alembic_version")) == head


def test_post_without_slug_is_rejected_by_not_null(db_session):
    user = User(email="writer@example.com", name="Writer")
    db_session.add(user)
    db_session.commit()
    user_id = user.id

    db_session.add(Post(user_id=user_id, title="No slug", body="..."))  # slug left unset
    with pytest.raises(IntegrityError) as excinfo:
        db_session.flush()

    assert isinstance(excinfo.value.orig, psycopg.errors.NotNullViolation)
    assert excinfo.value.orig.diag.column_name == "slug"

    # rollback() undoes the failed flush only; the committed user is still there.
    db_session.rollback()
    assert db_session.scalar(select(func.count()).select_from(Post)) == 0
    assert db_session.get(User, user_id) is not None


def test_raw_insert_without_slug_is_rejected_inside_a_savepoint(db_session):
    user = User(email="raw@example.com", name="Raw")
    db_session.add(user)
    db_session.flush()

    with pytest.raises(IntegrityError), db_session.begin_nested():
        db_session.execute(
            text("INSERT INTO posts (user_id, title, body) VALUES (:user_id, 'No slug', '...')"),
            {"user_id": user.id},
        )

    # begin_nested() rolled back to its savepoint: the session is usable without a rollback().
    assert db_session.scalar(select(func.count()).select_from(User)) == 1


def test_deleting_a_user_deletes_their_posts(db_session):
    user = User(
        email="leaving@example.com",
        name="Leaving",
        posts=[Post(title="Bye", slug="bye", body="..."), Post(title="Again", slug="again", body="...")],
    )
    db_session.add(user)
    db_session.commit()

    db_session.delete(user)
    db_session.commit()

    # passive_deletes: the ORM issued one DELETE on users; ON DELETE CASCADE removed the posts.
    assert db_session.scalar(select(func.count()).select_from(Post)) == 0


@pytest.mark.db_commit
def test_migration_0003_backfills_slug_from_title(commit_db):
    # Migrations run DDL and commit: this test gets a database of its own (db_commit).
    config = alembic_config()
    with commit_db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0002")
        user_id = connection.execute(
            text("INSERT INTO users (email, name) VALUES ('old@example.com', 'Old') RETURNING id")
        ).scalar_one()
        connection.execute(
            text("INSERT INTO posts (user_id, title, body) VALUES (:user_id, :title, '...')"),
            [{"user_id": user_id, "title": title} for title in ("Hello, World!", "  2026: Q&A  ", "???")],
        )

        command.upgrade(config, "head")

        slugs = connection.execute(text("SELECT slug FROM posts ORDER BY id")).scalars().all()
        nullable = connection.execute(
            text(
                "SELECT is_nullable FROM information_schema.columns "
                "WHERE table_name = 'posts' AND column_name = 'slug'"
            )
        ).scalar_one()

    assert slugs == ["hello-world", "2026-q-a", "post"]
    assert nullable == "NO"
