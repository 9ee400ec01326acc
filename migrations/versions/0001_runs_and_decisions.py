"""runs and decisions

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(255), nullable=False),
        sa.Column("thread_id", sa.String(255), nullable=False),
        sa.Column("agent_id", sa.String(255), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'active'"), nullable=False),
        sa.Column("owner_id", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("superseded_by", sa.String(255), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'completed', 'cancelled', 'superseded')",
            name="ck_runs_status",
        ),
        sa.CheckConstraint(
            "(status = 'active') = (ended_at IS NULL)", name="ck_runs_ended_at_iff_finished"
        ),
        sa.PrimaryKeyConstraint("run_id", name="pk_runs"),
    )
    op.create_index(
        "uq_runs_active_thread",
        "runs",
        ["thread_id"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_index("ix_runs_thread_created", "runs", ["thread_id", "created_at"])
    op.create_index(
        "ix_runs_active_owner",
        "runs",
        ["owner_id", "lease_expires_at"],
        postgresql_where=sa.text("status = 'active'"),
    )

    op.create_table(
        "decisions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("run_id", sa.String(255), nullable=False),
        sa.Column("thread_id", sa.String(255), nullable=False),
        sa.Column("agent_id", sa.String(255), nullable=False),
        sa.Column("decision_id", sa.String(255), server_default=sa.text("''"), nullable=False),
        sa.Column("target_id", sa.String(255), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column(
            "result",
            postgresql.JSONB(),
            server_default=sa.text("'null'::jsonb"),
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("decision_updated_at", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("drop_reason", sa.Text(), nullable=True),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dropped_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("action IN ('resume', 'cancel')", name="ck_decisions_action"),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'acked', 'dropped')", name="ck_decisions_status"
        ),
        sa.CheckConstraint("attempts >= 0", name="ck_decisions_attempts"),
        sa.CheckConstraint(
            "(status = 'dropped') = (drop_reason IS NOT NULL)", name="ck_decisions_drop_reason"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.run_id"],
            name="fk_decisions_run_id_runs",
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_decisions"),
    )
    op.create_index(
        "uq_decisions_run_decision_id",
        "decisions",
        ["run_id", "decision_id"],
        unique=True,
        postgresql_where=sa.text("decision_id <> ''"),
    )
    op.create_index(
        "ix_decisions_open",
        "decisions",
        ["run_id", "id"],
        postgresql_where=sa.text("status IN ('pending', 'delivered')"),
    )
    op.create_index("ix_decisions_thread_received", "decisions", ["thread_id", "received_at"])
    op.create_index("ix_decisions_agent_received", "decisions", ["agent_id", "received_at"])


def downgrade() -> None:
    op.drop_table("decisions")
    op.drop_table("runs")
