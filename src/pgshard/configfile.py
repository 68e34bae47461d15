"""pgshard's lines in the pytest config file a project already has: rendered in that file's own syntax (TOML
for pyproject.toml, ini elsewhere) and put into its pytest section, the rest of the file kept byte for byte.
Pure text in, text out: ``pgshard init`` (cli.py) reads and writes the file. And which file and keys pytest
itself would read (``find_ini``), for the ``pgshard`` command's settings.
"""

from __future__ import annotations

import configparser
import importlib
import json
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any


class ConfigFileError(ValueError):
    """The file cannot take the lines as asked (pgshard lines already there); the message says what to do."""


def render(toml: bool, lines: Sequence[tuple[str, list[str]]], line_lists: Collection[str]) -> list[str]:
    """``key = value`` lines: TOML strings and arrays, or ini values and indented line lists (the keys in
    ``line_lists``: a TOML array even of one value, which pytest reads as a line list)."""
    out: list[str] = []
    for key, values in lines:
        if toml:
            value = json.dumps(values) if key in line_lists else json.dumps(values[0])
            out.append(f"{key} = {value}")
        elif key in line_lists and len(values) > 1:
            out.append(f"{key} =")
            out += [f"    {value}" for value in values]
        else:
            out.append(f"{key} = {values[0]}")
    return out


def _header(toml: bool, section: str) -> re.Pattern[str]:
    name = re.escape(section)
    return re.compile(rf"^\s*\[\s*{name}\s*\]\s*$")


def _section_span(text_lines: list[str], toml: bool, section: str) -> tuple[int, int] | None:
    """[start, end) of the section's body lines (after its header), or None when it has no header."""
    header = _header(toml, section)
    for i, line in enumerate(text_lines):
        if header.match(line):
            end = i + 1
            while end < len(text_lines) and not re.match(r"^\s*\[", text_lines[end]):
                end += 1
            return i + 1, end
    return None


def _drop_pgshard_keys(body: list[str], toml: bool) -> list[str]:
    """The section's lines without its pgshard_* keys (their continuation lines and TOML arrays included)."""
    out: list[str] = []
    skipping = False
    depth = 0
    for line in body:
        if skipping:
            if toml:
                depth += line.count("[") - line.count("]")
                if depth <= 0:
                    skipping = False
                continue
            if line[:1] in (" ", "\t") and line.strip():
                continue
            skipping = False
        if re.match(r"^\s*pgshard_\w+\s*=", line):
            skipping = True
            if toml:
                value = line.split("=", 1)[1]
                depth = value.count("[") - value.count("]")
                skipping = depth > 0
            continue
        out.append(line)
    return out


def has_pgshard_keys(text: str, toml: bool, section: str) -> list[str]:
    lines = text.splitlines()
    span = _section_span(lines, toml, section)
    if span is None:
        return []
    return [m[1] for line in lines[span[0]:span[1]] if (m := re.match(r"^\s*(pgshard_\w+)\s*=", line))]


def place(text: str, toml: bool, section: str, rendered: Sequence[str], *, replace: bool = False) -> str:
    """``text`` with ``rendered`` at the end of ``section`` (made at the end of the file when missing). pgshard
    keys already there are refused, unless ``replace``: then they are taken out first."""
    lines = text.splitlines()
    existing = has_pgshard_keys(text, toml, section)
    if existing and not replace:
        raise ConfigFileError(f"[{section}] already has {', '.join(existing)}: pass --replace to write them anew")
    span = _section_span(lines, toml, section)
    if span is None:
        head = lines[:]
        while head and not head[-1].strip():
            head.pop()
        block = [*head, *([""] if head else []), f"[{section}]", *rendered]
        return "\n".join(block) + "\n"
    start, end = span
    body = _drop_pgshard_keys(lines[start:end], toml)
    tail_blank = 0
    while body and not body[-1].strip():
        body.pop()
        tail_blank += 1
    new = [*lines[:start], *body, *rendered, *([""] * tail_blank if end < len(lines) else []), *lines[end:]]
    return "\n".join(new) + "\n"


# -- reading: the pytest configuration pytest itself would pick ---------------------------------------------
def _toml(path: Path) -> dict[str, Any] | None:
    try:
        toml: Any = importlib.import_module("tomllib")
    except ImportError:  # Python 3.10: pytest itself depends on tomli there
        try:
            toml = importlib.import_module("tomli")
        except ImportError:
            return None
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = toml.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigFileError(f"cannot read {path}: {exc}") from None
    return data


def _ini_section(path: Path, section: str) -> dict[str, str] | None:
    parser = configparser.RawConfigParser()  # raw: a URL's %40 must not be interpolated
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, configparser.Error) as exc:
        raise ConfigFileError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    return dict(parser.items(section)) if parser.has_section(section) else None


def find_ini(start: Path) -> tuple[Path | None, dict[str, Any]]:
    """The pytest configuration pytest itself would pick (from ``start`` upwards, first match wins):
    pytest.ini, .pytest.ini, pyproject.toml with [tool.pytest.ini_options] or [tool.pytest], tox.ini
    with [pytest], setup.cfg with [tool:pytest]. Returns (its directory, its keys)."""
    for directory in (start, *start.parents):
        for name in ("pytest.ini", ".pytest.ini"):
            if (directory / name).is_file():
                return directory, _ini_section(directory / name, "pytest") or {}
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file():
            data = _toml(pyproject)
            tool = (data or {}).get("tool", {}).get("pytest")
            if isinstance(tool, dict):
                options = tool.get("ini_options", tool)
                if isinstance(options, dict):
                    return directory, options
        for name, section in (("tox.ini", "pytest"), ("setup.cfg", "tool:pytest")):
            if (directory / name).is_file():
                found = _ini_section(directory / name, section)
                if found is not None:
                    return directory, found
    return None, {}
