import pytest
from app.models import User
from app.settings import settings
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError


@pytest.mark.parametrize("i", range(30))
def test_register_user(session, i):
    email = f"user{i}@example.com"
    session.add(User(email=email, name=f"User {i}"))
    session.commit()
    assert session.scalar(select(func.count()).select_from(User)) == 2  # the superuser and this one
    session.execute(delete(User).where(User.email == email))
    session.commit()


def test_superuser_is_there(session, superuser):
    found = session.scalars(select(User).where(User.is_superuser)).all()
    assert [user.email for user in found] == [settings.superuser_email]


def test_email_is_unique(session):
    session.add(User(email=settings.superuser_email, name="Impostor"))
    with pytest.raises(IntegrityError):
        session.commit()
