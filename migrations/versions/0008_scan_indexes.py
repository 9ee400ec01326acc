"""runs: indexes for the two scans that otherwise read every run

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

``adopt_orphaned_runs`` takes active runs in lease order (expired first) and stops at its
limit: an index in that order makes it read what it takes, not every active run. ``prune``
takes ended runs whose stream is still stored, oldest first, a batch at a time: an index on
those makes each batch read its batch, not the whole history.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_runs_active_lease",
        "runs",
        [sa.text("lease_expires_at NULLS FIRST"), "created_at"],
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_index(
        "ix_runs_prunable",
        "runs",
        ["ended_at"],
        postgresql_where=sa.text("stream_seq IS NOT NULL AND ended_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_runs_prunable", table_name="runs")
    op.drop_index("ix_runs_active_lease", table_name="runs")
