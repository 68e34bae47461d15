"""A project with an Alembic history of N revisions, real downgrades and models that match: what
pgshard_check (and pytest-alembic, beside it) is measured and tested on.

Revision k creates table ``t{k}`` (an id, a name with an index, a foreign key to the table before) and its
downgrade drops them. Faults are asked for by name: ``two_heads`` (the last revision forks),
``model_column`` (the models have a column no revision adds), ``downgrade_leaves`` (revision 3's downgrade
forgets its table), ``downgrade_drops_more`` (revision 4's downgrade drops an index of revision 3 too),
``downgrade_forgets_change`` (revision 4 makes t3.name nullable; its downgrade leaves it so, which its own
upgrade then repairs: only the way up shows it).
``legacy_table``: revision 1 also makes a table ``legacy`` that the models do not have (another service's),
and env.py leaves it out of autogenerate with an ``include_object`` hook, as such projects do.
env.py connects to DATABASE_URL when it is set (pgshard_env), else to sqlalchemy.url; it appends a line to
``env-runs.txt`` each time it runs, so a test can tell that a warm run ran none.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Collection
from pathlib import Path

REVISION = '''"""create t{k}"""
import sqlalchemy as sa
from alembic import op

revision = "{rev}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "t{k}",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
        {fk}
    )
    op.create_index("ix_t{k}_name", "t{k}", ["name"]){extra_up}


def downgrade():
    {downgrade}
'''

ENV_SYNC = '''
import os
from pathlib import Path

from alembic import context
from sqlalchemy import create_engine, pool

from app.models import Base

Path(__file__).parent.parent.joinpath("env-runs.txt").open("a").write("env\\n")
config = context.config


def run():
    engine = create_engine(os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url"),
                           poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
'''

ENV_ASYNC = '''
import asyncio
import os
from pathlib import Path

from alembic import context
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

from app.models import Base

Path(__file__).parent.parent.joinpath("env-runs.txt").open("a").write("env\\n")
config = context.config


def do_run(connection):
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run():
    engine = create_async_engine(os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url"),
                                 poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(do_run)
    await engine.dispose()


asyncio.run(run())
'''


def rev_id(k: int) -> str:
    return f"{k:04d}"


INCLUDE_OBJECT = '''

def include_object(obj, name, type_, reflected, compare_to):
    return not (type_ == "table" and name == "legacy")
'''


def write(root: Path, revisions: int, *, faults: Collection[str] = (), async_env: bool = False,
          token: str = "", legacy_table: bool = False) -> Path:
    """The project under ``root``: alembic.ini, alembic/ (env.py, versions/), app/models.py. Returns root.
    ``token``: a comment in env.py, so that the project's template fingerprint is its own."""
    versions = root / "alembic" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (root / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s/alembic\n")
    env = ENV_ASYNC if async_env else ENV_SYNC
    if legacy_table:
        env = env.replace("config = context.config\n", "config = context.config\n" + INCLUDE_OBJECT).replace(
            "target_metadata=Base.metadata)", "target_metadata=Base.metadata, include_object=include_object)")
    (root / "alembic" / "env.py").write_text(env + f"# {token}\n")
    (root / "app").mkdir(exist_ok=True)
    (root / "app" / "__init__.py").write_text("")
    for k in range(1, revisions + 1):
        down = rev_id(k - 1) if k > 1 else None
        if "two_heads" in faults and k == revisions and k > 2:
            down = rev_id(k - 2)  # forks from the revision before the last: two heads
        fk = f'sa.Column("t{k - 1}_id", sa.Integer, sa.ForeignKey("t{k - 1}.id")),' if k > 1 else ""
        drop = f'op.drop_index("ix_t{k}_name", table_name="t{k}")\n    op.drop_table("t{k}")'
        if legacy_table and k == 1:
            drop += '\n    op.drop_table("legacy")'
        if "downgrade_leaves" in faults and k == 3:
            drop = f'op.drop_index("ix_t{k}_name", table_name="t{k}")  # forgets the table'
        if "downgrade_drops_more" in faults and k == 4:
            drop += '\n    op.drop_index("ix_t3_name", table_name="t3")  # not its own: the upgrade does not make it'
        extra_up = ""
        if legacy_table and k == 1:
            extra_up = '\n    op.create_table("legacy", sa.Column("id", sa.Integer, primary_key=True))'
        if "downgrade_forgets_change" in faults and k == 4:  # the downgrade does not make t3.name NOT NULL again
            extra_up = '\n    op.alter_column("t3", "name", existing_type=sa.String(50), nullable=True)'
        (versions / f"{rev_id(k)}_t{k}.py").write_text(
            REVISION.format(k=k, rev=rev_id(k), down=down, fk=fk, downgrade=drop, extra_up=extra_up))
    models = ["import sqlalchemy as sa", "from sqlalchemy.orm import DeclarativeBase", "", "",
              "class Base(DeclarativeBase):", "    pass", ""]
    for k in range(1, revisions + 1):
        columns = ['    id = sa.Column(sa.Integer, primary_key=True)',
                   '    name = sa.Column(sa.String(50), nullable=False, index=True)']
        if k > 1:
            columns.append(f'    t{k - 1}_id = sa.Column(sa.Integer, sa.ForeignKey("t{k - 1}.id"))')
        if "model_column" in faults and k == 1:
            columns.append('    nickname = sa.Column(sa.String(30))')
        models += ["", f"class T{k}(Base):", f'    __tablename__ = "t{k}"', *columns, ""]
    (root / "app" / "models.py").write_text("\n".join(models))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=textwrap.dedent(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--revisions", type=int, default=10)
    parser.add_argument("--fault", action="append", default=[],
                        choices=["two_heads", "model_column", "downgrade_leaves", "downgrade_drops_more",
                                 "downgrade_forgets_change"])
    parser.add_argument("--async-env", action="store_true")
    args = parser.parse_args()
    write(args.root, args.revisions, faults=args.fault, async_env=args.async_env)


if __name__ == "__main__":
    main()
