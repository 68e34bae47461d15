"""Blog example: a small FastAPI + SQLAlchemy + Alembic app tested with pytest-pgshard."""
