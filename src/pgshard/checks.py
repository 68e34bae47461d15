"""Configuration mistakes caught when the run starts, before any server or test: each is one line that names
what to fix. Plain functions of files and strings (no pytest, nothing of the project imported), so the
controller pays a few file reads, and a check that cannot decide says nothing rather than something wrong.

- an unknown ``pgshard_*`` ini key (``pgshard_migrates``), with the nearest known one;
- ``pgshard_*`` keys in a file pytest does not read (pytest reads one config file: a ``[tool.pytest.ini_options]``
  table added to pyproject.toml silently wins over tox.ini's ``[pytest]`` and setup.cfg's ``[tool:pytest]``);
- a ``pgshard_app`` / ``pgshard_get_db`` / ``pgshard_sessionmaker`` / ``pgshard_engine`` whose module cannot
  be found or does not define the attribute (read from its source, not imported: the app's import-time
  settings must first see pgshard_env, which the workers set).
"""

from __future__ import annotations

import ast
import configparser
import difflib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pgshard.settings import OPTIONS, SettingsError

KNOWN_KEYS = frozenset(opt.ini for opt in OPTIONS if opt.ini)
TARGETS = ("app", "get_db", "sessionmaker", "engine")

# where pytest looks, in its order, and the section each file keeps its options in
CONFIG_FILES = (("pytest.ini", "pytest"), (".pytest.ini", "pytest"), ("pyproject.toml", "tool.pytest.ini_options"),
                 ("tox.ini", "pytest"), ("setup.cfg", "tool:pytest"))


def unknown_keys(keys: Iterable[str], where: str) -> None:
    """A misspelled key would be ignored (pytest only warns): refuse it with the nearest known one."""
    for key in sorted(keys):
        if key.startswith("pgshard_") and key not in KNOWN_KEYS:
            near = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
            hint = f"; did you mean {near[0]}?" if near else f"; known: {', '.join(sorted(KNOWN_KEYS))}"
            raise SettingsError(f"{where} sets {key}, which pgshard does not know{hint}")


def read_config(path: Path) -> dict[str, Any]:
    """A config file as nested dicts: TOML as tomllib reads it, an ini file as {section: {key: value}}; {} when
    it cannot be read (a file pytest would reject is pytest's to report)."""
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # Python 3.10: pytest itself depends on tomli there
                import tomli as tomllib
            data: dict[str, Any] = tomllib.loads(path.read_text())
            return data
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(path)
        return {name: dict(parser[name]) for name in parser.sections()}
    except Exception:
        return {}


def _keys(data: dict[str, Any], section: str, toml: bool) -> list[str] | None:
    table: Any = data
    for part in section.split(".") if toml else [section]:
        table = table.get(part) if isinstance(table, dict) else None
    return [k for k in table if k != "ini_options"] if isinstance(table, dict) else None


def _pytest_section(name: str, data: dict[str, Any]) -> str:
    """pytest 9 reads pyproject.toml's native ``[tool.pytest]`` table (typed values) as well as the older
    ``[tool.pytest.ini_options]``."""
    if name == "pyproject.toml" and _keys(data, "tool.pytest", True):
        return "tool.pytest"
    return dict(CONFIG_FILES).get(name, "pytest")


def section_keys(path: Path, section: str) -> list[str] | None:
    """The keys of ``section`` in a config file; None when it has no such section (or cannot be read)."""
    return _keys(read_config(path), section, path.suffix == ".toml")


def pytest_section(path: Path) -> str:
    """The section ``path`` keeps pytest's options in."""
    return _pytest_section(path.name, read_config(path))


def keys_of(inipath: Path | None) -> list[str]:
    """The option keys of the config file pytest chose (its pytest section)."""
    if inipath is None:
        return []
    data = read_config(inipath)
    return _keys(data, _pytest_section(inipath.name, data), inipath.suffix == ".toml") or []


def _label(path: Path, section: str) -> str:
    return f"{path.name} [{section}]"


def config_files(inipath: Path | None) -> None:
    """pgshard's lines must be in the file pytest reads. Two mistakes, each one line: pgshard keys in a file
    beside it that pytest ignores, and a ``[tool.pytest.ini_options]`` table that holds pgshard's keys and
    thereby makes pytest ignore the project's tox.ini or setup.cfg (their filterwarnings, markers...)."""
    if inipath is None:
        return
    directory, chosen = inipath.parent, inipath.name
    chosen_section = pytest_section(inipath)
    chosen_keys = keys_of(inipath)
    for name, _ in CONFIG_FILES:
        path = directory / name
        if name == chosen or not path.is_file():
            continue
        data = read_config(path)  # each file read once
        section = _pytest_section(name, data)
        keys = _keys(data, section, path.suffix == ".toml")
        if keys is None:
            continue
        ours = sorted(k for k in keys if k.startswith("pgshard_"))
        if ours:
            raise SettingsError(f"{_label(path, section)} sets {', '.join(ours)}, but pytest reads "
                                f"{_label(inipath, chosen_section)} and ignores it: move those lines there")
        if chosen == "pyproject.toml" and name in ("tox.ini", "setup.cfg") and any(
                k.startswith("pgshard_") for k in chosen_keys):
            raise SettingsError(f"pyproject.toml's [tool.pytest.ini_options] holds pgshard's lines and makes pytest "
                                f"ignore {_label(path, section)} (its {', '.join(sorted(keys)[:3]) or 'options'}): "
                                f"put the pgshard lines in {_label(path, section)} and remove the table from "
                                "pyproject.toml")


def _find_module(name: str, roots: Sequence[str]) -> tuple[Path | None, bool]:
    """The source file of module ``name`` (None for a package without __init__ or a compiled one) and whether
    it was found at all, without importing it: a top-level name through the project's roots, then the
    interpreter's finders (an editable install), each further part inside the package found so far."""
    parts = name.split(".")
    spec = importlib.machinery.PathFinder.find_spec(parts[0], [*roots, *sys.path])
    if spec is None:
        try:
            spec = importlib.util.find_spec(parts[0])  # a top-level name: nothing is imported
        except (ImportError, ValueError):
            spec = None
    for part in parts[1:]:
        if spec is None or not spec.submodule_search_locations:
            return None, False
        spec = importlib.machinery.PathFinder.find_spec(part, list(spec.submodule_search_locations))
    if spec is None:
        return None, False
    origin = Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    return origin, True


def _top_level_names(tree: ast.Module) -> set[str] | None:
    """Names a module defines at its top level (into if/try/with blocks); None when it cannot tell (a star
    import, a module ``__getattr__``)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> bool:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name == "__getattr__":
                    return False
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.name == "*":
                        return False
                    names.add((alias.asname or alias.name).split(".")[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
                blocks += [handler.body for handler in getattr(node, "handlers", [])]
                if not all(visit(block) for block in blocks):
                    return False
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.NamedExpr):
                names.add(node.value.target.id)
        return True

    return names if visit(tree.body) else None


def target(option: str, value: str, roots: Sequence[str]) -> None:
    """``module:attribute`` that names something the module defines; else one line naming the option."""
    module, _, attr = value.partition(":")
    if not module or not attr:
        raise SettingsError(f"pgshard_{option} must look like module:attribute, got {value!r}")
    try:
        source, found = _find_module(module, roots)
    except Exception:  # a finder that cannot answer: the import at first use will tell
        return
    if not found:
        raise SettingsError(f"pgshard_{option} = {value}: no module {module} under the rootdir, pytest's "
                            "pythonpath or the installed packages (add the project's directory to pythonpath?)")
    if source is None:
        return
    try:
        names = _top_level_names(ast.parse(source.read_bytes(), str(source)))
    except (SyntaxError, OSError, ValueError):
        return  # the import will show the error with its line
    first = attr.split(".")[0]
    if names is not None and first not in names:
        near = difflib.get_close_matches(first, sorted(names), n=1)
        hint = f"; did you mean {module}:{near[0]}?" if near else ""
        raise SettingsError(f"pgshard_{option} = {value}: {source} defines no {first}{hint}")
