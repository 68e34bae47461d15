from collections.abc import Iterator

from sqlalchemy.orm import Session

from app.db import engine


def get_db() -> Iterator[Session]:
    with Session(engine) as session:
        yield session
