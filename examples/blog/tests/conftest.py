"""Nothing to see here, on purpose.

pgshard is configured in pyproject.toml ([tool.pytest.ini_options]): it builds the template database
with Alembic, gives each xdist worker a clone, sets DATABASE_URL before the app is imported, and
provides the fixtures these tests use (db_session, client, async_client, query_counter, commit_db).
"""
