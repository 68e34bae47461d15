"""Written for one shared database: a fixed superuser for the whole session, everything deleted after."""

import pytest
from app.db import SessionLocal, engine
from app.models import Note, User
from app.settings import settings
from sqlalchemy import delete


@pytest.fixture(scope="session", autouse=True)
def superuser():
    with SessionLocal() as session:
        user = User(email=settings.superuser_email, name="Admin", is_superuser=True)
        session.add(user)
        session.commit()
    yield user
    with SessionLocal() as session:
        session.execute(delete(Note))
        session.execute(delete(User))
        session.commit()
    engine.dispose()


@pytest.fixture
def session():
    with SessionLocal() as session:
        yield session
