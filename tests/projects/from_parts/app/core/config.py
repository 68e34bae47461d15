"""Settings from parts, read once at import: the full-stack FastAPI template's shape."""

from pydantic_settings import BaseSettings


class Settings(BaseSettings):
    POSTGRES_SERVER: str = "localhost"
    POSTGRES_PORT: int = 5432
    POSTGRES_USER: str = "postgres"
    POSTGRES_PASSWORD: str = ""
    POSTGRES_DB: str = "app"
    FIRST_SUPERUSER: str = "admin@example.com"

    @property
    def SQLALCHEMY_DATABASE_URI(self) -> str:
        from sqlalchemy.engine import URL

        return URL.create("postgresql+psycopg", username=self.POSTGRES_USER, password=self.POSTGRES_PASSWORD,
                          host=self.POSTGRES_SERVER, port=self.POSTGRES_PORT,
                          database=self.POSTGRES_DB).render_as_string(hide_password=False)


settings = Settings()
