"""The seed script CI runs after `alembic upgrade head`: the first superuser."""

from app.core.config import settings
from app.db import engine
from app.models import User
from sqlalchemy import select
from sqlalchemy.orm import Session

with Session(engine) as session:
    if session.scalars(select(User).where(User.email == settings.FIRST_SUPERUSER)).first() is None:
        session.add(User(email=settings.FIRST_SUPERUSER, is_superuser=True))
        session.commit()
