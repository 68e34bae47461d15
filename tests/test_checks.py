"""Issue 15 item 7: configuration mistakes are found from the files alone (pure logic: no server, no import)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgshard import checks
from pgshard.discover import redirect_globs, url_driver
from pgshard.settings import SettingsError


def test_a_misspelled_key_is_refused_with_the_nearest_known_one() -> None:
    with pytest.raises(SettingsError, match=r"pytest.ini sets pgshard_migrates, .*did you mean pgshard_migrate\?"):
        checks.unknown_keys(["pgshard_migrates", "pgshard_env", "addopts"], "pytest.ini")
    checks.unknown_keys(["pgshard_migrate", "pgshard_lifespan", "testpaths"], "pytest.ini")


def test_pgshard_lines_in_a_file_pytest_ignores_name_the_file_it_reads(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n")
    (tmp_path / "setup.cfg").write_text("[tool:pytest]\npgshard_env = DATABASE_URL={url}\n")
    with pytest.raises(SettingsError, match=r"setup.cfg \[tool:pytest\] sets pgshard_env, but pytest reads "
                                            r"pytest.ini \[pytest\] and ignores it"):
        checks.config_files(tmp_path / "pytest.ini")


def test_a_new_pyproject_table_that_shadows_tox_ini_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tox.ini").write_text("[pytest]\nfilterwarnings = error\n")
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\npgshard_env = ["DATABASE_URL={url}"]\n')
    with pytest.raises(SettingsError, match=r"makes pytest ignore tox.ini \[pytest\] \(its filterwarnings\)"):
        checks.config_files(tmp_path / "pyproject.toml")
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    checks.config_files(tmp_path / "pyproject.toml")  # the project's own choice, not pgshard's to judge


def _module(root: Path, name: str, source: str) -> None:
    path = root.joinpath(*name.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:
        if str(parent) != ".":
            (root / parent / "__init__.py").touch()
    path.write_text(source)


def test_targets_are_checked_from_source_without_importing(tmp_path: Path) -> None:
    _module(tmp_path, "shop.database", "raise SystemExit('imported!')\n"
                                        "from sqlalchemy.orm import sessionmaker\nSessionLocal = sessionmaker()\n"
                                        "def get_db():\n    yield None\n")
    roots = [str(tmp_path)]
    checks.target("get_db", "shop.database:get_db", roots)
    checks.target("sessionmaker", "shop.database:SessionLocal", roots)
    with pytest.raises(SettingsError, match=r"pgshard_get_db = shop.database:get_bd: .*database.py defines no "
                                            r"get_bd; did you mean shop.database:get_db\?"):
        checks.target("get_db", "shop.database:get_bd", roots)
    with pytest.raises(SettingsError, match=r"pgshard_app = shop.mian:app: no module shop.mian"):
        checks.target("app", "shop.mian:app", roots)
    with pytest.raises(SettingsError, match="must look like module:attribute"):
        checks.target("app", "shop.main.app", roots)


def test_a_module_that_cannot_be_read_statically_is_left_to_the_import(tmp_path: Path) -> None:
    _module(tmp_path, "lazy", "def __getattr__(name):\n    return name\n")
    _module(tmp_path, "star", "from os.path import *\n")
    checks.target("app", "lazy:anything", [str(tmp_path)])
    checks.target("app", "star:join", [str(tmp_path)])


@pytest.mark.parametrize(("files", "scheme", "evidence"), [
    ({"requirements.txt": "fastapi\npsycopg2-binary==2.9.9\n"}, "postgresql+psycopg2", "requirements.txt: psycopg2"),
    ({"pyproject.toml": '[project]\nname = "x"\ndependencies = ["asyncpg>=0.29"]\n'}, "postgresql+asyncpg",
     "pyproject.toml: asyncpg"),
    ({".env": "DATABASE_URL=postgresql+asyncpg://u:secret@db/app\n", "requirements.txt": "psycopg2\n"},
     "postgresql+asyncpg", ".env: DATABASE_URL=postgresql+asyncpg://u:***@db/app"),
    ({"alembic.ini": "[alembic]\nsqlalchemy.url = postgresql://localhost/app\n"}, "postgresql",
     "alembic.ini: sqlalchemy.url"),
    ({"app/config.py": 'URL = "postgresql+psycopg2://localhost/app"\n'}, "postgresql+psycopg2", "app/config.py"),
    ({}, None, "no driver declared"),
])
def test_the_apps_driver_comes_from_its_own_files(tmp_path: Path, files: dict[str, str], scheme: str | None,
                                                  evidence: str) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    choice = url_driver(tmp_path, ["DATABASE_URL"], {})
    assert (choice.scheme, choice.warning) == (scheme, None)
    assert choice.evidence.startswith(evidence), choice.evidence


def test_the_environment_wins_unless_it_is_pgshards_own_url(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("psycopg2\n")
    assert url_driver(tmp_path, ["DB"], {"DB": "postgresql+asyncpg://h/app"}).scheme == "postgresql+asyncpg"
    assert url_driver(tmp_path, ["DB"], {"DB": "postgresql+psycopg://h/x?passfile=/p"}).scheme == \
        "postgresql+psycopg2"


def test_two_declared_drivers_without_a_url_warn_with_the_placeholders(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("psycopg2-binary\nasyncpg\n")
    choice = url_driver(tmp_path, ["DATABASE_URL"], {})
    assert choice.scheme is None and choice.warning is not None
    assert "{psycopg2_url}" in choice.warning and "{asyncpg_url}" in choice.warning


def test_per_worker_names_become_one_glob() -> None:
    assert redirect_globs(["test_db_gw0", "test_db_gw1", "test_db_main", "app_test"]) == ["app_test", "test_db_*"]


@pytest.mark.parametrize("password", ["p@ss:w/rd%40x", "a@b@c", "::", "x/y/z", "100%", "@", "a:b@", "/@:/%"])
def test_an_unencoded_awkward_password_is_masked_whole(password: str) -> None:
    """Issue 17 item 3: from the scheme to the last @ of the authority, in a message and alone."""
    from pgshard.settings import mask_url

    url = f"postgresql+psycopg://app:{password}@db.internal:5432/app?sslmode=disable"
    for text in (url, f"pgshard: cannot connect to {url}: refused", f"'{url}', and postgresql://u:pw@h/d"):
        masked = mask_url(text)
        assert "postgresql+psycopg://app:***@db.internal:5432/app?sslmode=disable" in masked, masked
        assert not any(part and part in masked.replace("***", "") for part in password.split("@") if len(part) > 2)
