from app.models import Category, Note
from sqlalchemy import delete, func, select


def test_categories_are_seeded(session):
    assert session.scalars(select(Category.name).order_by(Category.name)).all() == ["life", "news", "tech"]


def test_superuser_writes_a_note(session, superuser):
    news = session.scalar(select(Category).where(Category.name == "news"))
    session.add(Note(user_id=superuser.id, category_id=news.id, body="hello"))
    session.commit()
    assert session.scalar(select(func.count()).select_from(Note)) == 1
    session.execute(delete(Note))
    session.commit()
