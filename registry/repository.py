"""Every SQL statement of the registry, each next to the function that runs it.

One way to run a statement: plain ``$n`` SQL on an asyncpg connection. Functions never commit:
the caller owns the transaction (``connections.Connections.transaction()``), or runs a single
statement in autocommit, which PostgreSQL makes one transaction. All values travel as bind
parameters, the notification kinds included; the only SQL text composed at run time is a
column list, a database name we generated or the registry's schema, quoted after a strict
check.

Notifications are sent with ``pg_notify`` inside the statement that makes the change, so they
go out exactly when it commits. Their payloads follow ``registry.notifications``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from registry.database import DEFAULT_SCHEMA, DriverConnection, Row, connection_schema
from registry.errors import InvalidInputError, ThreadBusyError
from registry.models import (
    ConflictPolicy,
    DecisionDelivery,
    DecisionStatus,
    ResumeDecisionAction,
    RunOutcome,
    RunRecord,
    RunStatus,
    StreamChunk,
    ToolCallDecision,
    checked_schema,
)
from registry.notifications import (
    CHANNEL,
    NotificationKey,
    NotificationKind,
    RunChanged,
    encode,
)

#: Statements below name their tables in the default schema (``registry.runs``); :func:`_in`
#: gives the text for the connection's schema. Qualified names rather than ``search_path``:
#: behind a pooler in transaction mode a session setting is not reliably the session's.
_TABLES = "runs|decisions|stream_chunks|notification_secrets|decision_audit|alembic_version"
_QUALIFIED = re.compile(rf"\bregistry\.(?=(?:{_TABLES})\b)")


@functools.cache
def _in_schema(statement: str, schema: str) -> str:
    # ``schema`` is a checked plain identifier (urls.checked_schema): quoting is all it needs
    return _QUALIFIED.sub(f'"{schema}".', statement)


def _in(connection: DriverConnection, statement: str) -> str:
    """``statement`` with its tables in the schema ``connection`` works in (cached)."""
    schema = connection_schema(connection)
    return statement if schema == DEFAULT_SCHEMA else _in_schema(statement, schema)


#: Advisory lock key that serialises concurrent ``migrate`` calls ("registry" in ASCII).
MIGRATION_LOCK_KEY = 0x7265676973747279


def _signed(json_text: str, inner: int, outer: int) -> str:
    """SQL for the signed payload of the JSON text expression ``json_text``: HMAC-SHA256 in hex
    (RFC 2104 over the padded keys bound as ``$inner`` and ``$outer``), then the text, as
    :meth:`NotificationKey.sign` makes it in Python. Only our own expressions go in."""
    mac = (
        f"encode(sha256(${outer}::bytea || sha256(${inner}::bytea || "
        f"convert_to({json_text}, 'UTF8'))), 'hex')"
    )
    return f"{mac} || {json_text}"


# the decision cursor is computed in the same statement (ix_decisions_acked: one index probe)
def _notify_each(rows: str) -> str:
    """SQL that ends a ``WITH`` statement whose CTE ``rows`` returns ``run_id``s: one signed
    notification of kind ``$3`` per run on channel ``$2`` (key pads ``$4``, ``$5``), then
    ``run_id, notified`` per run. Only our own CTE names go in."""
    return f""", payload AS (
        SELECT json_build_object('kind', $3::text, 'id', run_id)::text AS body FROM {rows}
    ), notified AS (
        SELECT pg_notify($2, {_signed("body", 4, 5)}) FROM payload
    )
    SELECT run_id, (SELECT count(*) FROM notified) AS notified FROM {rows}"""


def _notify_each_arguments(kind: NotificationKind, key: NotificationKey) -> tuple[object, ...]:
    """The bind values ``$2`` to ``$5`` of :func:`_notify_each`."""
    return (CHANNEL, kind.value, key.inner_pad, key.outer_pad)


_RUN_COLUMNS = (
    "run_id, thread_id, agent_id, status, owner_id, cancel_requested_at, "
    "created_at, updated_at, ended_at, end_reason, owner_epoch, stream_seq, queued_at, "
    "(SELECT coalesce(max(acked.id), 0) FROM registry.decisions AS acked "
    "WHERE acked.run_id = runs.run_id AND acked.status = 'acked') AS decision_cursor"
)


def _run_record(row: Row) -> RunRecord:
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
        owner_epoch=row["owner_epoch"],
        stream_seq=row["stream_seq"],
        decision_cursor=int(row["decision_cursor"]),
        queued_at=row["queued_at"],
    )


# --- runs ------------------------------------------------------------------------------------


_LOCK_THREAD = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"


_SUPERSEDE_ACTIVE = """
    UPDATE registry.runs
       SET status = 'superseded', superseded_by = $2, end_reason = $3,
           ended_at = now(), updated_at = now(), lease_expires_at = NULL
     WHERE thread_id = $1 AND status = 'active'
    RETURNING run_id
"""


# clock_timestamp(), not now(): taken under the thread's lock, it orders a thread's queue by
# arrival (now() is when each transaction began)
_INSERT_RUN = f"""
    INSERT INTO registry.runs
           (run_id, thread_id, agent_id, owner_id, lease_expires_at, status, queued_at)
    VALUES ($1, $2, $3, $4, now() + $5::interval, $6,
            CASE WHEN $6::text = 'queued' THEN clock_timestamp() END)
    RETURNING {_RUN_COLUMNS}
"""

_ACTIVE_RUN_ID_OF_THREAD = (
    "SELECT run_id FROM registry.runs WHERE thread_id = $1 AND status = 'active'"
)


async def register_run(
    connection: DriverConnection,
    *,
    run_id: str,
    thread_id: str,
    agent_id: str,
    owner_id: str,
    lease: timedelta,
    key: NotificationKey,
    on_conflict: ConflictPolicy = ConflictPolicy.SUPERSEDE,
) -> RunRecord:
    """Register ``run_id`` on the thread, owned by ``owner_id``, inside the caller's
    transaction. With an active run on the thread, ``on_conflict`` says what happens:
    ``supersede``, it is superseded and its open decisions are dropped with a ``superseded``
    notification (the runs queued behind it stay queued); ``reject``, raise
    :class:`ThreadBusyError` having written nothing; ``enqueue``, the run is stored
    ``queued`` behind it and the runs queued before it.

    The thread's advisory lock makes a concurrent register on the same thread wait, then
    apply its policy (without it, both would see no active run and one would fail on the
    unique index); every change of a thread's active run takes it. The primary key refuses a
    reused run id (a retry of this very register included: the caller tells them apart).
    """
    await connection.execute(_LOCK_THREAD, thread_id)
    status = RunStatus.ACTIVE
    if on_conflict is ConflictPolicy.SUPERSEDE:
        reason = f"superseded by run {run_id}"
        old: str | None = await connection.fetchval(
            _in(connection, _SUPERSEDE_ACTIVE), thread_id, run_id, reason
        )
        if old is not None:
            reason = f"run {old} superseded by run {run_id}"
            await drop_open_decisions_and_notify(
                connection, old, reason, NotificationKind.SUPERSEDED, key
            )
    else:
        active: str | None = await connection.fetchval(
            _in(connection, _ACTIVE_RUN_ID_OF_THREAD), thread_id
        )
        # this very run (a retried register) goes on to the insert, which the key refuses
        if active is not None and active != run_id:
            if on_conflict is ConflictPolicy.REJECT:
                raise ThreadBusyError(thread_id, active)
            status = RunStatus.QUEUED
    row = await connection.fetchrow(
        _in(connection, _INSERT_RUN), run_id, thread_id, agent_id, owner_id, lease, status.value
    )
    assert row is not None  # INSERT ... RETURNING of one row
    return _run_record(row)


# The thread's lock first, as register takes it: a register (thread lock, then the active
# run's row) and an end (the row, then the thread lock) would otherwise deadlock.
_LOCK_THREAD_OF_RUN = """
    SELECT thread_id, pg_advisory_xact_lock(hashtextextended(thread_id, 0))
      FROM registry.runs WHERE run_id = $1
"""


async def _lock_thread_of(connection: DriverConnection, run_id: str) -> str | None:
    """Take the advisory lock of the run's thread until the transaction ends; return the
    thread's id (``None``: no such run, nothing locked)."""
    row = await connection.fetchrow(_in(connection, _LOCK_THREAD_OF_RUN), run_id)
    return None if row is None else str(row["thread_id"])


# Without an outcome ($2), the seed's rule: cancelled if a cancel was requested, else
# completed. The reason defaults to the outcome's name.
_END_RUN = """
    UPDATE registry.runs
       SET status = coalesce(
               $3::text,
               CASE WHEN cancel_requested_at IS NULL THEN 'completed' ELSE 'cancelled' END),
           end_reason = coalesce(
               $4::text, $3::text,
               CASE WHEN cancel_requested_at IS NULL THEN 'removed' ELSE 'cancelled' END),
           cancel_requested_at = CASE WHEN $3::text = 'cancelled'
                                      THEN coalesce(cancel_requested_at, now())
                                      ELSE cancel_requested_at END,
           ended_at = now(), updated_at = now(), lease_expires_at = NULL
     WHERE run_id = $1 AND status = 'active' AND ($2::bigint IS NULL OR owner_epoch = $2)
    RETURNING run_id
"""


async def end_run(
    connection: DriverConnection,
    run_id: str,
    key: NotificationKey,
    *,
    lease: timedelta,
    epoch: int | None = None,
    outcome: RunOutcome | None = None,
    reason: str | None = None,
) -> bool:
    """Finish an active run inside the caller's transaction, as ``outcome`` with ``reason``
    (default: the outcome's name); without ``outcome``, ``cancelled`` if a cancel was
    requested, else ``completed``. Its open decisions are dropped with an ``ended``
    notification, and the oldest run queued on its thread becomes active (with ``lease``, see
    :func:`promote_next`). ``False`` (nothing
    written) if the run was not active, or, with ``epoch``, is held under another owner epoch
    (tell the two apart with :func:`owner_epoch_of`)."""
    thread_id = await _lock_thread_of(connection, run_id)
    if thread_id is None:
        return False
    status = None if outcome is None else outcome.value
    if await connection.fetchval(_in(connection, _END_RUN), run_id, epoch, status, reason) is None:
        return False
    dropped = f"run {run_id} ended"
    await drop_open_decisions_and_notify(connection, run_id, dropped, NotificationKind.ENDED, key)
    await promote_next(connection, thread_id, lease, key)
    return True


# The caller holds the thread's lock, so the queue and the active run cannot change under it.
_PROMOTE_NEXT = f"""
    WITH next AS (
        SELECT run_id FROM registry.runs
         WHERE thread_id = $1 AND status = 'queued'
           AND NOT EXISTS (SELECT FROM registry.runs WHERE thread_id = $1 AND status = 'active')
         ORDER BY queued_at, run_id
         LIMIT 1
    ), promoted AS (
        UPDATE registry.runs SET status = 'active', updated_at = now(),
               lease_expires_at = now() + $6::interval
          FROM next
         WHERE runs.run_id = next.run_id AND runs.status = 'queued'
        RETURNING runs.run_id
    ){_notify_each("promoted")}
"""


async def promote_next(
    connection: DriverConnection, thread_id: str, lease: timedelta, key: NotificationKey
) -> str | None:
    """Make the oldest queued run of the thread active if the thread has no active run, with
    an ``active`` notification; return its id. The caller holds the thread's lock (see
    :func:`register_run`). The run keeps its owner and epoch, and gets a lease of ``lease``
    (its owner renews it from then on; an owner gone lets it be adopted)."""
    row = await connection.fetchrow(
        _in(connection, _PROMOTE_NEXT),
        thread_id,
        *_notify_each_arguments(NotificationKind.ACTIVE, key),
        lease,
    )
    return None if row is None else str(row["run_id"])


_CANCEL_QUEUED = """
    UPDATE registry.runs
       SET status = 'cancelled', end_reason = 'cancelled while queued',
           cancel_requested_at = now(), ended_at = now(), updated_at = now(),
           lease_expires_at = NULL
     WHERE run_id = $1 AND status = 'queued'
    RETURNING run_id, pg_notify($2, $3), pg_notify($2, $4)
"""


async def cancel_queued_run(
    connection: DriverConnection, run_id: str, key: NotificationKey
) -> bool:
    """End the queued run ``run_id`` as ``cancelled`` (it never becomes active), with a
    ``cancel`` and an ``ended`` notification, inside the caller's transaction; ``False`` if it
    is not queued. Takes the thread's lock first, so a promotion never picks it meanwhile."""
    if await _lock_thread_of(connection, run_id) is None:
        return False
    cancel = encode(RunChanged(NotificationKind.CANCEL, run_id), key)
    ended = encode(RunChanged(NotificationKind.ENDED, run_id), key)
    return (
        await connection.fetchrow(_in(connection, _CANCEL_QUEUED), run_id, CHANNEL, cancel, ended)
        is not None
    )


_ACTIVE_BY_THREAD = (
    f"SELECT {_RUN_COLUMNS} FROM registry.runs WHERE thread_id = $1 AND status = 'active'"
)


async def active_run_by_thread(connection: DriverConnection, thread_id: str) -> RunRecord | None:
    """The thread's active run, if any."""
    row = await connection.fetchrow(_in(connection, _ACTIVE_BY_THREAD), thread_id)
    return None if row is None else _run_record(row)


_ACTIVE_BY_RUN_ID = (
    f"SELECT {_RUN_COLUMNS} FROM registry.runs WHERE run_id = $1 AND status = 'active'"
)


async def active_run_by_id(connection: DriverConnection, run_id: str) -> RunRecord | None:
    """The run ``run_id`` if it is active."""
    row = await connection.fetchrow(_in(connection, _ACTIVE_BY_RUN_ID), run_id)
    return None if row is None else _run_record(row)


_RUN_BY_ID = f"SELECT {_RUN_COLUMNS} FROM registry.runs WHERE run_id = $1"


async def run_by_id(connection: DriverConnection, run_id: str) -> RunRecord | None:
    """The run ``run_id`` in any status."""
    row = await connection.fetchrow(_in(connection, _RUN_BY_ID), run_id)
    return None if row is None else _run_record(row)


@dataclass(frozen=True, slots=True)
class RunState:
    """The part of a run that tokens, inboxes and stream subscribers watch."""

    run_id: str
    status: RunStatus
    cancel_requested: bool
    #: the newest chunk seq, or ``None`` if the run has no (retained) stream
    stream_seq: int | None
    #: the fencing token of the run's current owner
    owner_epoch: int = 1


def _run_state(row: Row) -> RunState:
    return RunState(
        row["run_id"],
        RunStatus(row["status"]),
        row["cancel_requested_at"] is not None,
        row["stream_seq"],
        row["owner_epoch"],
    )


_RUN_STATES = """
    SELECT run_id, status, cancel_requested_at, stream_seq, owner_epoch
      FROM registry.runs WHERE run_id = ANY($1::text[])
"""


async def run_states(connection: DriverConnection, run_ids: Sequence[str]) -> list[RunState]:
    """State of many runs in one round trip (the safety-net re-check); missing runs are absent."""
    return [
        _run_state(row)
        for row in await connection.fetch(_in(connection, _RUN_STATES), list(run_ids))
    ]


# The safety net's run check, answered by the server: the watched runs, with what the process
# already knows as short lists of exceptions (runs whose cancel it has seen, runs it has not
# yet seen active, subscribers' lowest positions); only the rows that say more come back, or
# a missing row (the run is gone), so the answer grows with what changed.
_CHANGED_RUN_STATES = """
    SELECT known.run_id, runs.status, runs.cancel_requested_at, runs.stream_seq,
           runs.owner_epoch
      FROM unnest($1::text[]) AS known(run_id)
      LEFT JOIN registry.runs ON runs.run_id = known.run_id
      LEFT JOIN unnest($4::text[], $5::bigint[]) AS read(run_id, position)
             ON read.run_id = known.run_id
     WHERE runs.run_id IS NULL
        OR runs.status NOT IN ('active', 'queued')
        OR (runs.cancel_requested_at IS NOT NULL AND known.run_id <> ALL($2::text[]))
        OR (runs.status = 'active' AND known.run_id = ANY($3::text[]))
        OR runs.stream_seq > read.position
"""


@dataclass(frozen=True, slots=True)
class KnownRuns:
    """What a process already knows of the runs it watches, for :func:`changed_run_states`:
    every watched ``run_ids``; of those, the ones whose cancel it has seen, the ones it has not
    yet seen active, and for runs with subscribers, the lowest subscriber position."""

    run_ids: list[str]
    cancelled: list[str]
    not_active: list[str]
    stream_positions: dict[str, int]


async def changed_run_states(
    connection: DriverConnection, known: KnownRuns
) -> tuple[list[RunState], list[str]]:
    """The states of the runs in ``known`` that say more than is known (ended, cancelled,
    activated, chunks past the position), and the ids of those that no longer exist."""
    rows = await connection.fetch(
        _in(connection, _CHANGED_RUN_STATES),
        known.run_ids,
        known.cancelled,
        known.not_active,
        list(known.stream_positions),
        list(known.stream_positions.values()),
    )
    gone = [row["run_id"] for row in rows if row["status"] is None]
    return [_run_state(row) for row in rows if row["status"] is not None], gone


_STREAM_STATE = """
    SELECT run_id, status, cancel_requested_at, stream_seq, owner_epoch
      FROM registry.runs WHERE run_id = $1
"""


async def stream_state(connection: DriverConnection, run_id: str) -> RunState | None:
    """The run's state including its stream position, in any status."""
    row = await connection.fetchrow(_in(connection, _STREAM_STATE), run_id)
    return None if row is None else _run_state(row)


_CANCEL_BY_ID = """
    WITH cancelled AS (
        UPDATE registry.runs
           SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now()
         WHERE run_id = $1 AND status = 'active'
        RETURNING run_id
    )
    SELECT run_id, pg_notify($2, $3) FROM cancelled
"""


async def request_cancel_by_id(
    connection: DriverConnection, run_id: str, key: NotificationKey
) -> str | None:
    """Record a cancel request on the active run ``run_id`` and notify; return its id.

    The first request's time is kept; repeating it is harmless and notifies again.
    """
    payload = encode(RunChanged(NotificationKind.CANCEL, run_id), key)
    row = await connection.fetchrow(_in(connection, _CANCEL_BY_ID), run_id, CHANNEL, payload)
    return None if row is None else str(row["run_id"])


_CANCEL_BY_THREAD = f"""
    WITH cancelled AS (
        UPDATE registry.runs
           SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now()
         WHERE thread_id = $1 AND status = 'active' AND ($2::text IS NULL OR agent_id = $2::text)
        RETURNING run_id
    ), payload AS (
        SELECT run_id, json_build_object('kind', $4::text, 'id', run_id)::text AS body
          FROM cancelled
    )
    SELECT run_id, pg_notify($3, {_signed("body", 5, 6)}) FROM payload
"""


async def request_cancel_by_thread(
    connection: DriverConnection,
    thread_id: str,
    agent_id: str | None,
    key: NotificationKey,
) -> str | None:
    """Record a cancel request on the thread's active run and notify; return the run's id.

    With ``agent_id``, only if that agent owns the run.
    """
    row = await connection.fetchrow(
        _in(connection, _CANCEL_BY_THREAD),
        thread_id,
        agent_id,
        CHANNEL,
        NotificationKind.CANCEL.value,
        key.inner_pad,
        key.outer_pad,
    )
    return None if row is None else str(row["run_id"])


# --- ownership and recovery -------------------------------------------------------------------

# Statements that lock several runs' rows lock them in run id order (a batch of appends does
# too), so two of them never deadlock; NO KEY UPDATE is what the UPDATE takes anyway.
_LOCK_HELD = """
    locked AS MATERIALIZED (
        SELECT run_id FROM registry.runs WHERE run_id = ANY($1::text[]) AND status = 'active'
         ORDER BY run_id
           FOR NO KEY UPDATE
    )
"""

_RENEW_LEASES = f"""
    WITH {_LOCK_HELD}
    UPDATE registry.runs SET lease_expires_at = now() + $3::interval
      FROM unnest($1::text[], $2::bigint[]) AS held(run_id, epoch) JOIN locked USING (run_id)
     WHERE runs.run_id = held.run_id AND runs.owner_epoch = held.epoch
       AND runs.status = 'active'
    RETURNING runs.run_id
"""


async def renew_leases(
    connection: DriverConnection, held: Mapping[str, int], lease: timedelta
) -> set[str]:
    """Extend the lease of each run in ``held`` (run id to owner epoch) that is still active
    under that epoch, in one statement; return the ids renewed. A run missing from the result
    has ended, is still queued, or another registry took it (see :func:`held_run_states`).

    Queued runs are left alone: a promotion gives them a fresh lease, and locking them here
    could close a cycle with an end that promotes (its run's row, then the queued one)."""
    rows = await connection.fetch(
        _in(connection, _RENEW_LEASES), list(held), list(held.values()), lease
    )
    return {row["run_id"] for row in rows}


_HELD_RUN_STATES = """
    SELECT run_id, status, owner_epoch FROM registry.runs WHERE run_id = ANY($1::text[])
"""


async def held_run_states(
    connection: DriverConnection, run_ids: Sequence[str]
) -> dict[str, tuple[RunStatus, int]]:
    """Status and owner epoch of each run in ``run_ids`` that exists."""
    rows = await connection.fetch(_in(connection, _HELD_RUN_STATES), list(run_ids))
    return {row["run_id"]: (RunStatus(row["status"]), row["owner_epoch"]) for row in rows}


_RELEASE_LEASES = f"""
    WITH {_LOCK_HELD}
    UPDATE registry.runs SET lease_expires_at = now()
      FROM unnest($1::text[], $2::bigint[]) AS held(run_id, epoch) JOIN locked USING (run_id)
     WHERE runs.run_id = held.run_id AND runs.owner_epoch = held.epoch
       AND runs.status = 'active'
"""


async def release_leases(connection: DriverConnection, held: Mapping[str, int]) -> None:
    """Let the runs in ``held`` (run id to owner epoch) be adopted at once: a registry that
    shuts down cleanly releases only what it holds, never another registry's runs of the same
    worker id."""
    await connection.execute(_in(connection, _RELEASE_LEASES), list(held), list(held.values()))


# Resuming takes every active run of the worker id (a restarted process continues them), and
# moves the epoch on for each one this registry does not already hold: a registry of the same
# worker id still running (an overlapping deploy) is fenced off those runs.
_RESUME_OWNED = f"""
    UPDATE registry.runs SET lease_expires_at = now() + $2::interval, updated_at = now(),
           owner_epoch = owner_epoch + CASE
               WHEN (run_id, owner_epoch) IN (SELECT * FROM unnest($3::text[], $4::bigint[]))
               THEN 0 ELSE 1 END
     WHERE run_id IN (
            -- FOR UPDATE: it waits for claims and acks in flight under the old epoch (they
            -- lock the row FOR KEY SHARE, which a plain UPDATE would not wait for)
            SELECT run_id FROM registry.runs WHERE owner_id = $1 AND status = 'active'
             ORDER BY run_id FOR UPDATE
           )
    RETURNING {_RUN_COLUMNS}
"""


async def resume_owned(
    connection: DriverConnection,
    owner_id: str,
    lease: timedelta,
    held: Mapping[str, int] | None = None,
) -> list[RunRecord]:
    """Renew and return the active runs of ``owner_id``, oldest first; the owner epoch moves on
    for each run not in ``held`` (run id to the epoch this registry holds it under). Queued
    runs are taken by :func:`resume_owned_queued`, in a statement of their own."""
    held = held or {}
    rows = await connection.fetch(
        _in(connection, _RESUME_OWNED), owner_id, lease, list(held), list(held.values())
    )
    return sorted((_run_record(row) for row in rows), key=lambda run: run.created_at)


# Queued rows only, apart from the active ones: an end locks its active row, then the queued
# row it promotes; one statement locking both kinds in run id order could close that cycle.
# No lease: a queued run's is set when it is promoted.
_RESUME_OWNED_QUEUED = f"""
    UPDATE registry.runs SET updated_at = now(),
           owner_epoch = owner_epoch + CASE
               WHEN (run_id, owner_epoch) IN (SELECT * FROM unnest($2::text[], $3::bigint[]))
               THEN 0 ELSE 1 END
     WHERE run_id IN (
            SELECT run_id FROM registry.runs WHERE owner_id = $1 AND status = 'queued'
             ORDER BY run_id FOR UPDATE
           )
       AND status = 'queued'
    RETURNING {_RUN_COLUMNS}
"""


async def resume_owned_queued(
    connection: DriverConnection, owner_id: str, held: Mapping[str, int]
) -> list[RunRecord]:
    """Take and return the queued runs of ``owner_id``; the owner epoch moves on for each run
    not in ``held`` (as :func:`resume_owned`), which fences off a registry of the same owner
    still waiting on them. A run promoted meanwhile is not returned (it is active: take it
    with :func:`resume_owned` after this)."""
    rows = await connection.fetch(
        _in(connection, _RESUME_OWNED_QUEUED), owner_id, list(held), list(held.values())
    )
    return [_run_record(row) for row in rows]


_ADOPT_ORPHANS = f"""
    UPDATE registry.runs
       SET owner_id = $1, updated_at = now(), lease_expires_at = now() + $2::interval,
           owner_epoch = owner_epoch + 1
     WHERE run_id IN (
            SELECT run_id FROM registry.runs
             WHERE status = 'active'
               AND (lease_expires_at IS NULL OR lease_expires_at < now())
               -- not a run the adopter holds itself (its heartbeat fell behind): adopting it
               -- would fence off its own handles
               AND run_id <> ALL($4::text[])
             ORDER BY lease_expires_at NULLS FIRST, created_at
             LIMIT $3
               FOR UPDATE SKIP LOCKED
           )
       -- re-checked on the locked row: a run adopted meanwhile has a fresh lease
       AND (lease_expires_at IS NULL OR lease_expires_at < now())
    RETURNING {_RUN_COLUMNS}
"""


async def adopt_orphans(
    connection: DriverConnection,
    owner_id: str,
    lease: timedelta,
    limit: int,
    held: Sequence[str] = (),
) -> list[RunRecord]:
    """Claim up to ``limit`` active runs whose lease expired, except those in ``held`` (the
    adopter's own); never one claimed by another. The owner epoch of each moves on.

    ``SKIP LOCKED`` lets concurrent adopters take disjoint runs without waiting.
    """
    rows = await connection.fetch(
        _in(connection, _ADOPT_ORPHANS), owner_id, lease, limit, list(held)
    )
    return sorted((_run_record(row) for row in rows), key=lambda run: run.created_at)


_CANCELLED_ORPHAN = """
    status = 'active' AND cancel_requested_at IS NOT NULL
    AND lease_expires_at < now() - $1::interval
"""

_THREADS_OF_CANCELLED_ORPHANS = f"""
    SELECT DISTINCT thread_id FROM registry.runs WHERE {_CANCELLED_ORPHAN}
"""

# one thread after the other in a fixed order: two sweepers never wait on each other in a ring
_LOCK_THREADS = """
    SELECT pg_advisory_xact_lock(hashtextextended(thread_id, 0))
      FROM (SELECT thread_id FROM unnest($1::text[]) AS thread_id
             ORDER BY hashtextextended(thread_id, 0)) AS ordered
"""

_SWEEP_CANCELLED_ORPHANS = f"""
    WITH swept AS (
        UPDATE registry.runs
           SET status = 'cancelled', end_reason = 'cancelled while its owner was gone',
               ended_at = now(), updated_at = now()
         WHERE {_CANCELLED_ORPHAN} AND thread_id = ANY($6::text[])
        RETURNING run_id
    ){_notify_each("swept")}
"""


async def sweep_cancelled_orphans(
    connection: DriverConnection, grace: timedelta, key: NotificationKey
) -> list[str]:
    """Finish as ``cancelled`` the runs whose cancel is pending and whose lease expired more
    than ``grace`` ago (nobody adopted them); return their ids. The oldest run queued on each
    of their threads becomes active. Their decisions are dropped by the caller in a
    following statement.
    """
    threads = [
        row["thread_id"]
        for row in await connection.fetch(_in(connection, _THREADS_OF_CANCELLED_ORPHANS), grace)
    ]
    if not threads:
        return []
    await connection.execute(_LOCK_THREADS, threads)
    rows = await connection.fetch(
        _in(connection, _SWEEP_CANCELLED_ORPHANS),
        grace,
        *_notify_each_arguments(NotificationKind.ENDED, key),
        threads,
    )
    for thread_id in threads:
        await promote_next(connection, thread_id, grace, key)
    return [row["run_id"] for row in rows]


# --- decisions -------------------------------------------------------------------------------

_DROP_OPEN_DECISIONS = """
    UPDATE registry.decisions SET status = 'dropped', drop_reason = $2, dropped_at = now()
     WHERE run_id = $1 AND status IN ('pending', 'delivered')
"""


async def drop_open_decisions(connection: DriverConnection, run_id: str, reason: str) -> int:
    """Drop the run's decisions that were not acknowledged; return how many.

    Runs as its own statement after the run's row was updated, so that it sees decisions
    committed by a forward that held the run's row lock until then.
    """
    status = await connection.execute(_in(connection, _DROP_OPEN_DECISIONS), run_id, reason)
    return int(status.rsplit(" ", 1)[-1])


_DROP_OPEN_DECISIONS_AND_NOTIFY = """
    WITH dropped AS (
        UPDATE registry.decisions SET status = 'dropped', drop_reason = $2, dropped_at = now()
         WHERE run_id = $1 AND status IN ('pending', 'delivered')
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM dropped) AS dropped, pg_notify($3, $4)
"""


async def drop_open_decisions_and_notify(
    connection: DriverConnection,
    run_id: str,
    reason: str,
    kind: NotificationKind,
    key: NotificationKey,
) -> int:
    """:func:`drop_open_decisions` and a ``kind`` notification of the run, in one round trip."""
    payload = encode(RunChanged(kind, run_id), key)
    dropped = await connection.fetchval(
        _in(connection, _DROP_OPEN_DECISIONS_AND_NOTIFY), run_id, reason, CHANNEL, payload
    )
    return int(dropped)


# One statement: lock the active run FOR SHARE (so a concurrent supersede or remove waits and
# then drops what we add), insert the batch in order, skip decision ids already stored, and
# notify only if something new was stored. One statement is one transaction: all or none.
_FORWARD = f"""
    WITH run AS (
        SELECT run_id, thread_id, agent_id FROM registry.runs
         WHERE {{run_filter}} AND status = 'active'
           FOR SHARE
    ), inserted AS (
        INSERT INTO registry.decisions (run_id, thread_id, agent_id, decision_id, target_id, action,
                               result, reason, decision_updated_at)
        SELECT run.run_id, run.thread_id, run.agent_id, d.decision_id, d.target_id,
               d.action, d.result::jsonb, d.reason, d.updated_at
          FROM run,
               unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[])
               WITH ORDINALITY
               AS d(decision_id, target_id, action, result, reason, updated_at, ord)
         ORDER BY d.ord
        ON CONFLICT (run_id, decision_id) WHERE decision_id <> '' DO NOTHING
        RETURNING id
    ), payload AS (
        SELECT json_build_object('kind', $8::text, 'id', run_id)::text AS body
          FROM run
         WHERE EXISTS (SELECT FROM inserted)
    ), notified AS (
        SELECT pg_notify($7, {_signed("body", 9, 10)}) FROM payload
    )
    SELECT run.run_id, run.thread_id,
           (SELECT count(*) FROM inserted) AS inserted,
           (SELECT count(*) FROM notified) AS notified
      FROM run
"""
_FORWARD_BY_RUN_ID = _FORWARD.replace("{run_filter}", "run_id = $11")
_FORWARD_BY_THREAD = _FORWARD.replace("{run_filter}", "thread_id = $11 AND agent_id = $12")


@dataclass(frozen=True, slots=True)
class ForwardResult:
    """Where a forward went and how many of its decisions were new."""

    run_id: str
    thread_id: str
    inserted: int


def _forward_arguments(
    decisions: Sequence[ToolCallDecision], results: Sequence[str], key: NotificationKey
) -> tuple[object, ...]:
    return (
        [d.decision_id for d in decisions],
        [d.target_id for d in decisions],
        [d.action.value for d in decisions],
        list(results),
        [d.reason for d in decisions],
        [d.updated_at for d in decisions],
        CHANNEL,
        NotificationKind.DECISION.value,
        key.inner_pad,
        key.outer_pad,
    )


def _forward_result(row: Row | None) -> ForwardResult | None:
    if row is None:
        return None
    return ForwardResult(row["run_id"], row["thread_id"], int(row["inserted"]))


async def forward_by_run_id(
    connection: DriverConnection,
    run_id: str,
    decisions: Sequence[ToolCallDecision],
    results: Sequence[str],
    key: NotificationKey,
) -> ForwardResult | None:
    """Queue ``decisions`` on the active run ``run_id``; ``None`` if it is not active.

    ``results`` holds each decision's ``result`` already encoded as JSON text.
    """
    arguments = _forward_arguments(decisions, results, key)
    return _forward_result(
        await connection.fetchrow(_in(connection, _FORWARD_BY_RUN_ID), *arguments, run_id)
    )


async def forward_by_thread(
    connection: DriverConnection,
    agent_id: str,
    thread_id: str,
    decisions: Sequence[ToolCallDecision],
    results: Sequence[str],
    key: NotificationKey,
) -> ForwardResult | None:
    """Queue ``decisions`` on the thread's active run if ``agent_id`` owns it, else ``None``.

    ``results`` holds each decision's ``result`` already encoded as JSON text.
    """
    arguments = _forward_arguments(decisions, results, key)
    row = await connection.fetchrow(
        _in(connection, _FORWARD_BY_THREAD), *arguments, thread_id, agent_id
    )
    return _forward_result(row)


# Many forwards (each to another run) in one statement: one commit, one turn of the
# notification lock. The runs' rows are locked in run id order, as the other statements that
# lock several runs do; each run's decisions are inserted in their forward's order.
_FORWARD_BATCH = f"""
    WITH request AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
               WITH ORDINALITY AS request(run_id, thread_id, agent_id, ord)
    ), run AS MATERIALIZED (
        SELECT request.ord, runs.run_id, runs.thread_id, runs.agent_id
          FROM request JOIN registry.runs ON {{run_match}}
         WHERE runs.status = 'active'
         ORDER BY runs.run_id
           FOR SHARE OF runs
    ), inserted AS (
        INSERT INTO registry.decisions (run_id, thread_id, agent_id, decision_id, target_id, action,
                               result, reason, decision_updated_at)
        SELECT run.run_id, run.thread_id, run.agent_id, d.decision_id, d.target_id,
               d.action, d.result::jsonb, d.reason, d.updated_at
          FROM run
          JOIN unnest($4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
                      $10::bigint[])
               WITH ORDINALITY
               AS d(request, decision_id, target_id, action, result, reason, updated_at, ord)
            ON d.request = run.ord
         ORDER BY d.ord
        ON CONFLICT (run_id, decision_id) WHERE decision_id <> '' DO NOTHING
        RETURNING run_id
    ), counted AS (
        SELECT run_id, count(*) AS inserted FROM inserted GROUP BY run_id
    ), payload AS (
        SELECT json_build_object('kind', $12::text, 'id', run_id)::text AS body FROM counted
    ), notified AS (
        SELECT pg_notify($11, {_signed("body", 13, 14)}) FROM payload
    )
    SELECT run.ord, run.run_id, run.thread_id, coalesce(counted.inserted, 0) AS inserted,
           (SELECT count(*) FROM notified) AS notified
      FROM run LEFT JOIN counted USING (run_id)
"""
_FORWARD_BATCH_BY_RUN_ID = _FORWARD_BATCH.replace("{run_match}", "runs.run_id = request.run_id")
_FORWARD_BATCH_BY_THREAD = _FORWARD_BATCH.replace(
    "{run_match}", "runs.thread_id = request.thread_id AND runs.agent_id = request.agent_id"
)


@dataclass(frozen=True, slots=True)
class Forward:
    """One forward for :func:`forward_batch`: ``decisions`` (with each ``result`` already JSON
    text in ``results``) for the active run ``run_id``, or, without it, for the active run of
    ``thread_id`` if ``agent_id`` owns it."""

    decisions: Sequence[ToolCallDecision]
    results: Sequence[str]
    run_id: str | None = None
    thread_id: str | None = None
    agent_id: str | None = None


async def forward_batch(
    connection: DriverConnection, forwards: Sequence[Forward], key: NotificationKey
) -> list[ForwardResult | None]:
    """Several forwards in one statement, all by run id or all by thread, each to another run;
    each one's result in order, as :func:`forward_by_run_id` and :func:`forward_by_thread`
    give it (``None`` where there was no such active run)."""
    by_thread = forwards[0].run_id is None
    if any((forward.run_id is None) is not by_thread for forward in forwards):
        raise ValueError("a forward batch is all by run id or all by thread")
    requests: list[int] = []
    for index, forward in enumerate(forwards, start=1):
        requests.extend([index] * len(forward.decisions))
    decisions = [decision for forward in forwards for decision in forward.decisions]
    rows = await connection.fetch(
        _in(connection, _FORWARD_BATCH_BY_THREAD if by_thread else _FORWARD_BATCH_BY_RUN_ID),
        [forward.run_id for forward in forwards],
        [forward.thread_id for forward in forwards],
        [forward.agent_id for forward in forwards],
        requests,
        *_forward_arguments(
            decisions, [result for forward in forwards for result in forward.results], key
        ),
    )
    results: list[ForwardResult | None] = [None] * len(forwards)
    for row in rows:
        results[row["ord"] - 1] = _forward_result(row)
    return results


# With an epoch, the claim first locks the run's row FOR KEY SHARE under that epoch: an
# adopter's row lock (FOR UPDATE) makes it wait, and once the adoption commits the re-checked
# row no longer matches, so nothing is claimed under a lost lease.
_CLAIM_DECISIONS = """
    WITH owner AS (
        SELECT 1 FROM registry.runs WHERE run_id = $1 AND owner_epoch = $5 FOR KEY SHARE
    ), relaxed AS (
        -- this statement's commit need not wait for the WAL flush: if a server crash loses
        -- the mark, the decision is simply delivered again, which at-least-once allows
        SELECT set_config('synchronous_commit', 'off', true)
    ), candidates AS (
        SELECT id, attempts FROM registry.decisions
         WHERE run_id = $1 AND status IN ('pending', 'delivered')
           AND ($5::bigint IS NULL OR EXISTS (SELECT 1 FROM owner))
           -- ids are drawn at insert, not at commit: a forward that commits after a later
           -- one has a lower id than this inbox's cursor, so pending rows are always taken
           AND (status = 'pending' OR id > $2)
         ORDER BY id
         LIMIT $3
           FOR UPDATE
    ), dead AS (
        UPDATE registry.decisions
           SET status = 'dropped', dropped_at = now(),
               drop_reason = 'dead-lettered after ' || attempts || ' delivery attempts'
         WHERE id IN (SELECT id FROM candidates WHERE attempts >= $4)
        RETURNING id
    ), claimed AS (
        UPDATE registry.decisions
           SET status = 'delivered', delivered_at = coalesce(delivered_at, now()),
               attempts = attempts + 1
         WHERE id IN (SELECT id FROM candidates WHERE attempts < $4)
        RETURNING id, run_id, decision_id, target_id, action, result::text AS result, reason,
                  decision_updated_at, attempts, received_at
    )
    SELECT claimed.*, false AS dead, true AS owned FROM claimed, relaxed
    UNION ALL
    SELECT dead.id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true, true
      FROM dead, relaxed
    UNION ALL
    -- the one row that says the lease was lost: the epoch given is no longer the run's
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, false
     WHERE $5::bigint IS NOT NULL AND NOT EXISTS (SELECT 1 FROM owner)
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim took: deliveries in forward order, and how far it looked."""

    deliveries: list[DecisionDelivery]
    #: the highest decision id examined, delivered or dead-lettered (``after`` if none)
    examined: int
    dead_lettered: int
    #: whether the claim hit its limit (more may be waiting)
    full: bool
    #: whether the run is held under another owner epoch now (nothing was claimed)
    lease_lost: bool = False


async def claim_decisions(
    connection: DriverConnection,
    run_id: str,
    *,
    after: int,
    limit: int,
    max_attempts: int,
    epoch: int | None = None,
) -> Claim:
    """Mark the run's next unacknowledged decisions (id > ``after``) delivered and return them.

    Each claim counts one delivery attempt; a decision already delivered ``max_attempts``
    times is dropped as dead-lettered instead. Deliveries come in forward order. With
    ``epoch``, nothing is claimed unless the run is still held under that owner epoch
    (``Claim.lease_lost`` says so).
    """
    rows = await connection.fetch(
        _in(connection, _CLAIM_DECISIONS), run_id, after, limit, max_attempts, epoch
    )
    if rows and not rows[-1]["owned"]:
        return Claim([], after, 0, full=False, lease_lost=True)
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


# Unlike the claim, the ack takes no lock on the run: an ack racing an adoption can only mark
# acked a decision the old owner did apply, and a decision is acked once (status 'delivered'
# to 'acked'), so none is acked by both owners; once the adoption is visible, acks are refused.
# Acknowledgements of many deliveries (of any runs) in one statement. The rows are locked in
# id order first, as a claim locks its run's rows, so an ack batch and a claim never deadlock.
_ACK_DECISIONS = """
    WITH request AS (
        SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[])
               WITH ORDINALITY AS request(id, run_id, epoch, ord)
    ), owned AS (
        SELECT request.ord FROM request
         WHERE request.epoch IS NULL
            OR EXISTS (SELECT 1 FROM registry.runs
                        WHERE runs.run_id = request.run_id AND runs.owner_epoch = request.epoch)
    ), locked AS MATERIALIZED (
        SELECT decisions.id FROM registry.decisions
         WHERE decisions.id = ANY($1::bigint[]) AND decisions.status = 'delivered'
         ORDER BY decisions.id
           FOR NO KEY UPDATE
    ), acked AS (
        UPDATE registry.decisions SET status = 'acked', acked_at = now()
          FROM request JOIN owned USING (ord) JOIN locked USING (id)
         WHERE decisions.id = request.id AND decisions.run_id = request.run_id
           AND decisions.status = 'delivered'
        RETURNING request.ord
    )
    SELECT request.ord,
           EXISTS (SELECT 1 FROM acked WHERE acked.ord = request.ord) AS acked,
           EXISTS (SELECT 1 FROM owned WHERE owned.ord = request.ord) AS owned
      FROM request
     ORDER BY request.ord
"""


@dataclass(frozen=True, slots=True)
class Ack:
    """One acknowledgement for :func:`ack_decisions`: delivery ``delivery_id`` of ``run_id``,
    only while the run is held under owner ``epoch`` when given."""

    run_id: str
    delivery_id: int
    epoch: int | None


async def ack_decisions(connection: DriverConnection, acks: Sequence[Ack]) -> list[bool | None]:
    """Mark delivered decisions acknowledged, in one statement; for each ack in order: ``True``
    if stored, ``False`` if the decision was not awaiting an ack, and ``None`` (nothing
    written) if, with ``epoch``, the run is held under another owner epoch. A delivery id
    twice in ``acks`` is acknowledged once (the first ``True``, the other ``False``)."""
    rows = await connection.fetch(
        _in(connection, _ACK_DECISIONS),
        [ack.delivery_id for ack in acks],
        [ack.run_id for ack in acks],
        [ack.epoch for ack in acks],
    )
    return [None if not row["owned"] else bool(row["acked"]) for row in rows]


# The safety net's inbox check, answered by the server: only the runs whose inboxes are
# behind come back, so its cost on the wire and in the process grows with what changed.
_INBOXES_BEHIND = """
    SELECT known.run_id
      FROM unnest($1::text[], $2::bigint[]) AS known(run_id, position)
     WHERE EXISTS (
           SELECT 1 FROM registry.decisions
            WHERE decisions.run_id = known.run_id AND status IN ('pending', 'delivered')
              -- a pending one may sit below the cursor (ids are drawn at insert)
              AND (status = 'pending' OR id > known.position)
           )
"""


async def inboxes_behind(
    connection: DriverConnection, positions: Sequence[tuple[str, int]]
) -> list[str]:
    """Of the runs in ``positions`` (run id, the lowest cursor of its open inboxes): those
    with a pending decision, or an unacknowledged one past that cursor."""
    rows = await connection.fetch(
        _in(connection, _INBOXES_BEHIND),
        [run_id for run_id, _position in positions],
        [position for _run_id, position in positions],
    )
    return [row["run_id"] for row in rows]


_DECISIONS_OF_RUN = """
    SELECT id, run_id, thread_id, agent_id, decision_id, target_id, action,
           result::text AS result, reason, decision_updated_at, status, attempts, drop_reason,
           received_at, delivered_at, acked_at, dropped_at
      FROM registry.decisions WHERE run_id = $1 ORDER BY id
"""


def _decoded(rows: Sequence[Row]) -> list[dict[str, Any]]:
    decoded = [dict(row) for row in rows]
    for row in decoded:
        row["result"] = json.loads(row["result"])
    return decoded


async def decisions_of_run(connection: DriverConnection, run_id: str) -> list[dict[str, Any]]:
    """Every decision row of a run, oldest first (the audit trail); ``result`` decoded."""
    return _decoded(await connection.fetch(_in(connection, _DECISIONS_OF_RUN), run_id))


# --- streams --------------------------------------------------------------------------------

_BIND_STREAM = """
    UPDATE registry.runs SET stream_seq = coalesce(stream_seq, 0)
     WHERE run_id = $1 AND status = 'active'
    RETURNING stream_seq
"""


async def bind_stream(connection: DriverConnection, run_id: str) -> bool:
    """Open the active run's stream (idempotent); ``False`` if the run is not active."""
    return await connection.fetchval(_in(connection, _BIND_STREAM), run_id) is not None


_APPEND_CHUNKS = f"""
    WITH allocated AS (
        -- the row lock serialises publishers of one run, so seqs commit in order, gapless
        UPDATE registry.runs SET stream_seq = stream_seq + $2::bigint
         WHERE run_id = $1 AND status = 'active' AND stream_seq IS NOT NULL
           AND ($8::bigint IS NULL OR owner_epoch = $8)
           AND ($11::bigint IS NULL OR stream_seq = $11)
        RETURNING run_id, stream_seq AS last_seq
    ), inserted AS (
        INSERT INTO registry.stream_chunks (run_id, seq, data)
        SELECT allocated.run_id, allocated.last_seq - $2::bigint + chunk.ord, chunk.data
          FROM allocated, unnest($3::bytea[]) WITH ORDINALITY AS chunk(data, ord)
        RETURNING seq
    ), payload AS (
        SELECT json_build_object(
                   'kind', $5::text, 'id', run_id, 'seq', last_seq, 'data', $6::text
               )::text AS body
          FROM allocated
         WHERE $7::boolean
    ), notified AS (
        SELECT pg_notify($4, {_signed("body", 9, 10)}) FROM payload
    )
    SELECT last_seq, (SELECT count(*) FROM inserted) AS inserted,
           (SELECT count(*) FROM notified) AS notified
      FROM allocated
"""


async def append_chunks(
    connection: DriverConnection,
    run_id: str,
    chunks: Sequence[bytes],
    *,
    notify: bool,
    inline: str | None,
    key: NotificationKey,
    epoch: int | None = None,
    after_seq: int | None = None,
) -> int | None:
    """Append ``chunks`` to the run's open stream; return the last seq, ``None`` if closed
    (or, with ``epoch``, if the run is held under another owner epoch; with ``after_seq``, if
    the stream's last seq is another: tell these apart with :func:`stream_state`).

    With ``notify``, a wake-up signed with ``key`` goes out at commit, carrying ``inline``
    (:meth:`~registry.notifications.NotificationKey.seal` of a single small chunk) when given.
    """
    last_seq = await connection.fetchval(
        _in(connection, _APPEND_CHUNKS),
        run_id,
        len(chunks),
        list(chunks),
        CHANNEL,
        NotificationKind.CHUNK.value,
        inline,
        notify,
        epoch,
        key.inner_pad,
        key.outer_pad,
        after_seq,
    )
    return None if last_seq is None else int(last_seq)


# Many runs' appends in one statement: one commit, so one turn of the notification lock.
_APPEND_CHUNK_BATCH = f"""
    WITH request AS (
        SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::int[],
                             $13::text[])
               WITH ORDINALITY AS request(run_id, size, epoch, after_seq, payload, inline, ord)
    ), {_LOCK_HELD}, allocated AS (
        UPDATE registry.runs SET stream_seq = runs.stream_seq + request.size
          FROM request JOIN locked USING (run_id)
         WHERE runs.run_id = request.run_id AND runs.status = 'active'
           AND runs.stream_seq IS NOT NULL
           AND (request.epoch IS NULL OR runs.owner_epoch = request.epoch)
           AND (request.after_seq IS NULL OR runs.stream_seq = request.after_seq)
        RETURNING request.ord, runs.run_id, runs.stream_seq AS last_seq, request.size,
                  request.payload, request.inline
    ), inserted AS (
        INSERT INTO registry.stream_chunks (run_id, seq, data)
        SELECT allocated.run_id, allocated.last_seq - allocated.size + chunk.position, chunk.data
          FROM allocated
          JOIN unnest($6::bigint[], $7::bigint[], $8::bytea[]) AS chunk(ord, position, data)
            ON chunk.ord = allocated.ord
        RETURNING seq
    ), payload AS (
        SELECT json_build_object(
                   'kind', $10::text,
                   'runs', json_agg(
                       CASE WHEN inline IS NULL THEN json_build_array(run_id, last_seq)
                            ELSE json_build_array(run_id, last_seq, inline) END
                       ORDER BY ord
                   )
               )::text AS body
          FROM allocated
         WHERE payload IS NOT NULL
         GROUP BY payload
    ), notified AS (
        SELECT pg_notify($9, {_signed("body", 11, 12)}) FROM payload
    )
    SELECT ord, last_seq, (SELECT count(*) FROM inserted) AS inserted,
           (SELECT count(*) FROM notified) AS notified
      FROM allocated
"""


@dataclass(frozen=True, slots=True)
class ChunkAppend:
    """One run's part of :func:`append_chunk_batch`: ``chunks`` to append to ``run_id``, only
    under owner ``epoch`` and right after ``after_seq`` when given; ``payload``: the number of
    the ``chunks`` notification that announces it (see
    :func:`~registry.notifications.payload_groups`), ``None`` for no wake-up; ``inline``: the
    sealed chunk it carries, if any."""

    run_id: str
    chunks: Sequence[bytes]
    epoch: int | None
    after_seq: int | None
    payload: int | None
    #: :meth:`~registry.notifications.NotificationKey.seal` of a single small chunk, to
    #: travel inside the wake-up
    inline: str | None = None


async def append_chunk_batch(
    connection: DriverConnection, appends: Sequence[ChunkAppend], key: NotificationKey
) -> list[int | None]:
    """Append to several runs' open streams in one statement (each run at most once); return
    each append's last seq, in order, ``None`` where :func:`append_chunks` would have refused
    (tell why with :func:`stream_state`). The runs announced in the same ``payload`` share one
    ``chunks`` wake-up signed with ``key``, sent at commit."""
    ords: list[int] = []
    positions: list[int] = []
    data: list[bytes] = []
    for ord_, append in enumerate(appends, start=1):
        for position, chunk in enumerate(append.chunks, start=1):
            ords.append(ord_)
            positions.append(position)
            data.append(chunk)
    rows = await connection.fetch(
        _in(connection, _APPEND_CHUNK_BATCH),
        [append.run_id for append in appends],
        [len(append.chunks) for append in appends],
        [append.epoch for append in appends],
        [append.after_seq for append in appends],
        [append.payload for append in appends],
        ords,
        positions,
        data,
        CHANNEL,
        NotificationKind.CHUNKS.value,
        key.inner_pad,
        key.outer_pad,
        [append.inline for append in appends],
    )
    last_seqs: list[int | None] = [None] * len(appends)
    for row in rows:
        last_seqs[row["ord"] - 1] = int(row["last_seq"])
    return last_seqs


_OWNER_EPOCH_OF = "SELECT owner_epoch FROM registry.runs WHERE run_id = $1 AND status = 'active'"


async def owner_epoch_of(connection: DriverConnection, run_id: str) -> int | None:
    """The owner epoch of the active run ``run_id``, ``None`` if it is not active."""
    epoch: int | None = await connection.fetchval(_in(connection, _OWNER_EPOCH_OF), run_id)
    return epoch


_NOTIFY = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"


async def notify(connection: DriverConnection, payloads: Sequence[str]) -> None:
    """Send ready-made payloads (coalesced chunk wake-ups) in one round trip."""
    await connection.execute(_NOTIFY, CHANNEL, list(payloads))


_NOTIFY_PROBE = "SELECT pg_notify($1, $2)"


async def notify_probe(connection: DriverConnection, channel: str, payload: str) -> None:
    """NOTIFY ``payload`` on ``channel`` (a health check's own channel, never the registry's),
    delivered on commit: at once on an autocommit connection."""
    await connection.execute(_NOTIFY_PROBE, channel, payload)


_READ_CHUNKS = """
    SELECT seq, data FROM registry.stream_chunks
     WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3
"""


async def read_chunks(
    connection: DriverConnection, run_id: str, *, after: int, limit: int
) -> list[StreamChunk]:
    """The run's stored chunks with seq > ``after``, in order, at most ``limit``."""
    rows = await connection.fetch(_in(connection, _READ_CHUNKS), run_id, after, limit)
    return [StreamChunk(row["seq"], bytes(row["data"])) for row in rows]


# Many runs' reads in one round trip: each run's chunks after its own position, each limited.
_READ_CHUNK_BATCH = """
    SELECT request.ord, chunk.seq, chunk.data
      FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS request(run_id, after, ord)
     CROSS JOIN LATERAL (
           SELECT seq, data FROM registry.stream_chunks
            WHERE stream_chunks.run_id = request.run_id AND stream_chunks.seq > request.after
            ORDER BY seq LIMIT $3
     ) AS chunk
     ORDER BY request.ord, chunk.seq
"""


async def read_chunk_batch(
    connection: DriverConnection, positions: Sequence[tuple[str, int]], *, limit: int
) -> list[list[StreamChunk]]:
    """For each (run id, after) in ``positions``: that run's stored chunks with seq > after, in
    order, at most ``limit``; one round trip for all (see :func:`read_chunks`)."""
    rows = await connection.fetch(
        _in(connection, _READ_CHUNK_BATCH),
        [run_id for run_id, _after in positions],
        [after for _run_id, after in positions],
        limit,
    )
    pages: list[list[StreamChunk]] = [[] for _ in positions]
    for row in rows:
        pages[row["ord"] - 1].append(StreamChunk(row["seq"], bytes(row["data"])))
    return pages


# One batch of retention: the oldest ended runs whose stream is still stored (by
# ix_runs_prunable); SKIP LOCKED lets several pruners take disjoint batches.
_PRUNE_STREAMS = """
    WITH expired AS (
        UPDATE registry.runs SET stream_seq = NULL
         WHERE run_id IN (
               SELECT run_id FROM registry.runs
                WHERE stream_seq IS NOT NULL AND ended_at IS NOT NULL
                  AND ended_at < now() - $1::interval AND status <> 'active'
                ORDER BY ended_at
                LIMIT $2
                  FOR UPDATE SKIP LOCKED
               )
        RETURNING run_id
    ), deleted AS (
        DELETE FROM registry.stream_chunks USING expired
         WHERE stream_chunks.run_id = expired.run_id
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM expired) AS runs, (SELECT count(*) FROM deleted) AS chunks
"""


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one batch of :func:`prune_streams` removed: streams (runs) and chunks."""

    runs: int
    chunks: int


async def prune_streams(connection: DriverConnection, older_than: timedelta, limit: int) -> Pruned:
    """Delete the chunks of up to ``limit`` runs that ended before ``now() - older_than``,
    oldest first; a batch of fewer than ``limit`` runs was the last.

    Never touches an active run's stream, and never decisions (the audit trail).
    """
    row = await connection.fetchrow(_in(connection, _PRUNE_STREAMS), older_than, limit)
    assert row is not None  # an aggregate over CTEs returns one row
    return Pruned(int(row["runs"]), int(row["chunks"]))


# --- inspection: read-only statements for operators, the CLI and the demo --------------------

_STATUS_COUNTS = """
    SELECT 'runs' AS kind, status, count(*) AS total FROM registry.runs GROUP BY status
    UNION ALL
    SELECT 'decisions' AS kind, status, count(*) AS total FROM registry.decisions GROUP BY status
"""


async def status_counts(connection: DriverConnection) -> dict[str, dict[str, int]]:
    """Rows per status: ``{"runs": {status: count}, "decisions": {status: count}}``.

    Every status appears, with 0 when no row has it.
    """
    counts: dict[str, dict[str, int]] = {
        "runs": {str(status): 0 for status in RunStatus},
        "decisions": {str(status): 0 for status in DecisionStatus},
    }
    for row in await connection.fetch(_in(connection, _STATUS_COUNTS)):
        counts[row["kind"]][row["status"]] = int(row["total"])
    return counts


_AUDITED_DECISION_COUNTS = (
    "SELECT status, count(*) AS total FROM registry.decision_audit GROUP BY status"
)


async def audited_decision_counts(connection: DriverConnection) -> dict[str, int]:
    """Decisions per status read through the ``decision_audit`` view (what an auditor may
    read); every status appears, with 0 when no row has it."""
    counts = {str(status): 0 for status in DecisionStatus}
    for row in await connection.fetch(_in(connection, _AUDITED_DECISION_COUNTS)):
        counts[row["status"]] = int(row["total"])
    return counts


_LIST_RUNS = f"""
    SELECT {_RUN_COLUMNS} FROM registry.runs
     WHERE ($1::text IS NULL OR thread_id = $1::text)
       AND ($2::text IS NULL OR agent_id = $2::text)
       AND ($3::text IS NULL OR status = $3::text)
     ORDER BY created_at DESC, run_id
     LIMIT $4
"""


async def list_runs(
    connection: DriverConnection,
    *,
    thread_id: str | None = None,
    agent_id: str | None = None,
    status: RunStatus | None = None,
    limit: int = 50,
) -> list[RunRecord]:
    """Runs in any status matching every filter given, newest first, at most ``limit``."""
    rows = await connection.fetch(
        _in(connection, _LIST_RUNS),
        thread_id,
        agent_id,
        None if status is None else str(status),
        limit,
    )
    return [_run_record(row) for row in rows]


_RUN_DETAILS = """
    SELECT run_id, thread_id, agent_id, status, owner_id, lease_expires_at,
           -- by the database's clock: never compare a stored time with a local one
           coalesce(lease_expires_at > now(), false) AS lease_held, owner_epoch,
           cancel_requested_at, superseded_by, end_reason, created_at, updated_at, ended_at,
           stream_seq,
           (SELECT count(*) FROM registry.stream_chunks WHERE stream_chunks.run_id = runs.run_id)
               AS stored_chunks
      FROM registry.runs WHERE run_id = $1
"""


async def run_details(connection: DriverConnection, run_id: str) -> dict[str, Any] | None:
    """Every column of the run's row plus ``stored_chunks`` and ``lease_held`` (whether the
    lease runs past the database's ``now()``), or ``None`` if there is no such run.

    ``stream_seq`` is the newest chunk's seq (``None``: no stream, or pruned).
    """
    row = await connection.fetchrow(_in(connection, _RUN_DETAILS), run_id)
    return None if row is None else dict(row)


_AUDIT = """
    SELECT id, run_id, thread_id, agent_id, decision_id, target_id, action,
           result::text AS result, reason, decision_updated_at, status, attempts, drop_reason,
           received_at, delivered_at, acked_at, dropped_at, delivery_latency, ack_latency,
           run_status, run_owner_id, run_created_at, run_ended_at, run_end_reason
      FROM registry.decision_audit
     WHERE ($1::text IS NULL OR run_id = $1::text)
       AND ($2::text IS NULL OR thread_id = $2::text)
       AND ($3::text IS NULL OR agent_id = $3::text)
       AND ($4::timestamptz IS NULL OR received_at >= $4::timestamptz)
     ORDER BY id DESC
     LIMIT $5
"""


async def audit_trail(
    connection: DriverConnection,
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
    rows = await connection.fetch(
        _in(connection, _AUDIT), run_id, thread_id, agent_id, since, limit
    )
    return _decoded(list(reversed(rows)))


# --- administration (health, test databases, grants) ----------------------------------------

# What ``registry doctor`` counts: each row is one invariant, its count and its oldest
# offenders (runs, or ``run_id/target_id`` of decisions). Full scans: an operator's tool.
_STRANDED_STATE = """
    SELECT 'expired_leases' AS name, count(*) AS total,
           (array_agg(run_id ORDER BY COALESCE(lease_expires_at, updated_at)))[1:$5] AS examples
      FROM registry.runs
     WHERE status = 'active' AND COALESCE(lease_expires_at, updated_at) < now() - $1::interval
    UNION ALL
    SELECT 'stale_cancels', count(*), (array_agg(run_id ORDER BY cancel_requested_at))[1:$5]
      FROM registry.runs WHERE status = 'active' AND cancel_requested_at < now() - $2::interval
    UNION ALL
    SELECT 'unacknowledged_decisions', count(*),
           (array_agg(run_id || '/' || target_id ORDER BY delivered_at))[1:$5]
      FROM registry.decisions WHERE status = 'delivered' AND delivered_at < now() - $3::interval
    UNION ALL
    SELECT 'unpruned_streams', count(*), (array_agg(run_id ORDER BY ended_at))[1:$5]
      FROM registry.runs
     WHERE status <> 'active' AND stream_seq IS NOT NULL AND ended_at < now() - $4::interval
"""


async def stranded_state(
    connection: DriverConnection,
    *,
    lease_grace: timedelta,
    cancel_grace: timedelta,
    ack_grace: timedelta,
    retention: timedelta,
    examples: int,
) -> dict[str, tuple[int, list[str]]]:
    """Count what was left stranded, each with up to ``examples`` of the oldest offenders:
    ``expired_leases`` (active runs whose lease expired more than ``lease_grace`` ago),
    ``stale_cancels`` (active runs whose cancel was requested more than ``cancel_grace`` ago),
    ``unacknowledged_decisions`` (delivered more than ``ack_grace`` ago, never acknowledged),
    ``unpruned_streams`` (runs that ended more than ``retention`` ago, stream still held)."""
    rows = await connection.fetch(
        _in(connection, _STRANDED_STATE), lease_grace, cancel_grace, ack_grace, retention, examples
    )
    return {row["name"]: (int(row["total"]), list(row["examples"] or [])) for row in rows}


_HEALTH_PROBE = "SELECT 1"


async def health_probe(connection: DriverConnection) -> None:
    """A round trip that a dead or half-open connection cannot complete (the listener's)."""
    await connection.fetchval(_HEALTH_PROBE)


_NOTIFICATION_SECRET = "SELECT secret FROM registry.notification_secrets WHERE id = 1"


async def notification_secret(connection: DriverConnection) -> bytes:
    """The database's notification secret (readable by registry roles only)."""
    secret: bytes | None = await connection.fetchval(_in(connection, _NOTIFICATION_SECRET))
    if secret is None:  # pragma: no cover - migration 0005 writes the row
        raise RuntimeError("notification_secrets has no row; run the migrations")
    return bytes(secret)


_HAS_VERSION_TABLE = "SELECT to_regclass('registry.alembic_version') IS NOT NULL"
_SCHEMA_REVISION = "SELECT version_num FROM registry.alembic_version"


async def schema_revision(connection: DriverConnection) -> str | None:
    """The Alembic revision of the registry's schema (its own ``alembic_version``, never
    another one on the search path), or ``None`` before the first migration."""
    if not await connection.fetchval(_in(connection, _HAS_VERSION_TABLE)):
        return None
    revision: str | None = await connection.fetchval(_in(connection, _SCHEMA_REVISION))
    return revision


_SERVER_VERSION = "SELECT current_setting('server_version_num')::int"


async def server_version(connection: DriverConnection) -> int:
    """The server's ``server_version_num`` (for example 150019)."""
    return int(await connection.fetchval(_SERVER_VERSION))


_DATABASE_EXISTS = "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)"


async def database_exists(connection: DriverConnection, name: str) -> bool:
    """Whether the server has a database called ``name``."""
    return bool(await connection.fetchval(_DATABASE_EXISTS, name))


_DATABASE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


def _database_identifier(name: str) -> str:
    # CREATE/DROP DATABASE take no bind parameters, so only names we generate are accepted
    if not _DATABASE_NAME.fullmatch(name):
        raise InvalidInputError("database", f"{name!r} is not a plain lower-case identifier")
    return '"' + name + '"'


async def create_database(
    connection: DriverConnection, name: str, *, template: str | None = None
) -> None:
    """``CREATE DATABASE name [TEMPLATE template]``; needs an autocommit connection."""
    statement = f"CREATE DATABASE {_database_identifier(name)}"
    if template is not None:
        statement += f" TEMPLATE {_database_identifier(template)}"
    await connection.execute(statement)


async def drop_database(connection: DriverConnection, name: str) -> None:
    """``DROP DATABASE IF EXISTS name WITH (FORCE)``; needs an autocommit connection."""
    await connection.execute(f"DROP DATABASE IF EXISTS {_database_identifier(name)} WITH (FORCE)")


#: the columns of ``runs`` the registry updates (all but the ids and ``created_at``)
_RUN_UPDATES = (
    "status, owner_id, lease_expires_at, owner_epoch, cancel_requested_at, superseded_by, "
    "end_reason, updated_at, ended_at, stream_seq"
)
#: the columns of ``decisions`` the registry updates: its delivery, never what was received
_DECISION_UPDATES = "status, attempts, drop_reason, delivered_at, acked_at, dropped_at"


_GRANTED_TABLES = ("runs", "decisions", "stream_chunks")


def application_grants(role: str, database: str, schema: str = DEFAULT_SCHEMA) -> list[str]:
    """The statements that give ``role`` what the registry needs at run time, and no DDL.

    Usage of ``schema`` (the one that holds the registry's objects), reads and inserts on the
    three tables, updates of the columns the registry changes (never a decision's received
    content), deletes on ``stream_chunks`` (pruning), read access to ``alembic_version`` (the
    schema check) and to ``notification_secrets`` (the key that signs notifications).
    Migrations run as a different, owning role. Raises :class:`InvalidInputError` for a name
    that is not a plain identifier.
    """
    quoted_role, quoted_database = _database_identifier(role), _database_identifier(database)
    quoted_schema = '"' + checked_schema(schema) + '"'
    runs, decisions, chunks = (f"{quoted_schema}.{table}" for table in _GRANTED_TABLES)
    return [
        f"GRANT CONNECT ON DATABASE {quoted_database} TO {quoted_role}",
        f"GRANT USAGE ON SCHEMA {quoted_schema} TO {quoted_role}",
        f"GRANT SELECT, INSERT ON {runs}, {decisions}, {chunks} TO {quoted_role}",
        # only the columns the registry changes: the audit trail cannot be rewritten
        f"GRANT UPDATE ({_RUN_UPDATES}) ON {runs} TO {quoted_role}",
        f"GRANT UPDATE ({_DECISION_UPDATES}) ON {decisions} TO {quoted_role}",
        f"GRANT DELETE ON {chunks} TO {quoted_role}",
        f"GRANT SELECT ON {quoted_schema}.alembic_version TO {quoted_role}",
        f"GRANT SELECT ON {quoted_schema}.notification_secrets TO {quoted_role}",
    ]
