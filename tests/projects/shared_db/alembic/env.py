"""Reads the app's settings, not sqlalchemy.url: the database is wherever the app says it is."""

from alembic import context
from app.settings import get_settings
from sqlalchemy import create_engine, pool

engine = create_engine(get_settings().database_url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
