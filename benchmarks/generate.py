"""Write the benchmark's project into a work directory: app package, Alembic revisions, seed, tests.

Output is deterministic and files are rewritten only when their content changes, so a rerun keeps
pytest's bytecode cache and pgshard's template fingerprint (a hash of the revisions) valid.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from string import Template

from benchmarks import schema, templates
from benchmarks.schema import Column, Table

TESTS_PER_FILE = 25


@dataclass(frozen=True)
class Project:
    root: Path
    tests: tuple[str, ...]  # node ids of the main suite, in order
    commit_tests: tuple[str, ...]  # node ids of the db_commit suite
    isolation_tests: tuple[str, ...] = ()  # node ids of the isolation probes (run shuffled)

    @property
    def plain_ini(self) -> Path:
        return self.root / "plain.ini"


# -- models and revisions ----------------------------------------------------------------------------------
_PY_TYPES = {"str": "str", "text": "str", "int": "int", "num": "Decimal", "bool": "bool", "ts": "datetime",
             "fk": "int"}


def _model_column(col: Column) -> str:
    args = {"str": [f"String({col.length})"], "text": ["Text"], "int": ["Integer"], "num": ["Numeric(12, 2)"],
            "bool": ["Boolean", "server_default=true()"], "fk": [f'ForeignKey("{col.target}.id")'],
            "ts": ["DateTime(timezone=True)", "server_default=func.now()"]}[col.kind]
    if col.unique:
        args.append("unique=True")
    annotation = _PY_TYPES[col.kind] + (" | None" if col.nullable else "")
    return f"    {col.name}: Mapped[{annotation}] = mapped_column({', '.join(args)})"


def render_models(tables: list[Table]) -> str:
    lines = [templates.HEADER.rstrip("\n"), "", "from datetime import datetime", "from decimal import Decimal", "",
             "from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, Numeric, String, Text, func, true",
             "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column", "", "",
             "class Base(DeclarativeBase):", "    pass"]
    for table in tables:
        lines += ["", "", f"class {table.cls}(Base):", f'    __tablename__ = "{table.name}"']
        indexes = [f'Index("{name}", {", ".join(repr(c) for c in cols)})'
                   for name, (owner, cols) in schema.LATE_INDEXES.items() if owner == table.name]
        if indexes:
            lines.append(f"    __table_args__ = ({', '.join(indexes)},)")
        lines.append("    id: Mapped[int] = mapped_column(primary_key=True)")
        columns = list(table.columns)
        if table.name in schema.LATE_COLUMNS:
            columns.append(schema.parse_column(schema.LATE_COLUMNS[table.name]))
        lines += [_model_column(col) for col in columns]
    return "\n".join(lines) + "\n"


def _op_column(col: Column) -> str:
    kind = {"str": f"sa.String(length={col.length})", "text": "sa.Text()", "int": "sa.Integer()",
            "num": "sa.Numeric(12, 2)", "bool": "sa.Boolean()", "ts": "sa.DateTime(timezone=True)",
            "fk": f'sa.Integer(), sa.ForeignKey("{col.target}.id")'}[col.kind]
    extra = {"bool": ", server_default=sa.true()", "ts": ", server_default=sa.func.now()"}.get(col.kind, "")
    unique = ", unique=True" if col.unique else ""
    return f'sa.Column("{col.name}", {kind}, nullable={col.nullable}{unique}{extra})'


def _revision_body(number: int, tables: list[Table]) -> tuple[str, str, str]:
    """(upgrade, downgrade, comment) of revision ``number``."""
    if number <= 3:
        mine = [t for t in tables if t.revision == number]
        up = [f'    op.create_table(\n        "{t.name}",\n        sa.Column("id", sa.Integer(), primary_key=True),\n'
              + "".join(f"        {_op_column(c)},\n" for c in t.columns) + "    )" for t in mine]
        down = [f'    op.drop_table("{t.name}")' for t in reversed(mine)]
        return "\n".join(up), "\n".join(down), ""
    if number == 4:
        up = [f'    op.add_column("{t}", {_op_column(schema.parse_column(c))})' for t, c in schema.LATE_COLUMNS.items()]
        up += [f'    op.create_index("{name}", "{owner}", {list(cols)!r})'
               for name, (owner, cols) in schema.LATE_INDEXES.items()]
        down = [f'    op.drop_index("{name}", table_name="{owner}")'
                for name, (owner, _) in schema.LATE_INDEXES.items()]
        down += [f'    op.drop_column("{t}", "{c.split(":")[0]}")' for t, c in schema.LATE_COLUMNS.items()]
        return "\n".join(up), "\n".join(down), ""
    # The seed lives in benchapp/seed.py; its hash here makes pgshard's template fingerprint follow it.
    digest = hashlib.sha256(render_seed().encode()).hexdigest()[:16]
    return ("    from benchapp.seed import seed\n\n    seed(op.get_bind())",
            "\n".join(f'    op.execute("DELETE FROM {name}")' for name in reversed(list(schema.SEED))),
            f"\n# seed module fingerprint: {digest}\n")


def render_revision(number: int, tables: list[Table]) -> str:
    up, down, comment = _revision_body(number, tables)
    down_rev = f"{number - 1:04d}" if number > 1 else None
    return Template(templates.REVISION).substitute(
        title=schema.REVISIONS[number], rev=f"{number:04d}", down=down_rev or "", down_repr=repr(down_rev),
        comment=comment, upgrade=up, downgrade=down)


def render_seed() -> str:
    seed = schema.SEED
    functions = (schema.country_code, schema.product_category, schema.coupon_active)
    formulas = "\n\n".join([f"SEED = {seed!r}\n"] + [inspect.getsource(func) for func in functions])
    return Template(templates.SEED_MODULE).substitute(
        formulas=formulas, role_names=repr(schema.ROLES), **{k: str(v) for k, v in seed.items()})


# -- tests -------------------------------------------------------------------------------------------------------
def _values(i: int) -> dict[str, object]:
    products = schema.SEED["products"]
    p1 = i * 7 % products + 1
    p2 = p1 % products + 1
    p3 = p2 % products + 1
    category = i % schema.SEED["categories"] + 1
    country = i % schema.SEED["countries"]
    return {"i": i, "p1": min(p1, p2, p3), "p2": sorted((p1, p2, p3))[1], "p3": max(p1, p2, p3),
            "category": category, "in_category": schema.products_in_category(category),
            "country": country + 1, "country_code": schema.country_code(country),
            "role": schema.ROLES[i % len(schema.ROLES)], "active_coupons": schema.active_seed_coupons()}


def render_tests(size: int) -> tuple[dict[str, str], list[str]]:
    kinds = list(templates.KINDS.items())
    files: dict[str, list[str]] = {}
    nodeids = []
    for i in range(size):
        kind, source = kinds[i % len(kinds)]
        path = f"tests/test_suite_{i // TESTS_PER_FILE:03d}.py"
        files.setdefault(path, [templates.TEST_MODULE_HEAD]).append(Template(source).substitute(_values(i)))
        nodeids.append(f"{path}::test_{kind}_{i}")
    return {path: "\n".join(parts) for path, parts in files.items()}, nodeids


def render_commit_tests(count: int) -> tuple[dict[str, str], list[str]]:
    parts = [templates.COMMIT_MODULE_HEAD]
    parts += [Template(templates.COMMIT_TEST).substitute(i=i, products=schema.SEED["products"]) for i in range(count)]
    path = "commit_tests/test_commit.py"
    return {path: "\n".join(parts)}, [f"{path}::test_commit_visible_{i}" for i in range(count)]


ISOLATION_PROBES = 8


def render_isolation_tests() -> tuple[dict[str, str], list[str]]:
    parts = [templates.ISOLATION_MODULE_HEAD]
    parts += [Template(templates.ISOLATION_TEST).substitute(i=i) for i in range(1, ISOLATION_PROBES + 1)]
    path = "isolation_tests/test_isolation.py"
    return {path: "\n".join(parts)}, [f"{path}::test_isolation_probe_{i}" for i in range(1, ISOLATION_PROBES + 1)]


# -- writing ---------------------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def commit_suite_size(size: int) -> int:
    return max(4, size // 10)


def generate(work_dir: Path, size: int) -> Project:
    """Write the project for a suite of ``size`` tests (plus a db_commit suite) into ``work_dir/project``."""
    root = work_dir / "project"
    tables = schema.tables()
    test_files, nodeids = render_tests(size)
    commit_files, commit_ids = render_commit_tests(commit_suite_size(size))
    isolation_files, isolation_ids = render_isolation_tests()
    files = {
        "pyproject.toml": templates.PYPROJECT,
        "plain.ini": templates.PLAIN_INI,
        "alembic.ini": templates.ALEMBIC_INI,
        "alembic/env.py": templates.ALEMBIC_ENV,
        "benchapp/__init__.py": templates.HEADER.split("\n")[0] + "\n",
        "benchapp/models.py": render_models(tables),
        "benchapp/seed.py": render_seed(),
        "benchapp/db.py": templates.DB_MODULE,
        "tests/conftest.py": templates.TESTS_CONFTEST,
        **{f"alembic/versions/{n:04d}_{schema.REVISIONS[n].replace(' ', '_')}.py": render_revision(n, tables)
           for n in schema.REVISIONS},
        **test_files,
        **commit_files,
        **isolation_files,
    }
    for folder in ("tests", "commit_tests"):  # a smaller --size than last time: drop the extra files
        for stale in (root / folder).glob("test_*.py"):
            if str(stale.relative_to(root)) not in files:
                stale.unlink()
    for relative, text in files.items():
        _write(root / relative, text)
    return Project(root, tuple(nodeids), tuple(commit_ids), tuple(isolation_ids))
