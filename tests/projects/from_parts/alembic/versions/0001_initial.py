"""users and items"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("user", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("email", sa.String(255), nullable=False, unique=True),
                    sa.Column("is_superuser", sa.Boolean, nullable=False))
    op.create_table("item", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("title", sa.String(255), nullable=False),
                    sa.Column("owner_id", sa.Integer, sa.ForeignKey("user.id"), nullable=False))


def downgrade() -> None:
    op.drop_table("item")
    op.drop_table("user")
