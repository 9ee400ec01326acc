"""The schema as SQLAlchemy Core tables: the single source that migrations are checked against.

Tables are created only by the Alembic migrations in ``migrations/``; a test asserts that the
migrations and this module agree.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from registry.models import MAX_ID_LENGTH, RunStatus


def _quoted(values: type[RunStatus]) -> str:
    return ", ".join(f"'{value.value}'" for value in values)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: Name of the runs table's primary key: a reused run id violates it.
RUN_ID_TAKEN = "pk_runs"
#: Name of the partial unique index that keeps one active run per thread.
ONE_ACTIVE_RUN_PER_THREAD = "uq_runs_active_thread"
#: Name of the partial index of the runs queued behind each thread's active run.
QUEUED_RUNS_OF_THREAD = "ix_runs_queued_thread"
#: Name of the partial unique index that makes a non-empty decision_id idempotent per run.
ONE_DECISION_PER_ID = "uq_decisions_run_decision_id"

Id = String(MAX_ID_LENGTH)

runs = Table(
    "runs",
    metadata,
    Column("run_id", Id, primary_key=True),
    Column("thread_id", Id, nullable=False),
    Column("agent_id", Id, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'active'")),
    # the worker_id of the registry that holds the run, and until when its claim holds
    Column("owner_id", Id, nullable=True),
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    # the fencing token: moves on at every change of owner (resume, adopt); a claim, ack,
    # publish or remove made under an older epoch is refused
    Column("owner_epoch", BigInteger, nullable=False, server_default=text("1")),
    Column("cancel_requested_at", DateTime(timezone=True), nullable=True),
    Column("superseded_by", Id, nullable=True),
    Column("end_reason", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    # the stream's last allocated chunk seq; NULL until the stream is bound (and after pruning)
    Column("stream_seq", BigInteger, nullable=True),
    # when the run was queued behind the thread's active run: queued runs become active in
    # this order (set under the thread's lock, so it is the order of arrival)
    Column("queued_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("stream_seq >= 0", name="stream_seq"),
    CheckConstraint("owner_epoch >= 1", name="owner_epoch"),
    CheckConstraint(f"status IN ({_quoted(RunStatus)})", name="status"),
    CheckConstraint(
        "(status IN ('active', 'queued')) = (ended_at IS NULL)", name="ended_at_iff_finished"
    ),
    CheckConstraint("status <> 'queued' OR queued_at IS NOT NULL", name="queued_at"),
    Index(
        ONE_ACTIVE_RUN_PER_THREAD,
        "thread_id",
        unique=True,
        postgresql_where=text("status = 'active'"),
    ),
    Index("ix_runs_thread_created", "thread_id", "created_at"),
    Index(
        QUEUED_RUNS_OF_THREAD,
        "thread_id",
        "queued_at",
        postgresql_where=text("status = 'queued'"),
    ),
    Index(
        "ix_runs_active_owner",
        "owner_id",
        "lease_expires_at",
        postgresql_where=text("status = 'active'"),
    ),
    # adoption's scan, in its order: expired (and never leased) runs first
    Index(
        "ix_runs_active_lease",
        text("lease_expires_at NULLS FIRST"),
        "created_at",
        postgresql_where=text("status = 'active'"),
    ),
    # prune's scan: ended runs whose stream is still stored, oldest first
    Index(
        "ix_runs_prunable",
        "ended_at",
        postgresql_where=text("stream_seq IS NOT NULL AND ended_at IS NOT NULL"),
    ),
)

decisions = Table(
    "decisions",
    metadata,
    # identity order is forward order: inboxes deliver by it
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column(
        "run_id",
        Id,
        ForeignKey("runs.run_id", ondelete="RESTRICT"),
        nullable=False,
    ),
    Column("thread_id", Id, nullable=False),
    Column("agent_id", Id, nullable=False),
    Column("decision_id", Id, nullable=False, server_default=text("''")),
    Column("target_id", Id, nullable=False),
    Column("action", Text, nullable=False),
    Column("result", JSONB, nullable=False, server_default=text("'null'::jsonb")),
    Column("reason", Text, nullable=True),
    # the decision's own updated_at (unix milliseconds, set by the client)
    Column("decision_updated_at", BigInteger, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("drop_reason", Text, nullable=True),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Column("acked_at", DateTime(timezone=True), nullable=True),
    Column("dropped_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("action IN ('resume', 'cancel')", name="action"),
    CheckConstraint("status IN ('pending', 'delivered', 'acked', 'dropped')", name="status"),
    CheckConstraint("attempts >= 0", name="attempts"),
    CheckConstraint("(status = 'dropped') = (drop_reason IS NOT NULL)", name="drop_reason"),
    Index(
        ONE_DECISION_PER_ID,
        "run_id",
        "decision_id",
        unique=True,
        postgresql_where=text("decision_id <> ''"),
    ),
    Index(
        "ix_decisions_open",
        "run_id",
        "id",
        postgresql_where=text("status IN ('pending', 'delivered')"),
    ),
    # a run's newest acknowledged decision (the decision cursor of its record)
    Index(
        "ix_decisions_acked",
        "run_id",
        "id",
        postgresql_where=text("status = 'acked'"),
    ),
    Index("ix_decisions_thread_received", "thread_id", "received_at"),
    Index("ix_decisions_agent_received", "agent_id", "received_at"),
)

stream_chunks = Table(
    "stream_chunks",
    metadata,
    Column(
        "run_id",
        Id,
        ForeignKey("runs.run_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # gapless per run: allocated under the run's row lock, so commits happen in seq order
    Column("seq", BigInteger, primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("seq >= 1", name="seq"),
)


#: The per-database secret that signs notifications and seals inline chunk data (one row).
notification_secrets = Table(
    "notification_secrets",
    metadata,
    Column("id", SmallInteger, primary_key=True),
    Column("secret", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("id = 1", name="one_row"),
    CheckConstraint("octet_length(secret) >= 32", name="length"),
)
