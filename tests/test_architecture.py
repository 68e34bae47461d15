"""docs/architecture.md's table of modules and their imports is the code's: a pure check of the source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "pgshard"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return "pgshard" if name == "pgshard" else name.removeprefix("pgshard.")


def _imports(path: Path) -> set[str]:
    """pgshard modules a file imports, at its top or in a function (``pgshard`` itself for the package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            if name == "pgshard" or name.startswith("pgshard."):
                found.add("pgshard" if name == "pgshard" else name.removeprefix("pgshard."))
    return found - {_module_name(path)}


def _table() -> dict[str, set[str]]:
    rows: dict[str, set[str]] = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        match = re.fullmatch(r"\| `([\w.]+)` \| [^|]+ \|([^|]*)\|", line.strip())
        if match:
            rows[match.group(1)] = {name.strip() for name in match.group(2).split(",") if name.strip()}
    return rows


def _differences(table: dict[str, set[str]], code: dict[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    return {name: {"doc": sorted(table.get(name, {"(missing)"})), "code": sorted(code.get(name, {"(missing)"}))}
            for name in sorted(set(table) | set(code)) if table.get(name) != code.get(name)}


def _code() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in sorted(SRC.rglob("*.py"))}


def test_every_module_is_in_the_table_with_the_imports_it_has() -> None:
    wrong = _differences(_table(), _code())
    assert not wrong, f"docs/architecture.md differs from the code (fix the doc or the import): {wrong}"


def test_a_row_that_says_less_than_the_code_is_caught() -> None:
    table = _table()
    assert len(table) >= 25 and "template" in table["run"]  # the reader found the rows
    table["run"] = table["run"] - {"template"}
    del table["version"]
    assert set(_differences(table, _code())) == {"run", "version"}


def test_no_two_modules_import_each_other() -> None:
    code = _code()
    both = sorted(f"{a} <-> {b}" for a, imports in code.items() for b in imports if a < b and a in code.get(b, set()))
    assert both == []
