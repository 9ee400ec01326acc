"""Every SQL statement of the registry, each next to the function that runs it.

Functions take an open connection and never commit: the caller owns the transaction, so one
public registry call is one transaction. All values travel as bind parameters; the notification
channel is a constant, and notification payloads carry only a kind and an id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from registry.errors import InvalidInputError
from registry.models import (
    DecisionDelivery,
    DecisionStatus,
    ResumeDecisionAction,
    RunRecord,
    RunStatus,
    StreamChunk,
    ToolCallDecision,
)

#: The one notification channel; the version lets a future payload format run side by side.
CHANNEL = "registry_v1"

#: The listener's health probe: a round trip that a half-open connection cannot complete.
HEALTH_PROBE = "SELECT 1"

#: Advisory lock key that serialises concurrent ``migrate`` calls ("registry" in ASCII).
MIGRATION_LOCK_KEY = 0x7265676973747279

_RUN_COLUMNS = (
    "run_id, thread_id, agent_id, status, owner_id, cancel_requested_at, "
    "created_at, updated_at, ended_at, end_reason"
)


def _sql(statement: str) -> TextClause:
    return text(statement)


def _run_record(result_row: Any) -> RunRecord:
    # a SQLAlchemy Row or an asyncpg Record
    row = result_row._mapping if isinstance(result_row, Row) else result_row
    return RunRecord(
        run_id=row["run_id"],
        thread_id=row["thread_id"],
        agent_id=row["agent_id"],
        status=RunStatus(row["status"]),
        owner_id=row["owner_id"],
        cancel_requested_at=row["cancel_requested_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        ended_at=row["ended_at"],
        end_reason=row["end_reason"],
    )


_LOCK_MIGRATIONS = _sql("SELECT pg_advisory_xact_lock(:key)")


async def lock_migrations(connection: AsyncConnection) -> None:
    """Serialise schema migrations across processes until the transaction ends."""
    await connection.execute(_LOCK_MIGRATIONS, {"key": MIGRATION_LOCK_KEY})


# --- runs ------------------------------------------------------------------------------------

_LOCK_THREAD = _sql("SELECT pg_advisory_xact_lock(hashtextextended(:thread_id, 0))")


async def lock_thread(connection: AsyncConnection, thread_id: str) -> None:
    """Serialise registrations on one thread until the transaction ends.

    Without it, two registers on a fresh thread both see no active run and one of them fails
    on the unique index; with it, the second waits and then supersedes the first.
    """
    await connection.execute(_LOCK_THREAD, {"thread_id": thread_id})


_SUPERSEDE_ACTIVE = _sql(
    """
    UPDATE runs
       SET status = 'superseded', superseded_by = :new_run_id, end_reason = :reason,
           ended_at = now(), updated_at = now(), lease_expires_at = NULL
     WHERE thread_id = :thread_id AND status = 'active'
    RETURNING run_id
    """
)


async def supersede_active_run(
    connection: AsyncConnection, thread_id: str, new_run_id: str
) -> str | None:
    """Mark the thread's active run superseded by ``new_run_id``; return its id, if any."""
    result = await connection.execute(
        _SUPERSEDE_ACTIVE,
        {
            "thread_id": thread_id,
            "new_run_id": new_run_id,
            "reason": f"superseded by run {new_run_id}",
        },
    )
    old: str | None = result.scalar_one_or_none()
    return old


_INSERT_RUN = _sql(
    f"""
    INSERT INTO runs (run_id, thread_id, agent_id, owner_id, lease_expires_at)
    VALUES (:run_id, :thread_id, :agent_id, :owner_id, now() + CAST(:lease AS interval))
    RETURNING {_RUN_COLUMNS}
    """
)


async def insert_run(
    connection: AsyncConnection,
    *,
    run_id: str,
    thread_id: str,
    agent_id: str,
    owner_id: str,
    lease: timedelta,
) -> RunRecord:
    """Insert an active run owned by ``owner_id``; the primary key refuses a reused run id."""
    result = await connection.execute(
        _INSERT_RUN,
        {
            "run_id": run_id,
            "thread_id": thread_id,
            "agent_id": agent_id,
            "owner_id": owner_id,
            "lease": lease,
        },
    )
    return _run_record(result.one())


_END_RUN = _sql(
    """
    UPDATE runs
       SET status = CASE WHEN cancel_requested_at IS NULL THEN 'completed' ELSE 'cancelled' END,
           end_reason = CASE WHEN cancel_requested_at IS NULL THEN 'removed' ELSE 'cancelled' END,
           ended_at = now(), updated_at = now(), lease_expires_at = NULL
     WHERE run_id = :run_id AND status = 'active'
    RETURNING run_id
    """
)


async def end_run(connection: AsyncConnection, run_id: str) -> bool:
    """Finish an active run: ``cancelled`` if a cancel was requested, else ``completed``."""
    result = await connection.execute(_END_RUN, {"run_id": run_id})
    return result.first() is not None


_NAMED_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


@dataclass(frozen=True, slots=True)
class _DriverStatement:
    """A statement for the driver itself: ``:name`` parameters turned into ``$n``."""

    sql: str
    names: tuple[str, ...]

    def arguments(self, params: dict[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


def _driver_statement(statement: str) -> _DriverStatement:
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return _DriverStatement(_NAMED_PARAMETER.sub(number, statement), tuple(names))


def driver(connection: AsyncConnection) -> Any:
    """The asyncpg connection under a checked-out SQLAlchemy connection.

    Read synchronously: ``AsyncConnection.get_raw_connection()`` costs a greenlet switch.
    """
    fairy = connection.sync_connection.connection if connection.sync_connection else None
    if fairy is None or fairy.driver_connection is None:
        raise RuntimeError("the SQLAlchemy connection has no driver connection")
    return fairy.driver_connection


async def _driver_fetch(
    connection: AsyncConnection, statement: _DriverStatement, params: dict[str, Any]
) -> list[Any]:
    # The statements on every request's path (lookups, forwards, cancels, claims, acks,
    # stream appends and reads) run on the pooled connection's asyncpg driver directly: the
    # same single round trip without SQLAlchemy's per-statement Python work (100-400 us,
    # most of the cost of such a statement on a local server). Each is a single statement,
    # so autocommit makes it one transaction; inside a registry write it runs in the
    # write's BEGIN ... COMMIT on the same connection.
    rows: list[Any] = await driver(connection).fetch(statement.sql, *statement.arguments(params))
    return rows


async def _driver_fetchrow(
    connection: AsyncConnection, statement: _DriverStatement, params: dict[str, Any]
) -> Any:
    rows = await _driver_fetch(connection, statement, params)
    return rows[0] if rows else None


_ACTIVE_BY_THREAD = _driver_statement(
    f"SELECT {_RUN_COLUMNS} FROM runs WHERE thread_id = :thread_id AND status = 'active'"
)


async def active_run_by_thread(connection: AsyncConnection, thread_id: str) -> RunRecord | None:
    """The thread's active run, if any."""
    row = await _driver_fetchrow(connection, _ACTIVE_BY_THREAD, {"thread_id": thread_id})
    return None if row is None else _run_record(row)


_ACTIVE_BY_RUN_ID = _driver_statement(
    f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = :run_id AND status = 'active'"
)


async def active_run_by_id(connection: AsyncConnection, run_id: str) -> RunRecord | None:
    """The run ``run_id`` if it is active."""
    row = await _driver_fetchrow(connection, _ACTIVE_BY_RUN_ID, {"run_id": run_id})
    return None if row is None else _run_record(row)


_RUN_BY_ID = _sql(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = :run_id")


async def run_by_id(connection: AsyncConnection, run_id: str) -> RunRecord | None:
    """The run ``run_id`` in any status."""
    row = (await connection.execute(_RUN_BY_ID, {"run_id": run_id})).first()
    return None if row is None else _run_record(row)


_RUN_STATES = _sql(
    "SELECT run_id, status, cancel_requested_at, stream_seq FROM runs WHERE run_id = ANY(:run_ids)"
)


@dataclass(frozen=True, slots=True)
class RunState:
    """The part of a run that tokens, inboxes and stream subscribers watch."""

    run_id: str
    status: RunStatus
    cancel_requested: bool
    #: the newest chunk seq, or ``None`` if the run has no (retained) stream
    stream_seq: int | None


def _run_state(row: Row[Any]) -> RunState:
    return RunState(
        row.run_id, RunStatus(row.status), row.cancel_requested_at is not None, row.stream_seq
    )


async def run_states(connection: AsyncConnection, run_ids: Sequence[str]) -> list[RunState]:
    """State of many runs in one round trip (the safety-net re-check)."""
    result = await connection.execute(_RUN_STATES, {"run_ids": list(run_ids)})
    return [_run_state(row) for row in result]


_CANCEL_BY_ID = _driver_statement(
    """
    WITH cancelled AS (
        UPDATE runs
           SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now()
         WHERE run_id = :run_id AND status = 'active'
        RETURNING run_id
    )
    SELECT run_id,
           pg_notify(:channel, json_build_object('kind', 'cancel', 'id', run_id)::text)
      FROM cancelled
    """
)


async def request_cancel_by_id(connection: AsyncConnection, run_id: str) -> str | None:
    """Record a cancel request on the active run ``run_id`` and notify; return its id.

    The first request's time is kept; repeating it is harmless and notifies again.
    """
    params = {"run_id": run_id, "channel": CHANNEL}
    row = await _driver_fetchrow(connection, _CANCEL_BY_ID, params)
    return None if row is None else str(row["run_id"])


_CANCEL_BY_THREAD = _driver_statement(
    """
    WITH cancelled AS (
        UPDATE runs
           SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now()
         WHERE thread_id = :thread_id AND status = 'active'
           AND (CAST(:agent_id AS text) IS NULL OR agent_id = :agent_id)
        RETURNING run_id
    )
    SELECT run_id,
           pg_notify(:channel, json_build_object('kind', 'cancel', 'id', run_id)::text)
      FROM cancelled
    """
)


async def request_cancel_by_thread(
    connection: AsyncConnection, thread_id: str, agent_id: str | None = None
) -> str | None:
    """Record a cancel request on the thread's active run and notify; return the run's id.

    With ``agent_id``, only if that agent owns the run.
    """
    params = {"thread_id": thread_id, "agent_id": agent_id, "channel": CHANNEL}
    row = await _driver_fetchrow(connection, _CANCEL_BY_THREAD, params)
    return None if row is None else str(row["run_id"])


# --- ownership and recovery -------------------------------------------------------------------

_RENEW_LEASES = _sql(
    """
    UPDATE runs SET lease_expires_at = now() + CAST(:lease AS interval)
     WHERE owner_id = :owner_id AND status = 'active'
    RETURNING run_id
    """
)


async def renew_leases(connection: AsyncConnection, owner_id: str, lease: timedelta) -> set[str]:
    """Extend the lease of every active run ``owner_id`` holds, in one statement."""
    result = await connection.execute(_RENEW_LEASES, {"owner_id": owner_id, "lease": lease})
    return {row.run_id for row in result}


_RELEASE_LEASES = _sql(
    """
    UPDATE runs SET lease_expires_at = now()
     WHERE owner_id = :owner_id AND status = 'active'
    """
)


async def release_leases(connection: AsyncConnection, owner_id: str) -> None:
    """Let the runs of a worker that shuts down cleanly be adopted at once."""
    await connection.execute(_RELEASE_LEASES, {"owner_id": owner_id})


_RESUME_OWNED = _sql(
    f"""
    UPDATE runs SET lease_expires_at = now() + CAST(:lease AS interval), updated_at = now()
     WHERE owner_id = :owner_id AND status = 'active'
    RETURNING {_RUN_COLUMNS}
    """
)


async def resume_owned(
    connection: AsyncConnection, owner_id: str, lease: timedelta
) -> list[RunRecord]:
    """Renew and return the active runs ``owner_id`` holds, oldest first."""
    result = await connection.execute(_RESUME_OWNED, {"owner_id": owner_id, "lease": lease})
    return sorted((_run_record(row) for row in result), key=lambda run: run.created_at)


_ADOPT_ORPHANS = _sql(
    f"""
    UPDATE runs SET owner_id = :owner_id, updated_at = now(),
                    lease_expires_at = now() + CAST(:lease AS interval)
     WHERE run_id IN (
            SELECT run_id FROM runs
             WHERE status = 'active'
               AND (lease_expires_at IS NULL OR lease_expires_at < now())
             ORDER BY lease_expires_at NULLS FIRST, created_at
             LIMIT :limit
               FOR UPDATE SKIP LOCKED
           )
       -- re-checked on the locked row: a run adopted meanwhile has a fresh lease
       AND (lease_expires_at IS NULL OR lease_expires_at < now())
    RETURNING {_RUN_COLUMNS}
    """
)


async def adopt_orphans(
    connection: AsyncConnection, owner_id: str, lease: timedelta, limit: int
) -> list[RunRecord]:
    """Claim up to ``limit`` active runs whose lease expired; never one claimed by another.

    ``SKIP LOCKED`` lets concurrent adopters take disjoint runs without waiting.
    """
    result = await connection.execute(
        _ADOPT_ORPHANS, {"owner_id": owner_id, "lease": lease, "limit": limit}
    )
    return sorted((_run_record(row) for row in result), key=lambda run: run.created_at)


_SWEEP_CANCELLED_ORPHANS = _sql(
    """
    WITH swept AS (
        UPDATE runs
           SET status = 'cancelled', end_reason = 'cancelled while its owner was gone',
               ended_at = now(), updated_at = now()
         WHERE status = 'active' AND cancel_requested_at IS NOT NULL
           AND lease_expires_at < now() - CAST(:grace AS interval)
        RETURNING run_id
    ), notified AS (
        SELECT pg_notify(:channel, json_build_object('kind', 'ended', 'id', run_id)::text)
          FROM swept
    )
    SELECT run_id, (SELECT count(*) FROM notified) AS notified FROM swept
    """
)


async def sweep_cancelled_orphans(connection: AsyncConnection, grace: timedelta) -> list[str]:
    """Finish as ``cancelled`` the runs whose cancel is pending and whose lease expired more
    than ``grace`` ago (nobody adopted them); return their ids. Their decisions are dropped
    by the caller in a following statement.
    """
    result = await connection.execute(
        _SWEEP_CANCELLED_ORPHANS, {"grace": grace, "channel": CHANNEL}
    )
    return [row.run_id for row in result]


# --- decisions -------------------------------------------------------------------------------

_DROP_OPEN_DECISIONS = _sql(
    """
    UPDATE decisions
       SET status = 'dropped', drop_reason = :reason, dropped_at = now()
     WHERE run_id = :run_id AND status IN ('pending', 'delivered')
    """
)


_DROP_OPEN_DECISIONS_AND_NOTIFY = _sql(
    """
    WITH dropped AS (
        UPDATE decisions
           SET status = 'dropped', drop_reason = :reason, dropped_at = now()
         WHERE run_id = :run_id AND status IN ('pending', 'delivered')
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM dropped) AS dropped,
           pg_notify(:channel, json_build_object('kind', CAST(:kind AS text),
                                                 'id', CAST(:run_id AS text))::text)
    """
)


async def drop_open_decisions_and_notify(
    connection: AsyncConnection, run_id: str, reason: str, kind: str
) -> int:
    """:func:`drop_open_decisions` and :func:`notify` in one round trip."""
    result = await connection.execute(
        _DROP_OPEN_DECISIONS_AND_NOTIFY,
        {"run_id": run_id, "reason": reason, "kind": str(kind), "channel": CHANNEL},
    )
    return int(result.scalar_one())


async def drop_open_decisions(connection: AsyncConnection, run_id: str, reason: str) -> int:
    """Drop the run's decisions that were not acknowledged; return how many.

    Runs as its own statement after the run's row was updated, so that it sees decisions
    committed by a forward that held the run's row lock until then.
    """
    result = await connection.execute(_DROP_OPEN_DECISIONS, {"run_id": run_id, "reason": reason})
    return int(result.rowcount)


def _forward_statement(run_filter: str) -> _DriverStatement:
    # One statement: lock the active run FOR SHARE (so a concurrent supersede or remove waits
    # and then drops what we add), insert the batch in order, skip decision ids already stored,
    # and notify only if something new was stored. One statement is one transaction: all or none.
    return _driver_statement(
        f"""
        WITH run AS (
            SELECT run_id, thread_id, agent_id FROM runs
             WHERE {run_filter} AND status = 'active'
               FOR SHARE
        ), inserted AS (
            INSERT INTO decisions (run_id, thread_id, agent_id, decision_id, target_id, action,
                                   result, reason, decision_updated_at)
            SELECT run.run_id, run.thread_id, run.agent_id, d.decision_id, d.target_id,
                   d.action, CAST(d.result AS jsonb), d.reason, d.updated_at
              FROM run,
                   unnest(CAST(:decision_ids AS text[]), CAST(:target_ids AS text[]),
                          CAST(:actions AS text[]), CAST(:results AS text[]),
                          CAST(:reasons AS text[]), CAST(:updated_ats AS bigint[]))
                   WITH ORDINALITY
                   AS d(decision_id, target_id, action, result, reason, updated_at, ord)
             ORDER BY d.ord
            ON CONFLICT (run_id, decision_id) WHERE decision_id <> '' DO NOTHING
            RETURNING id
        ), notified AS (
            SELECT pg_notify(:channel, json_build_object('kind', 'decision', 'id', run_id)::text)
              FROM run
             WHERE EXISTS (SELECT FROM inserted)
        )
        SELECT run.run_id, run.thread_id,
               (SELECT count(*) FROM inserted) AS inserted,
               (SELECT count(*) FROM notified) AS notified
          FROM run
        """
    )


_FORWARD_BY_RUN_ID = _forward_statement("run_id = :run_id")
_FORWARD_BY_THREAD = _forward_statement("thread_id = :thread_id AND agent_id = :agent_id")


@dataclass(frozen=True, slots=True)
class ForwardResult:
    """Where a forward went and how many of its decisions were new."""

    run_id: str
    thread_id: str
    inserted: int


def _forward_result(row: Any) -> ForwardResult:
    return ForwardResult(row["run_id"], row["thread_id"], int(row["inserted"]))


def _decision_arrays(
    decisions: Sequence[ToolCallDecision], results: Sequence[str]
) -> dict[str, Any]:
    return {
        "decision_ids": [d.decision_id for d in decisions],
        "target_ids": [d.target_id for d in decisions],
        "actions": [d.action.value for d in decisions],
        "results": list(results),
        "reasons": [d.reason for d in decisions],
        "updated_ats": [d.updated_at for d in decisions],
        "channel": CHANNEL,
    }


async def forward_by_run_id(
    connection: AsyncConnection,
    run_id: str,
    decisions: Sequence[ToolCallDecision],
    results: Sequence[str],
) -> ForwardResult | None:
    """Queue ``decisions`` on the active run ``run_id``; ``None`` if it is not active.

    ``results`` holds each decision's ``result`` already encoded as JSON text.
    """
    params = _decision_arrays(decisions, results) | {"run_id": run_id}
    row = await _driver_fetchrow(connection, _FORWARD_BY_RUN_ID, params)
    return None if row is None else _forward_result(row)


async def forward_by_thread(
    connection: AsyncConnection,
    agent_id: str,
    thread_id: str,
    decisions: Sequence[ToolCallDecision],
    results: Sequence[str],
) -> ForwardResult | None:
    """Queue ``decisions`` on the thread's active run if ``agent_id`` owns it, else ``None``.

    ``results`` holds each decision's ``result`` already encoded as JSON text.
    """
    params = _decision_arrays(decisions, results) | {"thread_id": thread_id, "agent_id": agent_id}
    row = await _driver_fetchrow(connection, _FORWARD_BY_THREAD, params)
    return None if row is None else _forward_result(row)


_CLAIM_DECISIONS = _driver_statement(
    """
    WITH relaxed AS (
        -- this statement's commit need not wait for the WAL flush: if a server crash loses
        -- the mark, the decision is simply delivered again, which at-least-once allows
        SELECT set_config('synchronous_commit', 'off', true)
    ), candidates AS (
        SELECT id, attempts FROM decisions
         WHERE run_id = :run_id AND status IN ('pending', 'delivered')
           -- ids are drawn at insert, not at commit: a forward that commits after a later
           -- one has a lower id than this inbox's cursor, so pending rows are always taken
           AND (status = 'pending' OR id > :after)
         ORDER BY id
         LIMIT :limit
           FOR UPDATE
    ), dead AS (
        UPDATE decisions
           SET status = 'dropped', dropped_at = now(),
               drop_reason = 'dead-lettered after ' || attempts || ' delivery attempts'
         WHERE id IN (SELECT id FROM candidates WHERE attempts >= :max_attempts)
        RETURNING id
    ), claimed AS (
        UPDATE decisions
           SET status = 'delivered', delivered_at = coalesce(delivered_at, now()),
               attempts = attempts + 1
         WHERE id IN (SELECT id FROM candidates WHERE attempts < :max_attempts)
        RETURNING id, run_id, decision_id, target_id, action, result::text AS result, reason,
                  decision_updated_at, attempts, received_at
    )
    SELECT claimed.*, false AS dead FROM claimed, relaxed
    UNION ALL
    SELECT dead.id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true FROM dead, relaxed
    """
)


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim took: deliveries in forward order, and how far it looked."""

    deliveries: list[DecisionDelivery]
    #: the highest decision id examined, delivered or dead-lettered (``after`` if none)
    examined: int
    dead_lettered: int
    #: whether the claim hit its limit (more may be waiting)
    full: bool


async def claim_decisions(
    connection: AsyncConnection, run_id: str, *, after: int, limit: int, max_attempts: int
) -> Claim:
    """Mark the run's next unacknowledged decisions (id > ``after``) delivered and return them.

    Each claim counts one delivery attempt; a decision already delivered ``max_attempts``
    times is dropped as dead-lettered instead. Deliveries come in forward order.
    """
    rows = await _driver_fetch(
        connection,
        _CLAIM_DECISIONS,
        {"run_id": run_id, "after": after, "limit": limit, "max_attempts": max_attempts},
    )
    deliveries: list[DecisionDelivery] = []
    examined = after
    dead = 0
    for row in rows:
        examined = max(examined, row["id"])
        if row["dead"]:
            dead += 1
            continue
        deliveries.append(
            DecisionDelivery(
                delivery_id=row["id"],
                run_id=row["run_id"],
                decision=ToolCallDecision.model_construct(
                    target_id=row["target_id"],
                    decision_id=row["decision_id"],
                    action=ResumeDecisionAction(row["action"]),
                    result=json.loads(row["result"]),
                    reason=row["reason"],
                    updated_at=row["decision_updated_at"],
                ),
                attempts=row["attempts"],
                received_at=row["received_at"],
            )
        )
    deliveries.sort(key=lambda delivery: delivery.delivery_id)
    return Claim(deliveries, examined, dead, full=len(rows) >= limit)


_ACK_DECISION = _driver_statement(
    """
    UPDATE decisions SET status = 'acked', acked_at = now()
     WHERE id = :id AND run_id = :run_id AND status = 'delivered'
    RETURNING id
    """
)


async def ack_decision(connection: AsyncConnection, run_id: str, delivery_id: int) -> bool:
    """Mark a delivered decision acknowledged; ``False`` if it was not awaiting an ack."""
    params = {"id": delivery_id, "run_id": run_id}
    return await _driver_fetchrow(connection, _ACK_DECISION, params) is not None


_OPEN_DECISION_HEADS = _sql(
    """
    SELECT run_id, max(id) AS newest, bool_or(status = 'pending') AS pending FROM decisions
     WHERE run_id = ANY(:run_ids) AND status IN ('pending', 'delivered')
     GROUP BY run_id
    """
)


@dataclass(frozen=True, slots=True)
class OpenDecisions:
    """A run's unacknowledged decisions, as the inboxes' safety-net check sees them."""

    newest: int
    #: whether any is still unclaimed (it may sit below an inbox's cursor)
    pending: bool


async def open_decision_heads(
    connection: AsyncConnection, run_ids: Sequence[str]
) -> dict[str, OpenDecisions]:
    """For each run with unacknowledged decisions: the newest id, and whether any is pending."""
    result = await connection.execute(_OPEN_DECISION_HEADS, {"run_ids": list(run_ids)})
    return {row.run_id: OpenDecisions(int(row.newest), bool(row.pending)) for row in result}


_DECISIONS_OF_RUN = _sql(
    """
    SELECT id, run_id, thread_id, agent_id, decision_id, target_id, action,
           result::text AS result, reason, decision_updated_at, status, attempts, drop_reason,
           received_at, delivered_at, acked_at, dropped_at
      FROM decisions WHERE run_id = :run_id ORDER BY id
    """
)


async def decisions_of_run(connection: AsyncConnection, run_id: str) -> list[dict[str, Any]]:
    """Every decision row of a run, oldest first (the audit trail)."""
    result = await connection.execute(_DECISIONS_OF_RUN, {"run_id": run_id})
    rows = [dict(row._mapping) for row in result]
    for row in rows:
        row["result"] = json.loads(row["result"])
    return rows


# --- streams --------------------------------------------------------------------------------

_BIND_STREAM = _sql(
    """
    UPDATE runs SET stream_seq = coalesce(stream_seq, 0)
     WHERE run_id = :run_id AND status = 'active'
    RETURNING stream_seq
    """
)


async def bind_stream(connection: AsyncConnection, run_id: str) -> bool:
    """Open the active run's stream (idempotent); ``False`` if the run is not active."""
    return (await connection.execute(_BIND_STREAM, {"run_id": run_id})).first() is not None


_APPEND_CHUNKS = _driver_statement(
    """
    WITH allocated AS (
        -- the row lock serialises publishers of one run, so seqs commit in order, gapless
        UPDATE runs SET stream_seq = stream_seq + CAST(:count AS bigint)
         WHERE run_id = :run_id AND status = 'active' AND stream_seq IS NOT NULL
        RETURNING run_id, stream_seq AS last_seq
    ), inserted AS (
        INSERT INTO stream_chunks (run_id, seq, data)
        SELECT allocated.run_id, allocated.last_seq - CAST(:count AS bigint) + chunk.ord,
               chunk.data
          FROM allocated,
               unnest(CAST(:chunks AS bytea[])) WITH ORDINALITY AS chunk(data, ord)
        RETURNING seq
    ), notified AS (
        SELECT pg_notify(:channel, json_build_object(
                   'kind', 'chunk', 'id', run_id, 'seq', last_seq,
                   'data', CAST(:inline AS text))::text)
          FROM allocated
         WHERE CAST(:notify AS boolean)
    )
    SELECT last_seq, (SELECT count(*) FROM inserted) AS inserted,
           (SELECT count(*) FROM notified) AS notified
      FROM allocated
    """
)


async def append_chunks(
    connection: AsyncConnection,
    run_id: str,
    chunks: Sequence[bytes],
    *,
    notify: bool,
    inline: str | None,
) -> int | None:
    """Append ``chunks`` to the run's open stream; return the last seq, ``None`` if closed.

    With ``notify``, a wake-up goes out at commit, carrying ``inline`` (base64 of a single
    small chunk) when given.
    """
    row = await _driver_fetchrow(
        connection,
        _APPEND_CHUNKS,
        {
            "run_id": run_id,
            "count": len(chunks),
            "chunks": list(chunks),
            "notify": notify,
            "inline": inline,
            "channel": CHANNEL,
        },
    )
    return None if row is None else int(row["last_seq"])


_NOTIFY_CHUNKS = _sql(
    """
    SELECT pg_notify(:channel, json_build_object('kind', 'chunk', 'id', run_id, 'seq', seq)::text)
      FROM unnest(CAST(:run_ids AS text[]), CAST(:seqs AS bigint[])) AS pending(run_id, seq)
    """
)


async def notify_chunks(connection: AsyncConnection, newest: dict[str, int]) -> None:
    """One wake-up per run for chunks published without one (coalesced)."""
    await connection.execute(
        _NOTIFY_CHUNKS,
        {"run_ids": list(newest), "seqs": list(newest.values()), "channel": CHANNEL},
    )


_READ_CHUNKS = _driver_statement(
    """
    SELECT seq, data FROM stream_chunks
     WHERE run_id = :run_id AND seq > :after
     ORDER BY seq
     LIMIT :limit
    """
)


async def read_chunks(
    connection: AsyncConnection, run_id: str, *, after: int, limit: int
) -> list[StreamChunk]:
    """The run's stored chunks with seq > ``after``, in order, at most ``limit``."""
    params = {"run_id": run_id, "after": after, "limit": limit}
    rows = await _driver_fetch(connection, _READ_CHUNKS, params)
    return [StreamChunk(row["seq"], bytes(row["data"])) for row in rows]


_STREAM_STATE = _sql(
    "SELECT run_id, status, cancel_requested_at, stream_seq FROM runs WHERE run_id = :run_id"
)


async def stream_state(connection: AsyncConnection, run_id: str) -> RunState | None:
    """The run's state including its stream position, in any status."""
    row = (await connection.execute(_STREAM_STATE, {"run_id": run_id})).first()
    return None if row is None else _run_state(row)


_PRUNE_STREAMS = _sql(
    """
    WITH expired AS (
        UPDATE runs SET stream_seq = NULL
         WHERE status <> 'active' AND ended_at < now() - CAST(:older_than AS interval)
           AND stream_seq IS NOT NULL
        RETURNING run_id
    ), deleted AS (
        DELETE FROM stream_chunks USING expired
         WHERE stream_chunks.run_id = expired.run_id
        RETURNING 1
    )
    SELECT count(*) FROM deleted
    """
)


async def prune_streams(connection: AsyncConnection, older_than: timedelta) -> int:
    """Delete the chunks of runs that ended before ``now() - older_than``; return how many.

    Never touches an active run's stream, and never decisions (the audit trail).
    """
    result = await connection.execute(_PRUNE_STREAMS, {"older_than": older_than})
    return int(result.scalar_one())


# --- administration (test databases) ---------------------------------------------------------

_DATABASE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


def _database_identifier(name: str) -> str:
    # CREATE/DROP DATABASE take no bind parameters, so only names we generate are accepted
    if not _DATABASE_NAME.fullmatch(name):
        raise InvalidInputError("database", f"{name!r} is not a plain lower-case identifier")
    return '"' + name + '"'


async def create_database(
    connection: AsyncConnection, name: str, *, template: str | None = None
) -> None:
    """``CREATE DATABASE name [TEMPLATE template]``; needs an autocommit connection."""
    statement = f"CREATE DATABASE {_database_identifier(name)}"
    if template is not None:
        statement += f" TEMPLATE {_database_identifier(template)}"
    await connection.exec_driver_sql(statement)


async def drop_database(connection: AsyncConnection, name: str) -> None:
    """``DROP DATABASE IF EXISTS name WITH (FORCE)``; needs an autocommit connection."""
    await connection.exec_driver_sql(
        f"DROP DATABASE IF EXISTS {_database_identifier(name)} WITH (FORCE)"
    )


def application_grants(role: str, database: str) -> list[str]:
    """The statements that give ``role`` what the registry needs at run time, and no DDL.

    Reads and writes on the three tables, deletes on ``stream_chunks`` (pruning), read access
    to ``alembic_version`` (the schema check). Migrations run as a different, owning role.
    """
    quoted_role, quoted_database = _database_identifier(role), _database_identifier(database)
    return [
        f"GRANT CONNECT ON DATABASE {quoted_database} TO {quoted_role}",
        f"GRANT USAGE ON SCHEMA public TO {quoted_role}",
        f"GRANT SELECT, INSERT, UPDATE ON runs, decisions, stream_chunks TO {quoted_role}",
        f"GRANT DELETE ON stream_chunks TO {quoted_role}",
        f"GRANT SELECT ON alembic_version TO {quoted_role}",
    ]


_SERVER_VERSION = _sql("SELECT current_setting('server_version_num')::int")


async def server_version(connection: AsyncConnection) -> int:
    """The server's ``server_version_num`` (for example 150019)."""
    return int((await connection.execute(_SERVER_VERSION)).scalar_one())


# --- command line and audit -----------------------------------------------------------------
# Read-only statements for `registry` commands and the embedded database's bootstrap.

_DATABASE_EXISTS = _sql("SELECT EXISTS (SELECT FROM pg_database WHERE datname = :name)")


async def database_exists(connection: AsyncConnection, name: str) -> bool:
    """Whether the server has a database called ``name``."""
    return bool((await connection.execute(_DATABASE_EXISTS, {"name": name})).scalar_one())


_STATUS_COUNTS = _sql(
    """
    SELECT 'runs' AS kind, status, count(*) AS total FROM runs GROUP BY status
    UNION ALL
    SELECT 'decisions' AS kind, status, count(*) AS total FROM decisions GROUP BY status
    """
)


async def status_counts(connection: AsyncConnection) -> dict[str, dict[str, int]]:
    """Rows per status: ``{"runs": {status: count}, "decisions": {status: count}}``.

    Every status appears, with 0 when no row has it.
    """
    counts: dict[str, dict[str, int]] = {
        "runs": dict.fromkeys(RunStatus, 0),
        "decisions": dict.fromkeys(DecisionStatus, 0),
    }
    for row in await connection.execute(_STATUS_COUNTS):
        counts[row.kind][row.status] = int(row.total)
    return {kind: {str(status): n for status, n in by.items()} for kind, by in counts.items()}


_LIST_RUNS = _sql(
    f"""
    SELECT {_RUN_COLUMNS} FROM runs
     WHERE (CAST(:thread_id AS text) IS NULL OR thread_id = CAST(:thread_id AS text))
       AND (CAST(:agent_id AS text) IS NULL OR agent_id = CAST(:agent_id AS text))
       AND (CAST(:status AS text) IS NULL OR status = CAST(:status AS text))
     ORDER BY created_at DESC, run_id
     LIMIT :limit
    """
)


async def list_runs(
    connection: AsyncConnection,
    *,
    thread_id: str | None = None,
    agent_id: str | None = None,
    status: RunStatus | None = None,
    limit: int = 50,
) -> list[RunRecord]:
    """Runs in any status matching every filter given, newest first, at most ``limit``."""
    result = await connection.execute(
        _LIST_RUNS,
        {
            "thread_id": thread_id,
            "agent_id": agent_id,
            "status": None if status is None else str(status),
            "limit": limit,
        },
    )
    return [_run_record(row) for row in result]


_RUN_DETAILS = _sql(
    """
    SELECT run_id, thread_id, agent_id, status, owner_id, lease_expires_at,
           cancel_requested_at, superseded_by, end_reason, created_at, updated_at, ended_at,
           stream_seq,
           (SELECT count(*) FROM stream_chunks WHERE stream_chunks.run_id = runs.run_id)
               AS stored_chunks
      FROM runs WHERE run_id = :run_id
    """
)


async def run_details(connection: AsyncConnection, run_id: str) -> dict[str, Any] | None:
    """Every column of the run's row plus ``stored_chunks``, or ``None`` if there is no such run.

    ``stream_seq`` is the newest chunk's seq (``None``: no stream, or pruned).
    """
    row = (await connection.execute(_RUN_DETAILS, {"run_id": run_id})).first()
    return None if row is None else dict(row._mapping)


_AUDIT = _sql(
    """
    SELECT id, run_id, thread_id, agent_id, decision_id, target_id, action,
           result::text AS result, reason, decision_updated_at, status, attempts, drop_reason,
           received_at, delivered_at, acked_at, dropped_at, delivery_latency, ack_latency,
           run_status, run_owner_id, run_created_at, run_ended_at, run_end_reason
      FROM decision_audit
     WHERE (CAST(:run_id AS text) IS NULL OR run_id = CAST(:run_id AS text))
       AND (CAST(:thread_id AS text) IS NULL OR thread_id = CAST(:thread_id AS text))
       AND (CAST(:agent_id AS text) IS NULL OR agent_id = CAST(:agent_id AS text))
       AND (CAST(:since AS timestamptz) IS NULL OR received_at >= CAST(:since AS timestamptz))
     ORDER BY id DESC
     LIMIT :limit
    """
)


async def audit_trail(
    connection: AsyncConnection,
    *,
    run_id: str | None = None,
    thread_id: str | None = None,
    agent_id: str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of the ``decision_audit`` view matching every filter given, in forward order.

    With ``limit``, the newest ``limit`` rows. ``result`` is decoded JSON; the latencies are
    ``timedelta`` (``None`` until delivered or acknowledged).
    """
    result = await connection.execute(
        _AUDIT,
        {
            "run_id": run_id,
            "thread_id": thread_id,
            "agent_id": agent_id,
            "since": since,
            "limit": limit,
        },
    )
    rows = [dict(row._mapping) for row in result]
    rows.reverse()
    for row in rows:
        row["result"] = json.loads(row["result"])
    return rows
