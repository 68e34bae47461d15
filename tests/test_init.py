"""Issue 16: pgshard init's inference, one small project tree per kind of evidence (pure logic: no server), and
the file it writes into (which one, in which syntax, never twice)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pgshard import configfile
from pgshard.checks import KNOWN_KEYS
from pgshard.cli import main
from pgshard.init_plan import Plan, plan


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def lines(found: Plan) -> dict[str, list[str]]:
    return {line.key: line.values for line in found.lines}


def evidence(found: Plan, key: str) -> str:
    return " | ".join(next(line.evidence for line in found.lines if line.key == key))


def test_pydantic_settings_with_a_prefix_and_a_nested_delimiter(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {"app/__init__.py": "", "app/config.py": """
        from pydantic import BaseModel
        from pydantic_settings import BaseSettings, SettingsConfigDict

        class Database(BaseModel):
            url: str = "postgresql+asyncpg://localhost/app"

        class Settings(BaseSettings):
            model_config = SettingsConfigDict(env_prefix="SHOP_", env_nested_delimiter="__")
            debug: bool = False
            db: Database = Database()
    """}))
    assert lines(found)["pgshard_env"] == ["SHOP_DB__URL={url}"]
    assert "app/config.py: db.url (pydantic settings, env_prefix 'SHOP_', env_nested_delimiter '__')" in \
        evidence(found, "pgshard_env")
    assert "{url} carries postgresql+asyncpg: app/config.py" in evidence(found, "pgshard_env")


def test_settings_from_parts_become_one_line_each(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {"settings.py": """
        from pydantic_settings import BaseSettings

        class Settings(BaseSettings):
            POSTGRES_SERVER: str
            POSTGRES_PORT: int = 5432
            POSTGRES_USER: str
            POSTGRES_PASSWORD: str = ""
            POSTGRES_DB: str = ""
    """}))
    assert lines(found)["pgshard_env"] == ["POSTGRES_SERVER={host}", "POSTGRES_PORT={port}", "POSTGRES_USER={user}",
                                           "POSTGRES_PASSWORD={password}", "POSTGRES_DB={dbname}"]


def test_os_environ_reads(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {"db.py": 'import os\nURL = os.environ["DATABASE_URL"]\nX = os.getenv("DEBUG")\n'}))
    assert lines(found)["pgshard_env"] == ["DATABASE_URL={url}"]
    assert evidence(found, "pgshard_env").startswith("db.py: reads $DATABASE_URL")


def test_a_dotenv_file_names_the_variable_and_its_driver(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {".env": "SQLALCHEMY_DATABASE_URI=postgresql+psycopg2://u:pw@db/app\nDEBUG=1\n"}))
    assert lines(found)["pgshard_env"] == ["SQLALCHEMY_DATABASE_URI={url}"]
    assert "{url} carries postgresql+psycopg2: .env: SQLALCHEMY_DATABASE_URI=postgresql+psycopg2://u:***@db/app" in \
        evidence(found, "pgshard_env")


def test_alembic_ini_and_a_prestart_script(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {
        "alembic.ini": "[alembic]\nscript_location = migrations\n",
        "scripts/prestart.sh": "#!/bin/sh\npython app/backend_pre_start.py\nalembic upgrade head\n"
                               "python app/initial_data.py\n",
        "app/initial_data.py": "", "app/backend_pre_start.py": "",
    }))
    assert lines(found)["pgshard_migrate"] == ["alembic:alembic.ini", "command:python app/initial_data.py"]
    assert evidence(found, "pgshard_migrate") == (
        "alembic.ini (script_location migrations) | scripts/prestart.sh: alembic upgrade head | "
        "scripts/prestart.sh: python app/initial_data.py")



ENV_PY = "from alembic import context\n{imports}\n{assign}\n\ndef run():\n" \
         "    context.configure(connection=None, {keyword})\n"


@pytest.mark.parametrize(("imports", "assign", "keyword", "expected"), [
    ("from app.models import Base", "", "target_metadata=Base.metadata", "models:app.models:Base"),
    ("from app.models import SQLModel  # noqa", "target_metadata = SQLModel.metadata",
     "target_metadata=target_metadata", "models:app.models:SQLModel"),
    ("from app import models", "target_metadata = models.Base.metadata", "target_metadata=target_metadata",
     "models:app.models:Base"),
    ("import app.db.base", "target_metadata = app.db.base.Base.metadata", "", "models:app.db.base:Base"),
    ("from app.db import metadata as md", "target_metadata = md", "target_metadata=target_metadata",
     "models:app.db:metadata"),
])
def test_an_alembic_project_gets_heads_and_the_models_env_py_compares(
        tmp_path: Path, imports: str, assign: str, keyword: str, expected: str) -> None:
    found = plan(tree(tmp_path, {
        "alembic.ini": "[alembic]\nscript_location = %(here)s/migrations\n",
        "migrations/env.py": ENV_PY.format(imports=imports, assign=assign, keyword=keyword),
    }))
    assert lines(found)["pgshard_check"] == ["heads", expected]
    assert evidence(found, "pgshard_check").startswith(
        "alembic.ini: the template is built by Alembic migrations | migrations/env.py:")
    assert [need for need in found.needs if "pgshard_check" in need] == []


@pytest.mark.parametrize(("imports", "assign", "need"), [
    ("", "target_metadata = None", None),
    ("from .models import Base", "target_metadata = Base.metadata", "migrations/env.py:3: target_metadata = "
     "Base.metadata (not read from an import of env.py's)"),
    ("from app import a, b", "target_metadata = [a.metadata, b.metadata]", "migrations/env.py:3: target_metadata "
     "= [a.metadata, b.metadata] (not read from an import of env.py's)"),
])
def test_an_env_py_whose_metadata_does_not_read_as_an_import_gets_heads_only(
        tmp_path: Path, imports: str, assign: str, need: str | None) -> None:
    found = plan(tree(tmp_path, {
        "alembic.ini": "[alembic]\nscript_location = migrations\n",
        "migrations/env.py": ENV_PY.format(imports=imports, assign=assign, keyword="target_metadata=target_metadata"),
    }))
    assert lines(found)["pgshard_check"] == ["heads"]
    assert [n for n in found.needs if "pgshard_check" in n] == ([] if need is None else [
        f"pgshard_check: add models:pkg.models:Base naming the metadata of {need}, to check the models against "
        "the migrated template"])

def test_a_makefile_target(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {"Makefile": "test:\n\tpython -m app.seed && pytest\n", "app/__init__.py": "",
                                 "app/seed.py": ""}))
    assert lines(found)["pgshard_migrate"] == ["command:python -m app.seed"]
    assert evidence(found, "pgshard_migrate") == "Makefile: python -m app.seed"
    assert "pgshard_check" not in lines(found) and not any("pgshard_migrate" in need for need in found.needs)


def test_a_ci_workflow_step_and_a_compose_command(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {
        ".github/workflows/test.yml": "jobs:\n  test:\n    steps:\n      - run: uv run alembic upgrade head\n"
                                      "      - run: uv run python scripts/seed_db.py\n",
        "docker-compose.yml": "services:\n  api:\n"
                              "    command: sh -c 'python scripts/load_data.py && uvicorn app:app'\n",
        "scripts/seed_db.py": "", "scripts/load_data.py": "", "alembic.ini": "[alembic]\nscript_location = a\n",
    }))
    assert lines(found)["pgshard_migrate"] == ["alembic:alembic.ini", "command:python scripts/load_data.py",
                                               "command:python scripts/seed_db.py"]
    assert ".github/workflows/test.yml: uv run python scripts/seed_db.py" in evidence(found, "pgshard_migrate")


def test_sqlalchemy_utils_calls_on_a_hard_coded_database(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {"tests/conftest.py": """
        from sqlalchemy_utils import create_database, database_exists, drop_database

        URL = "postgresql://postgres:postgres@localhost:5432/app_test"

        def pytest_sessionstart(session):
            if database_exists(URL):
                drop_database(URL)
            create_database(URL)
    """}))
    assert lines(found)["pgshard_redirect"] == ["app_test"]
    assert evidence(found, "pgshard_redirect").startswith("tests/conftest.py:4: postgresql://postgres:***@localhost")


def test_create_database_text_and_a_per_worker_name(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {"conftest.py": """
        import os
        from sqlalchemy import text

        def make(conn, worker_id):
            name = f"test_db_{worker_id}"
            conn.execute(text(f"CREATE DATABASE {name}"))
            conn.execute(text("DROP DATABASE IF EXISTS scratch"))
    """}))
    assert lines(found)["pgshard_redirect"] == ["test_db_*", "scratch"]
    assert "conftest.py:6: f'test_db_{worker_id}' (per worker)" in evidence(found, "pgshard_redirect")


def test_the_app_its_get_db_and_sessionmaker(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {
        "shop/__init__.py": "", "shop/main.py": "from fastapi import FastAPI\napp = FastAPI()\n",
        "shop/db.py": "import os\nfrom sqlalchemy import create_engine\nfrom sqlalchemy.orm import sessionmaker\n"
                      "engine = create_engine(os.environ['DATABASE_URL'])\nSessionLocal = sessionmaker(bind=engine)\n"
                      "def get_db():\n    with SessionLocal() as s:\n        yield s\n",
    }))
    assert {k: v for k, v in lines(found).items() if k != "pgshard_env"} == {
        "pgshard_app": ["shop.main:app"], "pgshard_get_db": ["shop.db:get_db"],
        "pgshard_sessionmaker": ["shop.db:SessionLocal"]}
    assert evidence(found, "pgshard_app") == "shop/main.py:2: app = FastAPI(...)"


def test_a_suite_checking_through_its_own_session_gets_no_pgshard_app(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {
        "app/__init__.py": "", "app/main.py": "from fastapi import FastAPI\napp = FastAPI()\n",
        "app/deps.py": "def get_db():\n    yield None\n",
        "tests/conftest.py": "import pytest\nfrom sqlmodel import Session\n\n@pytest.fixture\ndef db():\n"
                             "    with Session(engine) as s:\n        yield s\n        s.commit()\n",
    }))
    assert "pgshard_app" not in lines(found)
    assert any("tests/conftest.py:5: fixture db opens its own session" in need for need in found.needs)


def test_nothing_to_go_on_says_what_it_needs_and_writes_nothing(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {"README.md": "hello\n"}))
    assert found.lines == [] and len(found.needs) == 2


def test_every_key_it_writes_is_one_the_plugin_knows(tmp_path: Path) -> None:
    root = Path(__file__).parent / "projects"
    for project in (root / "shared_db", root / "from_parts", Path(__file__).parents[1] / "examples" / "blog"):
        assert {line.key for line in plan(project).lines} <= KNOWN_KEYS


# -- the file ----------------------------------------------------------------------------------------------
def test_it_writes_into_the_file_pytest_reads_and_refuses_a_second_time(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    tree(tmp_path, {"pyproject.toml": '[project]\nname = "x"\n\n[tool.ruff]\nline-length = 100\n',
                    "tox.ini": "[tox]\nenvlist = py\n\n[pytest]\nfilterwarnings = error\n\n"
                               "[testenv]\ncommands = pytest\n",
                    ".env": "DATABASE_URL=postgresql://localhost/app\n"})
    assert main(["init", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "writing into tox.ini [pytest]" in out and "DATABASE_URL={url}" in out and "# <- .env: DATABASE_URL" in out
    assert (tmp_path / "tox.ini").read_text() == (
        "[tox]\nenvlist = py\n\n[pytest]\nfilterwarnings = error\npgshard_env = DATABASE_URL={url}\n\n"
        "[testenv]\ncommands = pytest\n")
    assert "[tool.pytest" not in (tmp_path / "pyproject.toml").read_text()
    before = (tmp_path / "tox.ini").read_text()
    assert main(["init", str(tmp_path)]) == 2
    assert "tox.ini [pytest] already has pgshard_env: pass --replace" in capsys.readouterr().err
    assert main(["init", str(tmp_path), "--replace"]) == 0
    assert (tmp_path / "tox.ini").read_text() == before


def test_a_pyproject_table_is_made_only_when_no_config_exists_and_dry_run_writes_nothing(tmp_path: Path) -> None:
    tree(tmp_path, {"pyproject.toml": '[project]\nname = "x"\n', "db.py": "import os\nos.environ['DATABASE_URL']\n",
                    "alembic.ini": "[alembic]\nscript_location = a\n"})
    assert main(["init", str(tmp_path), "--dry-run"]) == 0
    assert (tmp_path / "pyproject.toml").read_text() == '[project]\nname = "x"\n'
    assert main(["init", str(tmp_path)]) == 0
    import tomllib

    table = tomllib.loads((tmp_path / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert table == {"pgshard_migrate": ["alembic:alembic.ini"], "pgshard_check": ["heads"],
                     "pgshard_env": ["DATABASE_URL={url}"]}


def test_replacing_keeps_every_other_line_of_the_section() -> None:
    text = '[tool.pytest.ini_options]\ntestpaths = ["t"]\npgshard_env = [\n  "A={url}",\n]\nmarkers = ["x"]\n'
    new = configfile.place(text, True, "tool.pytest.ini_options", ['pgshard_env = ["B={url}"]'], replace=True)
    assert new == '[tool.pytest.ini_options]\ntestpaths = ["t"]\nmarkers = ["x"]\npgshard_env = ["B={url}"]\n'


def test_a_database_name_defaulted_from_the_environment_in_a_conftest(tmp_path: Path) -> None:
    found = plan(tree(tmp_path, {"conftest.py": """
        import os
        import pytest

        @pytest.fixture(scope="session")
        def db_name():
            return os.environ.get("MYLIB_TEST_DB", "mylib_test")
    """}))
    assert lines(found)["pgshard_redirect"] == ["mylib_test"]


def test_pytest_9s_native_table_is_the_one_written_into(tmp_path: Path) -> None:
    tree(tmp_path, {"pyproject.toml": '[tool.pytest]\ntestpaths = ["app"]\nstrict_xfail = true\n',
                    "db.py": "import os\nos.environ['DATABASE_URL']\n"})
    assert main(["init", str(tmp_path)]) == 0
    import tomllib

    table = tomllib.loads((tmp_path / "pyproject.toml").read_text())["tool"]["pytest"]
    assert table == {"testpaths": ["app"], "strict_xfail": True, "pgshard_env": ["DATABASE_URL={url}"]}
