"""Invariants that catch state left stranded by workers that died or misbehave.

:func:`diagnose` checks four, each a :class:`Finding` with a count, the oldest offenders and
the fix: active runs whose lease expired long ago (no live owner renews it), cancels requested
long ago on runs still active, decisions delivered long ago and never acknowledged, and
streams of runs that ended long ago and were never pruned. ``registry doctor`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from registry import repository
from registry.database import admin_connection
from registry.schema import check_revision


@dataclass(frozen=True, slots=True)
class Thresholds:
    """How old each kind of state must be to count as stranded."""

    #: an active run's lease expired more than this ago
    lease_grace: timedelta = timedelta(minutes=10)
    #: a cancel was requested more than this ago and the run is still active
    cancel_grace: timedelta = timedelta(minutes=10)
    #: a decision was delivered more than this ago and never acknowledged
    ack_grace: timedelta = timedelta(hours=1)
    #: a run ended more than this ago and its stream was never pruned
    retention: timedelta = timedelta(days=7)


#: Each invariant's name, what it counts, and what an operator does about it.
INVARIANTS: dict[str, tuple[str, str]] = {
    "expired_leases": (
        "active runs whose lease expired long ago (no live owner)",
        "start a worker that calls adopt_orphaned_runs(), or the owner's worker_id with "
        "resume_owned_runs(); or `registry cancel RUN` and a running registry's sweep ends it",
    ),
    "stale_cancels": (
        "active runs whose cancel was requested long ago",
        "the owner must finish a run (handle.remove()) once its token trips; a running "
        "registry ends cancelled runs whose owner is gone (sweep_cancelled_orphans)",
    ),
    "unacknowledged_decisions": (
        "decisions delivered long ago and never acknowledged",
        "the run's owner must inbox.ack(delivery) once it applied each; the next inbox of "
        "the run delivers them again",
    ),
    "unpruned_streams": (
        "ended runs whose stream is still kept",
        "run `registry prune --older-than DURATION` (or registry.prune) periodically",
    ),
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One invariant's outcome."""

    name: str
    #: how much state breaks it (0: it holds)
    count: int
    #: the oldest offenders: run ids, or ``run_id/target_id`` of decisions
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the invariant holds."""
        return self.count == 0

    @property
    def description(self) -> str:
        """What the invariant counts."""
        return INVARIANTS[self.name][0]

    @property
    def fix(self) -> str:
        """What an operator does about it."""
        return INVARIANTS[self.name][1]


async def diagnose(
    url: str, thresholds: Thresholds, *, examples: int = 5, connect_timeout: float = 60.0
) -> list[Finding]:
    """Check every invariant of :data:`INVARIANTS` on the database at ``url``, in that order.

    Read-only. Raises :class:`~registry.errors.SchemaNotReadyError` unless the schema is at
    head, :class:`~registry.errors.DatabaseUnavailableError` if the server cannot be reached
    within ``connect_timeout`` seconds, :class:`~registry.errors.DatabaseError` for what the
    server refuses (a role without ``SELECT`` on the tables).
    """
    async with admin_connection(url, connect_timeout=connect_timeout) as connection:
        check_revision(await repository.schema_revision(connection))
        found = await repository.stranded_state(
            connection,
            lease_grace=thresholds.lease_grace,
            cancel_grace=thresholds.cancel_grace,
            ack_grace=thresholds.ack_grace,
            retention=thresholds.retention,
            examples=examples,
        )
    return [Finding(name, *found[name]) for name in INVARIANTS]
