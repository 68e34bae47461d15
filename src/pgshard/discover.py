"""What a project's own files say about how it reaches PostgreSQL: a project directory in, facts and the
evidence for each out. No pytest, no imports of the project, no writes: the plugin asks it which driver
``{url}`` must carry and which ``pgshard_redirect`` glob covers a suite's own databases; ``pgshard init``
builds its plan (init_plan.py) on these facts, among them the metadata an Alembic env.py compares.

The driver comes first from a URL the project already has (its environment, ``.env``, ``alembic.ini``, the
defaults of its settings module): that scheme is what production runs. Failing that, from the drivers its
dependencies declare (pyproject.toml, requirements files, setup.cfg), when they name exactly one.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# SQLAlchemy's driver names, by the package that provides them
PACKAGES = {"psycopg2": "psycopg2", "psycopg2-binary": "psycopg2", "psycopg": "psycopg", "psycopg-binary": "psycopg",
            "asyncpg": "asyncpg"}
DRIVER_SCHEMES = {"psycopg2": "postgresql+psycopg2", "psycopg": "postgresql+psycopg", "asyncpg": "postgresql+asyncpg"}
_SCHEME = re.compile(r"\b(postgres(?:ql)?(?:\+(?P<driver>[a-z0-9_]+))?)://", re.I)
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(?:[<>=!~;@ ]|$)")
_SKIP_DIRS = {".git", ".venv", "venv", "env", "node_modules", "__pycache__", ".tox", ".nox", "site-packages", "build",
              "dist", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_SETTINGS_FILES = {"settings.py", "config.py", "database.py", "db.py", "conf.py", "session.py", "core.py",
                   "base.py", "env.py"}


@dataclass(frozen=True)
class Evidence:
    value: str  # what was found
    source: str  # where: "alembic.ini: sqlalchemy.url = postgresql+asyncpg://..."


def clip(text: str, limit: int = 100) -> str:
    from pgshard.settings import mask_url

    text = mask_url(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scheme_of(url: str) -> str | None:
    """``postgresql+asyncpg`` from a URL (``postgres://`` counts as ``postgresql``); None if it is none."""
    match = _SCHEME.search(url)
    if match is None:
        return None
    driver = match["driver"]
    return f"postgresql+{driver.lower()}" if driver else "postgresql"


def walk(root: Path, names: set[str] | None = None, depth: int = 4) -> Iterator[Path]:
    """The project's files (not its virtualenvs, caches or builds), ``names`` only when given."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.is_dir():
            if depth > 0 and entry.name not in _SKIP_DIRS and not entry.name.startswith("."):
                yield from walk(entry, names, depth - 1)
        elif names is None or entry.name in names:
            yield entry


def existing_urls(root: Path, env_names: Sequence[str], environ: Mapping[str, str]) -> list[Evidence]:
    """URL schemes the project already uses, most telling first: its environment (the variables pgshard_env
    sets), ``.env`` files, ``alembic.ini``, then string defaults in its settings and database modules."""
    found: list[Evidence] = []
    for name in env_names:
        value = environ.get(name, "")
        if (scheme := scheme_of(value)) and "passfile=" not in value:  # not one of pgshard's own
            found.append(Evidence(scheme, f"${name} = {clip(value)}"))
    for path in [*walk(root, {".env"}, 2), root / ".env.example", root / ".env.test"]:  # walk finds ./.env too
        for line in file_lines(path):
            if (scheme := scheme_of(line)) and "=" in line:
                found.append(Evidence(scheme, f"{path.relative_to(root)}: {clip(line)}"))
    for path in walk(root, {"alembic.ini"}, 2):
        for line in file_lines(path):
            if line.strip().startswith("sqlalchemy.url") and (scheme := scheme_of(line)):
                found.append(Evidence(scheme, f"{path.relative_to(root)}: {clip(line)}"))
    for path in walk(root, _SETTINGS_FILES, 3):
        for line in file_lines(path):
            if (scheme := scheme_of(line)) and not line.lstrip().startswith("#"):
                found.append(Evidence(scheme, f"{path.relative_to(root)}: {clip(line)}"))
    return list({e.source: e for e in found}.values())


def file_lines(path: Path) -> list[str]:
    try:
        if path.is_file() and path.stat().st_size < 1_000_000:
            return path.read_text(errors="replace").splitlines()
    except OSError:
        pass
    return []


def declared_drivers(root: Path) -> list[Evidence]:
    """The PostgreSQL drivers the project's dependencies name (value: SQLAlchemy's driver name)."""
    found: list[Evidence] = []

    def add(requirement: str, source: str) -> None:
        match = _REQUIREMENT.match(requirement)
        if match and (driver := PACKAGES.get(match[1].lower().replace("_", "-"))):
            found.append(Evidence(driver, f"{source}: {clip(requirement)}"))

    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        from pgshard.checks import read_config

        data: Any = read_config(pyproject)
        project: Any = data.get("project") if isinstance(data.get("project"), dict) else {}
        for requirement in project.get("dependencies") or []:
            add(str(requirement), "pyproject.toml")
        for group in (project.get("optional-dependencies") or {}).values():
            for requirement in group:
                add(str(requirement), "pyproject.toml (optional)")
        tool: Any = data.get("tool") if isinstance(data.get("tool"), dict) else {}
        poetry: Any = tool.get("poetry") if isinstance(tool.get("poetry"), dict) else {}
        for name in poetry.get("dependencies") or {}:
            add(str(name), "pyproject.toml [tool.poetry.dependencies]")
    for path in sorted(root.glob("requirements*.txt")) + sorted(root.glob("requirements/*.txt")):
        for line in file_lines(path):
            add(line, str(path.relative_to(root)))
    setup_cfg = root / "setup.cfg"
    if setup_cfg.is_file():
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(setup_cfg)
            for line in parser.get("options", "install_requires", fallback="").splitlines():
                add(line, "setup.cfg")
        except configparser.Error:
            pass
    return found


@dataclass(frozen=True)
class DriverChoice:
    scheme: str | None  # what {url} carries: "postgresql+psycopg2"; None: undecided (psycopg 3, with a warning)
    evidence: str  # why, in a few words with the file
    warning: str | None = None  # said once, before the first test, when the choice may not be the app's


def url_driver(root: Path, env_names: Sequence[str], environ: Mapping[str, str] | None = None) -> DriverChoice:
    """The scheme ``{url}`` must carry so that the app keeps its own driver."""
    environ = os.environ if environ is None else environ
    urls = existing_urls(root, env_names, environ)
    if urls:
        return DriverChoice(urls[0].value, urls[0].source)
    drivers = declared_drivers(root)
    names = sorted({e.value for e in drivers})
    if len(names) == 1:
        return DriverChoice(DRIVER_SCHEMES[names[0]], drivers[0].source)
    if len(names) > 1:
        listed = "; ".join(e.source for e in drivers)
        return DriverChoice(None, listed, warning=(
            f"{{url}} carries psycopg 3 (postgresql+psycopg), but this project declares {', '.join(names)} ({listed}) "
            "and no URL of its own says which the app uses: name it in pgshard_env with {psycopg2_url}, "
            "{asyncpg_url}, {async_url} or {psycopg_url}"))
    return DriverChoice(None, "no driver declared: psycopg 3, pgshard's own")


_WORKER_SUFFIX = re.compile(r"^(?P<stem>.*?)(?P<worker>gw\d+|main|master|\d+)$")


def redirect_globs(names: Sequence[str]) -> list[str]:
    """``pgshard_redirect`` lines for database names a suite makes: per-worker names (``test_db_gw0``,
    ``test_db_gw1``, ``test_db_main``) become one glob (``test_db_*``), others stay as they are."""
    lines: list[str] = []
    for name in sorted(names):
        match = _WORKER_SUFFIX.match(name)
        line = f"{match['stem']}*" if match and match["stem"] and match["stem"][-1] in "_-" else name
        if line not in lines:
            lines.append(line)
    return lines


def script_location(ini: Path) -> str:
    """An Alembic ini's ``script_location`` as written ("?" when it cannot be read)."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(ini)
        return parser.get("alembic", "script_location", fallback="?")
    except configparser.Error:
        return "?"


def alembic_script_dir(ini: Path) -> Path | None:
    """An Alembic ini's script directory, read without importing Alembic (``%(here)s`` is the ini's own
    directory); None when it names none, or a ``package:path`` resource, which only Alembic resolves. An ini
    that cannot be read raises configparser's error."""
    parser = configparser.ConfigParser(defaults={"here": str(ini.parent)})
    parser.read(ini)
    location = parser.get("alembic", "script_location", fallback="")
    if location and ":" not in location.replace(str(ini.parent), ""):
        return (ini.parent / location).resolve()
    return None


def env_metadata(ini: Path, root: Path) -> Evidence | None:
    """The metadata an Alembic project's env.py gives autogenerate (its ``target_metadata``), as the
    ``module:Name`` pgshard_check's ``models:`` line takes, resolved through env.py's own absolute imports
    (``from app.models import Base`` ... ``Base.metadata``). None when env.py sets none (or None); a value of
    "" when it sets one this reading cannot resolve (a relative import, a list, a call), the source says how."""
    try:
        directory = alembic_script_dir(ini)
    except configparser.Error:
        return None
    env = directory / "env.py" if directory is not None else None
    if env is None or not env.is_file():
        return None
    try:
        tree = ast.parse(env.read_bytes(), str(env))
    except (SyntaxError, ValueError, OSError):
        return None
    imported: dict[str, str] = {}  # local name -> module path it names, "pkg.mod:Name" or "pkg.mod"
    assigned: dict[str, ast.expr] = {}
    given: ast.expr | None = None
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}:{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imported[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                    alias.name.split(".")[0]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            for name_node in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(name_node, ast.Name):
                    assigned[name_node.id] = node.value
        elif isinstance(node, ast.keyword) and node.arg == "target_metadata" and given is None:
            given = node.value
    value = given if given is not None else assigned.get("target_metadata")
    for _ in range(3):  # target_metadata=target_metadata, target_metadata = metadata, ...
        if isinstance(value, ast.Name) and value.id in assigned and value.id not in imported:
            value = assigned[value.id]
        else:
            break
    where = f"{env.relative_to(root) if env.is_relative_to(root) else env}:{getattr(value, 'lineno', '?')}"
    if value is None or (isinstance(value, ast.Constant) and value.value is None):
        return None
    text = ast.unparse(value)
    dotted = text[: -len(".metadata")] if text.endswith(".metadata") else text
    head, _, rest = dotted.partition(".")
    origin = imported.get(head)
    if not all(part.isidentifier() for part in dotted.split(".")) or origin is None:
        return Evidence("", f"{where}: target_metadata = {clip(text, 60)} (not read from an import of env.py's)")
    module, _, name = origin.partition(":")
    if rest:  # models.Base.metadata: the head is a module (or a package's module), the last part the object
        *middle, last = rest.split(".")
        module = ".".join([module, name, *middle] if name else [module, *middle])
        target = f"{module}:{last}"
    else:
        target = f"{module}:{name}" if name else ""
    if not target:
        return Evidence("", f"{where}: target_metadata = {clip(text, 60)} (a module, not a metadata)")
    return Evidence(target, f"{where}: target_metadata = {clip(text, 60)}, {dotted.split('.')[-1]} from {module}")
