"""streams: per-run chunk rows with a gapless sequence

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("stream_seq", sa.BigInteger(), nullable=True))
    op.create_check_constraint("ck_runs_stream_seq", "runs", "stream_seq >= 0")
    op.create_table(
        "stream_chunks",
        sa.Column("run_id", sa.String(255), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("seq >= 1", name="ck_stream_chunks_seq"),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.run_id"],
            name="fk_stream_chunks_run_id_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "seq", name="pk_stream_chunks"),
    )


def downgrade() -> None:
    op.drop_table("stream_chunks")
    op.drop_constraint("ck_runs_stream_seq", "runs", type_="check")
    op.drop_column("runs", "stream_seq")
