"""add posts.slug, NOT NULL

The column is added nullable, existing rows are backfilled from their title (same rule as
``blog.main.slugify``), and only then is it made NOT NULL: the constraint this tightens is exactly
what a mocked database never notices.

Revision ID: 0003
Revises: 0002
Create Date: 2026-05-24 09:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("posts", sa.Column("slug", sa.String(length=200), nullable=True))
    op.execute(
        """
        UPDATE posts
        SET slug = coalesce(
            nullif(btrim(regexp_replace(lower(title), '[^a-z0-9]+', '-', 'g'), '-'), ''),
            'post'
        )
        """
    )
    op.alter_column("posts", "slug", existing_type=sa.String(length=200), nullable=False)


def downgrade() -> None:
    op.drop_column("posts", "slug")
