"""Reference data every environment needs, loaded after the migrations."""

from app.db import engine
from app.models import Category
from sqlalchemy import insert

with engine.begin() as connection:
    connection.execute(insert(Category), [{"name": name} for name in ("life", "news", "tech")])
engine.dispose()
