"""HTTP API: users and their posts."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from blog.database import get_db
from blog.models import Post, User
from blog.schemas import PostCreate, PostRead, Stats, UserCreate, UserRead, UserWithPosts

app = FastAPI(title="Blog example")

DB = Annotated[Session, Depends(get_db)]


def slugify(title: str) -> str:
    """Same rule as the backfill in migration 0003."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "post"


@app.post("/users", response_model=UserRead, status_code=status.HTTP_201_CREATED)
def create_user(payload: UserCreate, db: DB) -> User:
    user = User(email=payload.email, name=payload.name)
    db.add(user)
    try:
        db.commit()
    except IntegrityError:
        # The unique constraint is the source of truth (a check-then-insert would race).
        db.rollback()
        raise HTTPException(
            status_code=status.HTTP_409_CONFLICT, detail="User with this email already exists"
        ) from None
    return user


@app.get("/users", response_model=list[UserWithPosts])
def list_users(db: DB) -> list[User]:
    # joinedload: users and their posts in one query, not one query per user.
    stmt = select(User).options(joinedload(User.posts)).order_by(User.id)
    return list(db.scalars(stmt).unique())


@app.get("/users/{user_id}", response_model=UserRead)
def get_user(user_id: int, db: DB) -> User:
    user = db.get(User, user_id)
    if user is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail="User not found")
    return user


@app.post("/users/{user_id}/posts", response_model=PostRead, status_code=status.HTTP_201_CREATED)
def create_post(user_id: int, payload: PostCreate, db: DB) -> Post:
    if db.get(User, user_id) is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail="User not found")
    post = Post(user_id=user_id, title=payload.title, slug=slugify(payload.title), body=payload.body)
    db.add(post)
    db.commit()
    return post


def _count_rows(db: Session) -> Stats:
    users = db.scalar(select(func.count()).select_from(User)) or 0
    posts = db.scalar(select(func.count()).select_from(Post)) or 0
    return Stats(users=users, posts=posts)


@app.get("/stats", response_model=Stats)
async def stats(db: DB) -> Stats:
    # The session is synchronous: run it in the threadpool rather than block the event loop.
    return await run_in_threadpool(_count_rows, db)
