"""The text side of redirection (redirect.py), no SQLAlchemy events: ``pgshard_redirect``'s names and globs
(``Names``), the CREATE/DROP DATABASE statement's pattern and its identifier, a statement that fails on the
server with PostgreSQL's own kind of error (``raise_sql``), and catalog lookups by a redirected name asked
about the worker's database instead (``ask_about_target``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator
from typing import Any

from pgshard.settings import mask_url

DDL = re.compile(r"""^\s*(?P<verb>create|drop)\s+database\s+(?P<if>if\s+exists\s+)?
                      (?P<name>"(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)""", re.I | re.X)


class Names:
    """``pgshard_redirect``'s lines: exact names and shell-style globs (``test_db_*``, ``app_[0-9]``), matched
    against a whole database name; false when there are none."""

    def __init__(self, lines: Iterable[str] = ()) -> None:
        lines = [line for line in lines if line]
        self.exact = frozenset(line for line in lines if not is_glob(line))
        self.globs = tuple(line for line in lines if is_glob(line))
        self._pattern = re.compile("|".join(fnmatch.translate(g) for g in self.globs)) if self.globs else None

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name in self.exact or (self._pattern is not None and self._pattern.match(name) is not None)

    def __bool__(self) -> bool:
        return bool(self.exact or self.globs)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.exact) + list(self.globs))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Names) and (self.exact, self.globs) == (other.exact, other.globs)

    __hash__ = None  # type: ignore[assignment]


def is_glob(line: str) -> bool:
    return any(char in line for char in "*?[")


def identifier(raw: str) -> str:
    return raw[1:-1].replace('""', '"') if raw.startswith('"') else raw.lower()


def raise_sql(sqlstate: str, message: str, unless: str | None = None) -> str:
    """A statement that fails on the server with PostgreSQL's own kind of error, so the app sees the usual
    DBAPI exception (wrapped by SQLAlchemy) rather than something raised from inside an event; with
    ``unless`` (an SQL condition), only when that condition is false on the server."""
    text = mask_url(message).replace("'", "''").replace("%", "").replace("$", "")  # no paramstyle/quote clash
    raise_ = f"RAISE EXCEPTION '{text}' USING ERRCODE = '{sqlstate}';"
    body = raise_ if unless is None else f"IF NOT ({unless}) THEN {raise_} END IF;"
    return f"DO $pgshard$ BEGIN {body} END $pgshard$"


LITERAL = re.compile(r"'((?:[^']|'')*)'")


def ask_about_target(statement: str, parameters: Any, names: Names, ours: str) -> tuple[str, Any]:
    """``SELECT 1 FROM pg_database WHERE datname='app_test'`` asks about our database instead."""
    statement = LITERAL.sub(lambda m: f"'{ours}'" if m[1] in names else m[0], statement)
    if isinstance(parameters, dict):
        parameters = {k: ours if v in names else v for k, v in parameters.items()}
    elif isinstance(parameters, (list, tuple)) and parameters and not isinstance(parameters[0], (list, tuple, dict)):
        parameters = type(parameters)(ours if v in names else v for v in parameters)
    return statement, parameters
