"""owner_epoch: a fencing token that moves on at every change of a run's owner

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # a constant default: PostgreSQL 11+ adds the column without rewriting the table
    op.add_column(
        "runs",
        sa.Column("owner_epoch", sa.BigInteger(), server_default=sa.text("1"), nullable=False),
    )
    op.create_check_constraint("ck_runs_owner_epoch", "runs", "owner_epoch >= 1")


def downgrade() -> None:
    op.drop_constraint("ck_runs_owner_epoch", "runs", type_="check")
    op.drop_column("runs", "owner_epoch")
