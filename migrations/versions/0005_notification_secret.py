"""notification_secrets: the per-database secret that signs notifications and seals chunks

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "notification_secrets",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("id = 1", name="ck_notification_secrets_one_row"),
        sa.CheckConstraint("octet_length(secret) >= 32", name="ck_notification_secrets_length"),
        sa.PrimaryKeyConstraint("id", name="pk_notification_secrets"),
    )
    # made by the server, so that no script (offline --sql mode included) ever holds it: two
    # version 4 UUIDs from pg_strong_random (PostgreSQL 13+), 244 random bits in 32 bytes
    op.execute(
        "INSERT INTO notification_secrets (id, secret) VALUES "
        "(1, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'))"
    )
    # only the roles the operator grants may read it (see README, Security)
    op.execute("REVOKE ALL ON notification_secrets FROM PUBLIC")


def downgrade() -> None:
    op.drop_table("notification_secrets")
