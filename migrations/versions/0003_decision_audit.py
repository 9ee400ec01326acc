"""decision_audit: a view of the decision audit trail with delivery latency

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One row per decision, joined to its run. The latencies are intervals from the moment the
# decision was stored: ``delivery_latency`` to its first delivery, ``ack_latency`` to its
# acknowledgement (NULL while that has not happened). The view adds no data of its own, so it
# is created and dropped freely; Alembic's autogenerate does not compare views.
_CREATE_VIEW = """
CREATE VIEW decision_audit AS
SELECT d.id,
       d.run_id,
       d.thread_id,
       d.agent_id,
       d.decision_id,
       d.target_id,
       d.action,
       d.result,
       d.reason,
       d.decision_updated_at,
       d.status,
       d.attempts,
       d.drop_reason,
       d.received_at,
       d.delivered_at,
       d.acked_at,
       d.dropped_at,
       d.delivered_at - d.received_at AS delivery_latency,
       d.acked_at - d.received_at AS ack_latency,
       r.status AS run_status,
       r.owner_id AS run_owner_id,
       r.created_at AS run_created_at,
       r.ended_at AS run_ended_at,
       r.end_reason AS run_end_reason
  FROM decisions AS d
  JOIN runs AS r ON r.run_id = d.run_id
"""


def upgrade() -> None:
    op.execute(_CREATE_VIEW)
    op.execute(
        "COMMENT ON VIEW decision_audit IS "
        "'Decisions with their run, delivery and acknowledgement latency (read-only)'"
    )


def downgrade() -> None:
    op.execute("DROP VIEW decision_audit")
