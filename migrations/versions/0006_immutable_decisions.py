"""decisions: what was received is immutable, and an outcome is final

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

A trigger refuses any UPDATE of a decision that changes what was received (its run, ids,
action, result, reason, timestamps of receipt) or that changes a decision already acked or
dropped, or sets one back to pending. It holds for every role, the table's owner included;
column privileges (see ``repository.application_grants``) keep the application role to the
columns the registry changes.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GUARD = """
CREATE FUNCTION decisions_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.id, NEW.run_id, NEW.thread_id, NEW.agent_id, NEW.decision_id, NEW.target_id,
        NEW.action, NEW.result, NEW.reason, NEW.decision_updated_at, NEW.received_at)
       IS DISTINCT FROM
       (OLD.id, OLD.run_id, OLD.thread_id, OLD.agent_id, OLD.decision_id, OLD.target_id,
        OLD.action, OLD.result, OLD.reason, OLD.decision_updated_at, OLD.received_at) THEN
        RAISE EXCEPTION 'decision % is immutable: what was received never changes', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.status IN ('acked', 'dropped') THEN
        RAISE EXCEPTION 'decision % is % : its outcome is final', OLD.id, OLD.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.status = 'pending' AND OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'decision % cannot go back to pending', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$
"""


def upgrade() -> None:
    op.execute(_GUARD)
    op.execute(
        "CREATE TRIGGER decisions_guard BEFORE UPDATE ON decisions "
        "FOR EACH ROW EXECUTE FUNCTION decisions_guard()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER decisions_guard ON decisions")
    op.execute("DROP FUNCTION decisions_guard()")
