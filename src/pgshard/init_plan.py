"""What ``pgshard init`` proposes for a project (``plan``): every line it writes into the pytest config, each
with the evidence it came from (the project's settings names, app objects, seed and wait commands, its own
CREATE/DROP DATABASE), and what it could not decide. Built on discover.py's facts; no imports of the project,
no writes.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgshard.discover import Evidence, clip, env_metadata, file_lines, redirect_globs, script_location, url_driver, walk


@dataclass
class Line:
    key: str  # an ini key the README documents: pgshard_migrate, pgshard_env, ...
    values: list[str]  # one for a plain key, several for a line list
    evidence: list[str]  # where each fact came from


@dataclass
class Plan:
    config: Path  # the file pytest reads (or will, once the table is made)
    section: str  # its pytest section
    exists: bool  # False: init makes the table or file
    lines: list[Line]
    needs: list[str]  # what it could not decide, and what to add by hand


_URL_FIELD = re.compile(r"^(?:[a-z0-9]+_+)*(?:database|db|sql|sqlalchemy|postgres|pg|postgresql)(?:_+[a-z0-9]+)*_+"
                        r"(?:url|uri|dsn)$|^(?:database|db)_?(?:url|uri|dsn)$", re.I)
_PARTS = {  # placeholder: the field names apps give it
    "host": ("postgres_server", "postgres_host", "db_host", "database_host", "pg_host", "db_server"),
    "port": ("postgres_port", "db_port", "database_port", "pg_port"),
    "user": ("postgres_user", "db_user", "database_user", "pg_user", "db_username", "database_username"),
    "password": ("postgres_password", "db_password", "database_password", "pg_password", "db_pass"),
    "dbname": ("postgres_db", "db_name", "database_name", "pg_database", "postgres_database", "db_database"),
}
_SEED = re.compile(r"(seed|initial_data|init_db|initdb|populate|fixtures|load_data|bootstrap)", re.I)
_WAIT = re.compile(r"(pre_start|prestart|wait|healthcheck)", re.I)
_DDL_TEXT = re.compile(r"\b(?:create|drop)\s+database\s+(?:if\s+(?:not\s+)?exists\s+)?\"?([A-Za-z_][\w$]*|\*)", re.I)
_UTILS_CALLS = {"create_database", "drop_database", "database_exists"}
_DB_NAME_VAR = re.compile(r"(?:^|_)(?:DB|DATABASE|DB_?NAME)$", re.I)
_COMMAND_FILES = ("Makefile", "makefile", "justfile", "tox.ini", "noxfile.py", "docker-compose.yml",
                  "docker-compose.yaml", "compose.yml", "compose.yaml", "docker-compose.test.yml", "Procfile")


def _py_files(root: Path) -> list[Path]:
    return [p for p in walk(root, None, 5) if p.suffix == ".py"]


def _parse(path: Path) -> Any:

    try:
        return ast.parse(path.read_bytes(), str(path))
    except (SyntaxError, ValueError, OSError):
        return None


def _module_name(root: Path, path: Path) -> str | None:
    """``app.core.db`` for ``app/core/db.py`` when every directory between is importable from the root (or a
    ``src/`` layout); None for scripts outside a package."""
    relative = path.relative_to(root)
    parts = list(relative.with_suffix("").parts)
    if parts and parts[0] == "src":
        parts = parts[1:]
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) if parts and all(p.isidentifier() for p in parts) else None


def _settings_names(root: Path, trees: Mapping[Path, Any]) -> tuple[list[Evidence], list[Evidence]]:
    """Env var names the project's settings read: (URL names, part names as ``placeholder=NAME``)."""

    urls: list[Evidence] = []
    parts: list[Evidence] = []
    classes: dict[str, tuple[str, str, dict[str, str], Path]] = {}  # settings: prefix, nested delimiter, fields
    models: dict[str, dict[str, str]] = {}  # every class: its annotated fields and their types
    reads: list[tuple[str, Path]] = []
    for path, tree in trees.items():
        if tree is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                fields = {n.target.id: _name_of(n.annotation) for n in node.body if isinstance(n, ast.AnnAssign)
                          and isinstance(n.target, ast.Name)}
                models[node.name] = fields
                if any(_name_of(b).endswith(("BaseSettings", "Settings")) for b in node.bases):
                    classes[node.name] = (_config_value(node, "env_prefix"),
                                          _config_value(node, "env_nested_delimiter"), fields, path)
            elif isinstance(node, ast.Call) and _name_of(node.func) in ("os.getenv", "getenv", "os.environ.get",
                                                                         "environ.get") and node.args:
                if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    reads.append((node.args[0].value, path))
            elif isinstance(node, ast.Subscript) and _name_of(node.value) in ("os.environ", "environ"):
                key = node.slice
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    reads.append((key.value, path))
    for prefix, delimiter, fields, path in classes.values():
        how = f"pydantic settings{', env_prefix ' + repr(prefix) if prefix else ''}"
        for field_name, annotation in fields.items():
            _classify((prefix + field_name).upper(), f"{path.relative_to(root)}: {field_name} ({how})", urls, parts)
            for inner in models.get(annotation, {}) if delimiter else {}:  # a nested model: PREFIX_DB__URL
                env = f"{prefix}{field_name}{delimiter}{inner}".upper()
                _classify(env, f"{path.relative_to(root)}: {field_name}.{inner} ({how}, env_nested_delimiter "
                               f"{delimiter!r})", urls, parts)
    for name, path in reads:
        _classify(name, f"{path.relative_to(root)}: reads ${name}", urls, parts)
    for path in [root / ".env", root / ".env.example", root / ".env.test"]:
        for line in file_lines(path):
            name = line.split("=", 1)[0].strip().removeprefix("export ").strip()
            if "=" in line and name.isidentifier():
                _classify(name, f"{path.name}: {name}=...", urls, parts)
    return _unique(urls), _unique(parts)


def _unique(found: list[Evidence]) -> list[Evidence]:
    seen: dict[str, Evidence] = {}
    for item in found:
        seen.setdefault(item.value, item)
    return list(seen.values())


def _classify(env: str, source: str, urls: list[Evidence], parts: list[Evidence]) -> None:
    lower = env.lower()
    if _URL_FIELD.match(lower) and "test" not in lower and "redis" not in lower:
        urls.append(Evidence(env, source))
        return
    for placeholder, names in _PARTS.items():
        if lower in names or any(lower.endswith("_" + n) for n in names):
            parts.append(Evidence(f"{placeholder}={env}", source))


def _config_value(node: Any, key: str) -> str:
    """A pydantic settings class's ``env_prefix`` or ``env_nested_delimiter`` (model_config or an inner
    Config), else ''."""

    for item in ast.walk(node):
        if isinstance(item, ast.keyword) and item.arg == key and isinstance(item.value, ast.Constant):
            return str(item.value.value)
        if isinstance(item, ast.Assign) and any(isinstance(t, ast.Name) and t.id == key
                                                for t in item.targets) and isinstance(item.value, ast.Constant):
            return str(item.value.value)
        if isinstance(item, ast.Dict):  # model_config = {"env_prefix": "APP_"}
            for k, v in zip(item.keys, item.values, strict=False):
                if isinstance(k, ast.Constant) and k.value == key and isinstance(v, ast.Constant):
                    return str(v.value)
    return ""


def _name_of(node: Any) -> str:

    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name_of(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return _name_of(node.func)
    return ""


def _objects(root: Path, trees: Mapping[Path, Any]) -> dict[str, Evidence]:
    """``app`` (a FastAPI instance), ``get_db`` (a generator dependency yielding a session), ``sessionmaker``
    and ``engine``, as ``module:attribute`` of the project's own modules (not its tests)."""

    found: dict[str, Evidence] = {}
    for path, tree in trees.items():
        if "tests" in path.relative_to(root).parts or path.name.startswith(("test_", "conftest")):
            continue
        module = _module_name(root, path)
        if module is None or tree is None:
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                called = _name_of(node.value) if isinstance(node.value, ast.Call) else ""
                kind = {"FastAPI": "app", "fastapi.FastAPI": "app", "sessionmaker": "sessionmaker",
                        "async_sessionmaker": "sessionmaker", "create_engine": "engine",
                        "create_async_engine": "engine"}.get(called.rsplit(".", 1)[-1] if called else "")
                if kind and kind not in found:
                    name = node.targets[0].id
                    found[kind] = Evidence(f"{module}:{name}",
                                           f"{path.relative_to(root)}:{node.lineno}: {name} = {called}(...)")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "get_db" not in found and \
                    node.name in ("get_db", "get_session", "get_db_session", "get_async_session", "db_session") and \
                    any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in ast.walk(node)):
                where = f"{path.relative_to(root)}:{node.lineno}"
                found["get_db"] = Evidence(f"{module}:{node.name}", f"{where}: def {node.name}() yields a session")
    return found


def _own_session_fixture(root: Path, trees: Mapping[Path, Any]) -> str | None:
    """A conftest fixture that opens a session of its own (``Session(engine)``, ``SessionLocal()``) and commits:
    the suite checks through it, so pgshard_app's rolled-back requests would hide their writes from it."""

    for path, tree in trees.items():
        if tree is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    _name_of(d).endswith("fixture") for d in node.decorator_list):
                calls = {_name_of(n.func).rsplit(".", 1)[-1] for n in ast.walk(node) if isinstance(n, ast.Call)}
                if calls & {"Session", "AsyncSession", "SessionLocal", "sessionmaker"} and "commit" in calls:
                    return f"{path.relative_to(root)}:{node.lineno}: fixture {node.name} opens its own session"
    return None


def _commands(root: Path) -> list[Evidence]:
    """Lines of the project's pre-test machinery that run a migration or a seed script: prestart scripts,
    Makefile and justfile targets, CI workflow steps, docker-compose commands, tox commands."""
    sources = [p for p in walk(root, None, 3) if p.suffix == ".sh" or p.name in _COMMAND_FILES]
    workflows = root / ".github" / "workflows"
    if workflows.is_dir():
        sources += sorted(p for p in workflows.iterdir() if p.suffix in (".yml", ".yaml"))
    found: list[Evidence] = []
    for path in sources + [p for p in (root / "README.md", root / "CONTRIBUTING.md") if p.is_file()]:
        for line in _command_lines(path):
            text = re.sub(r"^[\w-]+:\s*", "", line.strip().lstrip("-").strip())  # a YAML key: run:, command:
            text = re.sub(r"^(?:ba)?sh -c\s+", "", text).strip("'\"")
            for piece in re.split(r"\s*(?:&&|;|\|\|)\s*", text):
                piece = piece.strip()
                if re.match(r"^(?:uv run |poetry run |pipenv run )?(?:python -m )?alembic\b.*\bupgrade\b", piece):
                    found.append(Evidence("alembic", f"{path.relative_to(root)}: {clip(piece)}"))
                elif (m := re.match(r"^(?:uv run |poetry run |pipenv run )?python3? (?:-m )?(\S+)", piece)) and \
                        _SEED.search(m[1]) and not _WAIT.search(m[1]):
                    found.append(Evidence(m[1], f"{path.relative_to(root)}: {clip(piece)}"))
    return found


def _command_lines(path: Path) -> list[str]:
    """The lines that may be commands: every line of a script or config; of a Markdown file, the lines of its
    fenced code blocks and its inline code spans (`python scripts/seed.py`)."""
    lines = file_lines(path)
    if path.suffix != ".md":
        return lines
    out: list[str] = []
    fenced = False
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            out.append(line)
        else:
            out += re.findall(r"`([^`]+)`", line)
    return out


def _seed_command(root: Path, target: str) -> str | None:
    """``python scripts/seed.py`` / ``python -m app.initial_data`` when that file exists in the project."""
    if target.endswith(".py"):
        return f"python {target}" if (root / target).is_file() else None
    module = root.joinpath(*target.split("."))
    if module.with_suffix(".py").is_file() or (module / "__main__.py").is_file():
        return f"python -m {target}"
    if (src := root / "src").is_dir() and src.joinpath(*target.split(".")).with_suffix(".py").is_file():
        return f"python -m {target}"
    return None


def _redirects(root: Path, trees: Mapping[Path, Any]) -> list[Evidence]:
    """Database names a suite hard-codes, creates or drops: CREATE/DROP DATABASE text, sqlalchemy-utils
    calls, URLs naming a database, per-worker f-strings (``f"test_{worker_id}"`` becomes ``test_*``)."""

    found: list[Evidence] = []
    for path, tree in trees.items():
        if tree is None:
            continue
        where = str(path.relative_to(root))
        for node in ast.walk(tree):
            text = _text_of(node)
            if text is None or not hasattr(node, "lineno"):
                continue
            for match in _DDL_TEXT.finditer(text):
                found.append(Evidence(match[1], f"{where}:{node.lineno}: {clip(text)}"))
            if (url := re.search(r"postgres(?:ql)?(?:\+\w+)?://[^\s'\"]*/([\w*]+)", text)) and url[1]:
                found.append(Evidence(url[1], f"{where}:{node.lineno}: {clip(text)}"))
            if isinstance(node, ast.JoinedStr) and re.search(r"(gw|worker|xdist)", ast.unparse(node), re.I) and \
                    re.fullmatch(r"[a-z_][\w*]*\*[\w*]*", text, re.I) and text.count("*") == 1:
                found.append(Evidence(text, f"{where}:{node.lineno}: {clip(ast.unparse(node))} (per worker)"))
        for node in ast.walk(tree):  # os.environ.get("TEST_DB", "app_test"): the default names the database
            if isinstance(node, ast.Call) and _name_of(node.func) in ("os.environ.get", "os.getenv", "environ.get",
                                                                       "getenv") and len(node.args) == 2 and \
                    all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args) and \
                    _DB_NAME_VAR.search(str(node.args[0].value)) and str(node.args[1].value).isidentifier():  # type: ignore[attr-defined]
                found.append(Evidence(str(node.args[1].value),  # type: ignore[attr-defined]
                                      f"{where}:{node.lineno}: {clip(ast.unparse(node))}"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name_of(node.func).rsplit(".", 1)[-1] in _UTILS_CALLS:
                found.append(Evidence("(sqlalchemy-utils)", f"{where}:{node.lineno}: {clip(ast.unparse(node))}"))
    names = [e for e in found if e.value not in MAINTENANCE and e.value != "(sqlalchemy-utils)"]
    return _unique(names) if names else []


MAINTENANCE = {"postgres", "template0", "template1", "*"}


def _text_of(node: Any) -> str | None:
    """A string constant's text, or an f-string's with ``*`` for each placeholder."""

    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(str(v.value) if isinstance(v, ast.Constant) else "*" for v in node.values)
    return None


def config_file(root: Path) -> tuple[Path, str, bool]:
    """The file pytest reads its options from in ``root`` (its order), its section, and whether that section
    exists; without one, pyproject.toml's ``[tool.pytest.ini_options]`` (made by init) or a new pytest.ini."""
    from pgshard.checks import CONFIG_FILES, pytest_section, section_keys

    for name, _ in CONFIG_FILES:
        path = root / name
        section = pytest_section(path) if path.is_file() else ""
        if path.is_file() and (name in ("pytest.ini", ".pytest.ini") or section_keys(path, section) is not None):
            return path, section, True
    if (root / "pyproject.toml").is_file():
        return root / "pyproject.toml", "tool.pytest.ini_options", False
    return root / "pytest.ini", "pytest", False


def _checks(root: Path, ini: Path, needs: list[str]) -> Line:
    """pgshard_check for an Alembic project: ``heads`` always, ``models:`` when env.py's target_metadata reads
    as an import (downgrade is left to the user: it runs every revision's downgrade, a cost to choose)."""
    checks, evidence = ["heads"], [f"{ini.relative_to(root)}: the template is built by Alembic migrations"]
    target = env_metadata(ini, root)
    if target is not None and target.value:
        checks.append(f"models:{target.value}")
        evidence.append(target.source)
    elif target is not None:
        needs.append(f"pgshard_check: add models:pkg.models:Base naming the metadata of {target.source}, to "
                     "check the models against the migrated template")
    return Line("pgshard_check", checks, evidence)


def plan(root: Path) -> Plan:
    """Every pgshard line this project needs, with its evidence; what it cannot decide goes to ``needs``."""
    root = root.resolve()
    config, section, exists = config_file(root)
    trees = {path: _parse(path) for path in _py_files(root)}  # each module parsed once, for every question
    conftests = {path: tree for path, tree in trees.items()
                 if path.name == "conftest.py" or (path.name.startswith("test") and "settings" in path.name)}
    lines: list[Line] = []
    needs: list[str] = []

    steps: list[str] = []
    evidence: list[str] = []
    commands = _commands(root)
    alembic_inis = [p for p in walk(root, {"alembic.ini"}, 2)]
    if alembic_inis:
        ini = alembic_inis[0]
        steps.append(f"alembic:{ini.relative_to(root)}")
        evidence.append(f"{ini.relative_to(root)} (script_location {script_location(ini)})")
        evidence += [e.source for e in commands if e.value == "alembic"][:1]
    for command in commands:
        step = _seed_command(root, command.value) if command.value != "alembic" else None
        if step and f"command:{step}" not in steps:
            steps.append(f"command:{step}")
            evidence.append(command.source)
    if steps:
        lines.append(Line("pgshard_migrate", steps, evidence))
    else:
        needs.append("no Alembic config nor migration command found: add pgshard_migrate (alembic:, metadata:"
                     "pkg.models:Base, sql:dir/, command:...) unless the suite builds its schema itself")
    if alembic_inis:
        lines.append(_checks(root, alembic_inis[0], needs))

    urls, parts = _settings_names(root, trees)
    env: list[str] = []
    env_evidence: list[str] = []
    if urls:
        name = urls[0].value
        choice = url_driver(root, [name])
        env.append(f"{name}={{url}}")
        env_evidence += [urls[0].source, f"{{url}} carries {choice.scheme or 'postgresql+psycopg'}: {choice.evidence}"]
        if choice.warning:
            needs.append(choice.warning)
    elif parts:
        by_placeholder: dict[str, Evidence] = {}
        for item in parts:
            by_placeholder.setdefault(item.value.split("=", 1)[0], item)
        for placeholder in ("host", "port", "user", "password", "dbname"):
            if placeholder in by_placeholder:
                env.append(f"{by_placeholder[placeholder].value.split('=', 1)[1]}={{{placeholder}}}")
                env_evidence.append(by_placeholder[placeholder].source)
        if "dbname" not in by_placeholder:
            needs.append("the settings read a host and user but no database name: add NAME={dbname} to pgshard_env")
    redirects = _redirects(root, conftests)
    if env:
        lines.append(Line("pgshard_env", env, env_evidence))
    elif not redirects:
        needs.append("no setting that names the database found (DATABASE_URL, POSTGRES_DB...): add "
                     "pgshard_env = NAME={url} for the variable the app reads")
    if redirects:
        globbed = redirect_globs([e.value for e in redirects if "*" not in e.value])
        globs = list(dict.fromkeys([*(e.value for e in redirects if "*" in e.value), *globbed]))
        lines.append(Line("pgshard_redirect", globs, [e.source for e in redirects]))

    objects = _objects(root, trees)
    own = _own_session_fixture(root, conftests)
    if "app" in objects and "get_db" in objects and own is None:
        for key, kind in (("pgshard_app", "app"), ("pgshard_get_db", "get_db")):
            lines.append(Line(key, [objects[kind].value], [objects[kind].source]))
        if "sessionmaker" in objects:
            maker = objects["sessionmaker"]
            lines.append(Line("pgshard_sessionmaker", [maker.value], [maker.source]))
    elif own is not None and "app" in objects:
        needs.append(f"left out pgshard_app and pgshard_get_db: {own}, and would not see the writes of the app's "
                     "rolled-back requests; the suite commits for real on its worker's own clone instead")
    return Plan(config, section, exists, lines, needs)

