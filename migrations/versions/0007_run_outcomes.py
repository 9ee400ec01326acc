"""runs: the outcomes failed and interrupted, and runs queued behind a thread's active run

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

A run ends ``completed``, ``failed``, ``cancelled``, ``interrupted`` (each with its reason in
``end_reason``) or ``superseded``; a run registered with ``on_conflict="enqueue"`` waits
``queued`` (with ``queued_at``, its place in line) until the thread's active run ends. Queued
runs stay out of the one-active-run index; a partial index finds a thread's queue. The
``decision_audit`` view already shows each run's status and end reason, so it is unchanged.
An index on acknowledged decisions gives a run's record its decision cursor cheaply.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = "'active', 'queued', 'completed', 'cancelled', 'superseded', 'failed', 'interrupted'"
_OLD_STATUSES = "'active', 'completed', 'cancelled', 'superseded'"


def upgrade() -> None:
    op.add_column("runs", sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_constraint("ck_runs_status", "runs", type_="check")
    op.create_check_constraint("ck_runs_status", "runs", f"status IN ({_STATUSES})")
    op.drop_constraint("ck_runs_ended_at_iff_finished", "runs", type_="check")
    op.create_check_constraint(
        "ck_runs_ended_at_iff_finished",
        "runs",
        "(status IN ('active', 'queued')) = (ended_at IS NULL)",
    )
    op.create_check_constraint(
        "ck_runs_queued_at", "runs", "status <> 'queued' OR queued_at IS NOT NULL"
    )
    op.create_index(
        "ix_runs_queued_thread",
        "runs",
        ["thread_id", "queued_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    # the decision cursor of a run's record: its newest acknowledged decision, one index probe
    op.create_index(
        "ix_decisions_acked",
        "decisions",
        ["run_id", "id"],
        postgresql_where=sa.text("status = 'acked'"),
    )


def downgrade() -> None:
    # the older schema knows neither queues nor these outcomes: queued runs end cancelled,
    # failed and interrupted ones read as completed (their reason is kept)
    op.execute(
        "UPDATE runs SET status = 'cancelled', ended_at = now(), updated_at = now(), "
        "end_reason = 'still queued when the schema was downgraded' WHERE status = 'queued'"
    )
    op.execute(
        "UPDATE runs SET status = 'completed', updated_at = now() "
        "WHERE status IN ('failed', 'interrupted')"
    )
    op.drop_index("ix_decisions_acked", table_name="decisions")
    op.drop_index("ix_runs_queued_thread", table_name="runs")
    op.drop_constraint("ck_runs_queued_at", "runs", type_="check")
    op.drop_constraint("ck_runs_ended_at_iff_finished", "runs", type_="check")
    op.create_check_constraint(
        "ck_runs_ended_at_iff_finished", "runs", "(status = 'active') = (ended_at IS NULL)"
    )
    op.drop_constraint("ck_runs_status", "runs", type_="check")
    op.create_check_constraint("ck_runs_status", "runs", f"status IN ({_OLD_STATUSES})")
    op.drop_column("runs", "queued_at")
