"""The public registry: :class:`RunRegistry`, :class:`RunHandle`, tokens and inboxes.

It mirrors the in-memory registry of the agent runtime (one active run per thread, decisions
queued until the run reads them, ownership by agent id, cancellation tokens) with rows in
PostgreSQL as the truth and LISTEN/NOTIFY as the wake-up, so any process can reach a run.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
import socket
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Self, TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from registry import repository
from registry.connections import ConnectionLane
from registry.database import (
    UNREACHABLE,
    asyncpg_dsn,
    constraint_name,
    create_engine,
    current_revision,
    head_revision,
    is_unavailable,
)
from registry.errors import (
    DatabaseUnavailableError,
    InvalidInputError,
    RegistryClosedError,
    RunAlreadyExistsError,
    SchemaNotReadyError,
    StreamClosedError,
    TooManyDecisionsError,
)
from registry.listener import Listener, Notification, NotificationKind
from registry.models import (
    DecisionDelivery,
    ForwardedDecision,
    RunRecord,
    StreamChunk,
    ToolCallDecision,
    check_id,
)
from registry.streams import StreamSubscription
from registry.tables import ONE_ACTIVE_RUN_PER_THREAD
from registry.watch import RunWatch

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# how often register retries after losing a race on the one-active-run index
_REGISTER_ATTEMPTS = 5
# how many recent cancel/end notifications are remembered for watches created just after them
_RECENT_LIMIT = 4096
# NOTIFY payloads must stay under 8000 bytes: base64 grows 4/3, plus the run id and keys
_MAX_INLINE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """Tunables of a :class:`RunRegistry`; the defaults suit an agent server.

    ``safety_interval``: seconds between re-reads of the tables for every waiting token and
    inbox, so a lost notification costs at most this much latency, never correctness.
    ``health_interval``: seconds between round trips that check the LISTEN connection.
    ``max_decisions_per_forward``: larger forwards raise :class:`TooManyDecisionsError`.
    ``max_result_bytes``: largest JSON-encoded ``result`` of one decision.
    ``lease_seconds``: how long a run's owner claim lasts without renewal.
    ``heartbeat_interval``: seconds between lease renewals of all runs this worker owns (one
    statement each time); keep it well under ``lease_seconds``.
    ``max_delivery_attempts``: a decision delivered this many times without an ack is dropped
    as dead-lettered instead of being delivered again.
    ``inbox_batch``: how many decisions an inbox claims per round trip.
    ``max_chunk_bytes``: largest stream chunk; larger raises :class:`InvalidInputError`.
    ``stream_notify_window``: seconds during which one run's chunk notifications from this
    process are coalesced into one (a NOTIFY takes a database-wide lock at commit).
    ``inline_chunk_bytes``: chunks up to this size travel inside their notification.
    ``subscriber_buffer``: inline chunks a subscriber holds before it reads the table instead.
    ``stream_read_batch``: chunks a subscriber reads per round trip.
    """

    safety_interval: float = 1.0
    health_interval: float = 2.0
    max_decisions_per_forward: int = 1000
    max_result_bytes: int = 1_048_576
    lease_seconds: float = 15.0
    heartbeat_interval: float = 5.0
    max_delivery_attempts: int = 5
    pool_size: int = 10
    inbox_batch: int = 100
    max_chunk_bytes: int = 1_048_576
    stream_notify_window: float = 0.005
    inline_chunk_bytes: int = 3000
    subscriber_buffer: int = 1024
    stream_read_batch: int = 1000

    def __post_init__(self) -> None:
        for name in ("safety_interval", "health_interval", "lease_seconds", "heartbeat_interval"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(name, "must be a positive number of seconds")
        if not self.stream_notify_window >= 0:
            raise InvalidInputError("stream_notify_window", "must not be negative")
        for name in (
            "max_decisions_per_forward",
            "max_result_bytes",
            "pool_size",
            "inbox_batch",
            "max_chunk_bytes",
            "subscriber_buffer",
            "stream_read_batch",
            "max_delivery_attempts",
        ):
            if not getattr(self, name) >= 1:
                raise InvalidInputError(name, "must be at least 1")
        if self.heartbeat_interval >= self.lease_seconds:
            raise InvalidInputError("heartbeat_interval", "must be shorter than lease_seconds")
        if not 0 <= self.inline_chunk_bytes <= _MAX_INLINE_BYTES:
            raise InvalidInputError(
                "inline_chunk_bytes", f"must be between 0 and {_MAX_INLINE_BYTES}"
            )


@dataclass(frozen=True, slots=True)
class _SharedRead:
    """A table read of one run's chunks in flight, that other subscribers may wait on."""

    after: int
    generation: int
    result: asyncio.Future[list[StreamChunk]]


class RunCancellationToken:
    """Trips when the run is cancelled or superseded, from whichever process asked.

    ``is_cancelled()`` reads local state kept current by notifications and by the safety-net
    re-check; ``await wait()`` returns once it trips; ``await refresh()`` re-reads the row.
    """

    __slots__ = ("_registry", "_watch")

    def __init__(self, registry: RunRegistry, watch: RunWatch) -> None:
        self._registry = registry
        self._watch = watch

    @property
    def run_id(self) -> str:
        """The run this token belongs to."""
        return self._watch.run_id

    def is_cancelled(self) -> bool:
        """Whether a cancel (or a supersede) of the run has been seen."""
        return self._watch.cancelled.is_set()

    async def wait(self) -> None:
        """Return once the run is cancelled or superseded."""
        await self._watch.cancelled.wait()

    async def cancel(self) -> bool:
        """Request cancellation of the run; ``False`` if it is no longer active."""
        return await self._registry.cancel_active_run_by_id(self.run_id)

    async def refresh(self) -> bool:
        """Re-read the run's row now and return :meth:`is_cancelled`."""
        await self._registry._refresh(self._watch)
        return self.is_cancelled()


class DecisionInbox:
    """The run's queue of decisions: an async iterator of :class:`DecisionDelivery`.

    It first yields the decisions queued before it was opened, then new ones as they arrive,
    in forward order, and ends when the run ends. Acknowledge each decision once applied with
    :meth:`ack`; an unacknowledged decision is delivered again when an inbox is next opened
    for the run (after a crash, in another process), with ``attempts`` counting deliveries.
    """

    def __init__(self, registry: RunRegistry, watch: RunWatch) -> None:
        self._registry = registry
        self._watch = watch
        self._wakeup = asyncio.Event()
        self._wakeup.set()
        self._buffer: collections.deque[DecisionDelivery] = collections.deque()
        self._after = 0
        self._closed = False
        watch.inboxes.add(self)

    def wake(self) -> None:
        """Look at the table again (called by notifications and the safety-net re-check)."""
        self._wakeup.set()

    @property
    def run_id(self) -> str:
        """The run whose decisions this inbox delivers."""
        return self._watch.run_id

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> DecisionDelivery:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._closed:
                raise StopAsyncIteration
            ended = self._watch.ended.is_set()
            if not ended and not self._wakeup.is_set():
                # the last claim emptied the queue: claim again only when told to
                await self._wakeup.wait()
                continue
            # clear before reading: a wake-up that lands during the read is kept for the next wait
            self._wakeup.clear()
            claim = await self._registry._claim(self.run_id, self._after)
            if claim.deliveries or claim.dead_lettered:
                # a late commit can bring a decision below the cursor: the cursor never moves back
                self._after = max(self._after, claim.examined)
                self._buffer.extend(claim.deliveries)
                if claim.full:
                    self._wakeup.set()  # a full batch: more may be queued behind it
                continue
            if ended:
                self._closed = True
                raise StopAsyncIteration

    def position(self) -> int:
        """The delivery id of the newest decision this inbox has claimed."""
        return self._after

    async def ack(self, delivery: DecisionDelivery) -> bool:
        """Record that ``delivery`` was applied; it will not be delivered again.

        Returns ``False`` if it was already acknowledged or dropped (for example because the
        run was superseded). Idempotent.
        """
        if delivery.run_id != self.run_id:
            raise InvalidInputError(
                "delivery", f"belongs to run {delivery.run_id!r}, not {self.run_id!r}"
            )
        return await self._registry._ack(delivery)

    async def aclose(self) -> None:
        """Stop iterating. Decisions claimed but not acknowledged will be delivered again."""
        self._closed = True
        self._buffer.clear()
        self._watch.inboxes.discard(self)
        self._wakeup.set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class RunHandle:
    """An active run as seen from this process: ids, ownership, token, inbox.

    A handle is a view of a row, not the run itself: the run may be cancelled, superseded or
    removed from any process, which its token and inbox then report.
    """

    __slots__ = ("_record", "_registry", "_watch")

    def __init__(self, registry: RunRegistry, record: RunRecord, watch: RunWatch) -> None:
        self._registry = registry
        self._record = record
        self._watch = watch
        watch.apply(record.status, record.cancel_requested_at is not None)

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self._record.run_id

    @property
    def thread_id(self) -> str:
        """The thread the run belongs to."""
        return self._record.thread_id

    @property
    def agent_id(self) -> str:
        """The agent that registered the run."""
        return self._record.agent_id

    @property
    def record(self) -> RunRecord:
        """The run's row as it was when this handle was obtained."""
        return self._record

    def can_own(self, agent_id: str) -> bool:
        """Whether ``agent_id`` is the agent that owns this run."""
        return self._record.agent_id == agent_id

    def cancellation_token(self) -> RunCancellationToken:
        """The run's cancellation token, shared with every other token of the run here."""
        return RunCancellationToken(self._registry, self._watch)

    def decisions(self) -> DecisionInbox:
        """Open the run's inbox (the seed's ``bind_decision_tx`` and ``pending_decisions``)."""
        return DecisionInbox(self._registry, self._watch)

    async def cancel(self) -> bool:
        """Request cancellation of this run; ``False`` if it is no longer active."""
        return await self._registry.cancel_active_run_by_id(self.run_id)

    async def remove(self) -> bool:
        """Finish this run (the seed's ``remove_thread_run_handle``); see ``remove_by_run_id``."""
        return await self._registry.remove_by_run_id(self.run_id)

    async def bind_stream_fanout(self) -> bool:
        """Open this run's stream; see :meth:`RunRegistry.bind_thread_run_stream_fanout`."""
        return await self._registry.bind_thread_run_stream_fanout(self.run_id)

    async def publish(self, chunk: bytes) -> int:
        """Append ``chunk`` to the run's stream and return its sequence number.

        Raises :class:`StreamClosedError` if the stream is not bound or the run has ended.
        """
        [seq] = await self._registry._publish(self.run_id, [chunk])
        return seq

    async def publish_many(self, chunks: Sequence[bytes]) -> list[int]:
        """Append ``chunks`` in order, in one transaction; return their sequence numbers."""
        return await self._registry._publish(self.run_id, chunks)

    def __repr__(self) -> str:
        return (
            f"RunHandle(run_id={self.run_id!r}, thread_id={self.thread_id!r}, "
            f"agent_id={self.agent_id!r})"
        )


class RunRegistry:
    """The durable, cross-process registry of active runs. Use one per process.

    Open with ``await RunRegistry.connect(url)`` (or ``async with await ...connect(url)``).
    Every method is one transaction: it happened entirely or not at all. Method names and
    return values follow the in-memory registry this one makes durable.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        dsn: str,
        worker_id: str,
        settings: RegistrySettings,
    ) -> None:
        """Prefer :meth:`connect`, which checks the schema and starts the listener."""
        self._engine = engine
        # single statements run without BEGIN/COMMIT (one round trip, still atomic), on
        # connections kept checked out: a pool checkout per statement costs about a round trip
        self._lane = ConnectionLane(engine, settings.pool_size)
        self._dsn = dsn
        self.worker_id = worker_id
        self.settings = settings
        self._watches: weakref.WeakValueDictionary[str, RunWatch] = weakref.WeakValueDictionary()
        self._recent: collections.OrderedDict[str, NotificationKind] = collections.OrderedDict()
        self._listener: Listener | None = None
        self._chunk_notified_at: dict[str, float] = {}
        self._chunk_pending: dict[str, int] = {}
        self._chunk_flusher: asyncio.Task[None] | None = None
        # one table read in flight per run, shared by the run's subscribers here
        self._chunk_reads: dict[str, _SharedRead] = {}
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._recheck_now = asyncio.Event()
        self._recheck_task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        worker_id: str | None = None,
        settings: RegistrySettings | None = None,
        listen: bool = True,
    ) -> RunRegistry:
        """Connect to the database at ``url``, check its schema, and start listening.

        ``worker_id`` names this process as the owner of the runs it registers; one is
        generated (and logged) if not given. ``listen=False`` skips the LISTEN connection
        for short-lived callers that never wait on tokens or inboxes.
        Raises :class:`DatabaseUnavailableError` if the server does not answer and
        :class:`SchemaNotReadyError` if migrations have not been run.
        """
        settings = settings or RegistrySettings()
        if worker_id is None:
            worker_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
            logger.info("registry worker_id %s", worker_id, extra={"worker_id": worker_id})
        else:
            check_id("worker_id", worker_id)
        engine = create_engine(url, pool_size=settings.pool_size)
        registry = cls(engine, dsn=asyncpg_dsn(url), worker_id=worker_id, settings=settings)
        try:
            await registry._check_schema()
            if listen:
                await registry._start_listening()
            # without a listener, the re-check alone wakes tokens, inboxes and subscriptions
            registry._recheck_task = asyncio.create_task(
                registry._recheck_loop(), name="registry-recheck"
            )
        except BaseException:
            await registry.close()
            raise
        return registry

    async def _check_schema(self) -> None:
        try:
            revision = await current_revision(self._engine)
        except Exception as exc:
            if is_unavailable(exc):
                raise DatabaseUnavailableError(f"cannot reach the database: {exc}") from exc
            raise
        head = head_revision()
        if revision != head:
            raise SchemaNotReadyError(
                f"database schema is at {revision or 'no revision'}, this registry needs {head}; "
                "run `registry migrate` or `await registry.migrate(url)`"
            )

    async def _start_listening(self) -> None:
        self._listener = Listener(
            self._dsn,
            self._on_notification,
            self._on_reconnect,
            health_interval=self.settings.health_interval,
        )
        try:
            await self._listener.start()
        except UNREACHABLE as exc:
            raise DatabaseUnavailableError(f"cannot open the LISTEN connection: {exc}") from exc

    async def close(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._chunk_flusher is not None and not self._chunk_flusher.done():
            # send what is pending rather than drop it: subscribers elsewhere wait on it
            with contextlib.suppress(Exception):
                await self._chunk_flusher
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            try:
                # a clean shutdown: let another worker adopt these runs now, not at lease end
                async with self._lane.connection() as connection:
                    await repository.release_leases(connection, self.worker_id)
            except Exception:
                logger.warning("could not release leases on close", exc_info=True)
        if self._recheck_task is not None:
            self._recheck_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck_task
        if self._listener is not None:
            await self._listener.stop()
        for watch in list(self._watches.values()):
            watch.wake_inboxes()
        await self._lane.close()
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def listener(self) -> Listener | None:
        """The LISTEN connection's supervisor (``None`` when connected with ``listen=False``)."""
        return self._listener

    # --- the seed's API ----------------------------------------------------------------------

    async def register(self, run_id: str, agent_id: str, thread_id: str) -> RunHandle:
        """Register ``run_id`` as the thread's active run and return its handle.

        A run already active on the thread is superseded in the same transaction: it becomes
        ``superseded``, its cancellation token trips wherever it lives, and its decisions not
        yet acknowledged are dropped with the reason. Raises :class:`RunAlreadyExistsError` if
        ``run_id`` was ever registered before.
        """
        check_id("run_id", run_id)
        check_id("agent_id", agent_id)
        check_id("thread_id", thread_id)
        lease = timedelta(seconds=self.settings.lease_seconds)
        for attempt in range(1, _REGISTER_ATTEMPTS + 1):
            try:
                async with self._write() as connection:
                    record = await self._register(connection, run_id, agent_id, thread_id, lease)
                self._start_heartbeat()
                return RunHandle(self, record, self._watch(run_id))
            except IntegrityError as exc:
                name = constraint_name(exc)
                if name == "pk_runs":
                    raise RunAlreadyExistsError(run_id) from exc
                if name != ONE_ACTIVE_RUN_PER_THREAD or attempt == _REGISTER_ATTEMPTS:
                    raise
                logger.debug("register lost a race on thread %s; retrying", thread_id)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _register(
        self,
        connection: AsyncConnection,
        run_id: str,
        agent_id: str,
        thread_id: str,
        lease: timedelta,
    ) -> RunRecord:
        await repository.lock_thread(connection, thread_id)
        old = await repository.supersede_active_run(connection, thread_id, run_id)
        if old is not None:
            await repository.drop_open_decisions_and_notify(
                connection,
                old,
                f"run {old} superseded by run {run_id}",
                NotificationKind.SUPERSEDED,
            )
        return await repository.insert_run(
            connection,
            run_id=run_id,
            thread_id=thread_id,
            agent_id=agent_id,
            owner_id=self.worker_id,
            lease=lease,
        )

    async def handle_by_thread(
        self, thread_id: str, *, agent_id: str | None = None
    ) -> RunHandle | None:
        """The handle of the thread's active run, or ``None``.

        With ``agent_id``, ``None`` also when another agent owns the run (the check the
        seed's by-thread forwards make), so a caller acting for an agent sees only its runs.
        """
        check_id("thread_id", thread_id)
        if agent_id is not None:
            check_id("agent_id", agent_id)
        record = await self._idempotent(
            lambda connection: repository.active_run_by_thread(connection, thread_id)
        )
        if record is None or (agent_id is not None and record.agent_id != agent_id):
            return None
        return RunHandle(self, record, self._watch(record.run_id))

    async def handle_by_run_id(self, run_id: str) -> RunHandle | None:
        """The handle of the run ``run_id`` if it is active, else ``None``."""
        check_id("run_id", run_id)
        record = await self._idempotent(
            lambda connection: repository.active_run_by_id(connection, run_id)
        )
        return None if record is None else RunHandle(self, record, self._watch(run_id))

    async def remove_by_run_id(self, run_id: str) -> bool:
        """Finish the active run ``run_id``: ``cancelled`` if a cancel was requested, else
        ``completed``. Its unacknowledged decisions are dropped and its inboxes end.

        Returns ``False`` if the run was not active (the row stays as history either way).
        """
        check_id("run_id", run_id)
        async with self._write() as connection:
            ended = await repository.end_run(connection, run_id)
            if ended:
                await repository.drop_open_decisions_and_notify(
                    connection, run_id, f"run {run_id} ended", NotificationKind.ENDED
                )
        return ended

    async def active_run_id_for_thread(self, agent_id: str, thread_id: str) -> str | None:
        """The thread's active run id if ``agent_id`` owns it, else ``None``."""
        check_id("agent_id", agent_id)
        check_id("thread_id", thread_id)
        record = await self._idempotent(
            lambda connection: repository.active_run_by_thread(connection, thread_id)
        )
        if record is None or record.agent_id != agent_id:
            return None
        return record.run_id

    async def forward_decisions_by_thread(
        self,
        agent_id: str,
        thread_id: str,
        decisions: Sequence[ToolCallDecision | Mapping[str, object]],
    ) -> ForwardedDecision | None:
        """Queue ``decisions`` on the thread's active run if ``agent_id`` owns it.

        All or none are stored; a decision whose non-empty ``decision_id`` the run already
        holds is skipped (a retried forward is harmless). ``None``, with nothing written, if
        the thread has no active run or another agent owns it.
        """
        check_id("agent_id", agent_id)
        check_id("thread_id", thread_id)
        batch, results = self._check_decisions(decisions)
        async with self._read() as connection:
            result = await repository.forward_by_thread(
                connection, agent_id, thread_id, batch, results
            )
        return None if result is None else ForwardedDecision(result.thread_id, result.run_id)

    async def forward_decisions_by_run_id(
        self,
        run_id: str,
        decisions: Sequence[ToolCallDecision | Mapping[str, object]],
    ) -> ForwardedDecision | None:
        """Queue ``decisions`` on the active run ``run_id``; ``None`` if it is not active.

        All or none are stored; decision ids the run already holds are skipped.
        """
        check_id("run_id", run_id)
        batch, results = self._check_decisions(decisions)
        async with self._read() as connection:
            result = await repository.forward_by_run_id(connection, run_id, batch, results)
        return None if result is None else ForwardedDecision(result.thread_id, result.run_id)

    async def cancel_active_run_by_id(self, run_id: str) -> bool:
        """Request cancellation of the active run ``run_id``; ``False`` if it is not active.

        The run's tokens trip in every process within milliseconds (or at the next safety
        re-check if the notification is lost). The run stays active until it is removed.
        """
        check_id("run_id", run_id)
        async with self._read() as connection:
            cancelled = await repository.request_cancel_by_id(connection, run_id)
        return cancelled is not None

    async def cancel_active_run_by_thread(
        self, thread_id: str, *, agent_id: str | None = None
    ) -> str | None:
        """Request cancellation of the thread's active run; return its id, or ``None``.

        With ``agent_id``, only a run that agent owns is cancelled: another agent's run
        gives ``None`` and nothing is written.
        """
        check_id("thread_id", thread_id)
        if agent_id is not None:
            check_id("agent_id", agent_id)
        async with self._read() as connection:
            return await repository.request_cancel_by_thread(connection, thread_id, agent_id)

    # --- beyond the seed ---------------------------------------------------------------------

    async def run(self, run_id: str) -> RunRecord | None:
        """The row of ``run_id`` in any status (active or history), or ``None``."""
        check_id("run_id", run_id)
        return await self._idempotent(lambda connection: repository.run_by_id(connection, run_id))

    # --- ownership and recovery --------------------------------------------------------------

    async def resume_owned_runs(self) -> list[RunHandle]:
        """Renew and return the handles of the active runs this ``worker_id`` owns.

        A process restarted with the same ``worker_id`` continues its runs: their inboxes
        redeliver what was never acknowledged, and a cancel requested meanwhile has already
        tripped their tokens.
        """
        self._check_open()
        lease = self._lease()
        async with self._read() as connection:
            records = await repository.resume_owned(connection, self.worker_id, lease)
        self._start_heartbeat()
        return [RunHandle(self, record, self._watch(record.run_id)) for record in records]

    async def adopt_orphaned_runs(self, limit: int = 100) -> list[RunHandle]:
        """Claim up to ``limit`` active runs whose owner's lease expired; return their handles.

        Safe when many processes call it at once: each run is adopted by exactly one. Runs
        whose cancel is pending are adopted too (their tokens are already tripped), so the
        adopter can wind them down.
        """
        self._check_open()
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidInputError("limit", "must be a positive integer")
        lease = self._lease()
        async with self._read() as connection:
            records = await repository.adopt_orphans(connection, self.worker_id, lease, limit)
        if records:
            logger.info(
                "adopted %d orphaned runs", len(records), extra={"worker_id": self.worker_id}
            )
        self._start_heartbeat()
        return [RunHandle(self, record, self._watch(record.run_id)) for record in records]

    async def sweep_cancelled_orphans(self) -> list[str]:
        """Finish as ``cancelled`` the orphaned runs whose cancel is pending; return their ids.

        An orphan is an active run whose lease expired more than one lease length ago (nobody
        adopted it). Every registry that owns runs does this on its heartbeat; call it yourself
        from a maintenance job if none does.
        """
        grace = self._lease()
        async with self._write() as connection:
            swept = await repository.sweep_cancelled_orphans(connection, grace)
            for run_id in swept:
                await repository.drop_open_decisions(
                    connection, run_id, f"run {run_id} cancelled while its owner was gone"
                )
        return swept

    def _lease(self) -> timedelta:
        return timedelta(seconds=self.settings.lease_seconds)

    def _start_heartbeat(self) -> None:
        if self._heartbeat_task is None and not self._closed:
            self._heartbeat_task = asyncio.create_task(
                self._heartbeat_loop(), name="registry-heartbeat"
            )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                async with self._read() as connection:
                    renewed = await repository.renew_leases(
                        connection, self.worker_id, self._lease()
                    )
                logger.debug("renewed the leases of %d runs", len(renewed))
                swept = await self.sweep_cancelled_orphans()
                if swept:
                    logger.info("finished %d cancelled orphaned runs", len(swept))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("heartbeat failed; retrying next interval", exc_info=True)

    # --- streams -----------------------------------------------------------------------------

    async def bind_thread_run_stream_fanout(self, run_id: str) -> bool:
        """Open the run's output stream; ``False`` when the run is not active. Idempotent."""
        check_id("run_id", run_id)
        async with self._read() as connection:
            return await repository.bind_stream(connection, run_id)

    async def subscribe_thread_run_stream(
        self, run_id: str, after_seq: int | None = None
    ) -> StreamSubscription | None:
        """Subscribe to the run's stream, or ``None`` if it has none (or it was pruned).

        Without ``after_seq`` the subscription yields the chunks published from now on; with
        it, it first replays every stored chunk after that seq (``0`` for all), then goes on
        live, with no gap and no duplicate at the seam. It ends after the last chunk once the
        run has ended. A finished run's stream can be replayed until it is pruned.
        """
        check_id("run_id", run_id)
        if after_seq is not None and (
            isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0
        ):
            raise InvalidInputError("after_seq", "must be a non-negative integer or None")
        # interest is registered (the watch) before the read, so nothing slips in between
        watch = self._watch(run_id)
        state = await self._idempotent(
            lambda connection: repository.stream_state(connection, run_id)
        )
        if state is None or state.stream_seq is None:
            return None
        watch.apply(state.status, state.cancel_requested)
        start = state.stream_seq if after_seq is None else after_seq
        return StreamSubscription(
            self._read_chunks,
            watch,
            after_seq=start,
            buffer_limit=self.settings.subscriber_buffer,
        )

    async def prune(self, older_than: timedelta) -> int:
        """Delete the stream chunks of runs that ended more than ``older_than`` ago.

        Returns how many chunks were deleted. Active runs' streams and decisions (the audit
        trail) are never touched; a pruned stream can no longer be subscribed to.
        """
        if not isinstance(older_than, timedelta) or older_than < timedelta(0):
            raise InvalidInputError("older_than", "must be a non-negative timedelta")
        async with self._read() as connection:
            return await repository.prune_streams(connection, older_than)

    async def _publish(self, run_id: str, chunks: Sequence[bytes]) -> list[int]:
        self._check_open()
        if isinstance(chunks, bytes | bytearray | memoryview | str):
            raise InvalidInputError("chunks", "expected a sequence of bytes objects")
        batch: list[bytes] = []
        for index, chunk in enumerate(chunks):
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise InvalidInputError(
                    f"chunks[{index}]", f"expected bytes, got {type(chunk).__name__}"
                )
            data = bytes(chunk)
            if len(data) > self.settings.max_chunk_bytes:
                raise InvalidInputError(
                    f"chunks[{index}]",
                    f"is {len(data)} bytes; the limit is {self.settings.max_chunk_bytes}",
                )
            batch.append(data)
        if not batch:
            return []
        loop = asyncio.get_running_loop()
        now = loop.time()
        last = self._chunk_notified_at.get(run_id)
        notify = last is None or now - last >= self.settings.stream_notify_window
        inline = None
        if notify and len(batch) == 1 and len(batch[0]) <= self.settings.inline_chunk_bytes:
            inline = base64.b64encode(batch[0]).decode("ascii")
        async with self._read() as connection:
            last_seq = await repository.append_chunks(
                connection, run_id, batch, notify=notify, inline=inline
            )
        if last_seq is None:
            raise StreamClosedError(run_id)
        if notify:
            self._chunk_notified_at[run_id] = now
        else:
            self._chunk_pending[run_id] = max(last_seq, self._chunk_pending.get(run_id, 0))
            if self._chunk_flusher is None or self._chunk_flusher.done():
                self._chunk_flusher = asyncio.create_task(
                    self._flush_chunk_notifications(), name="registry-chunk-notify"
                )
        first = last_seq - len(batch) + 1
        return list(range(first, last_seq + 1))

    async def _flush_chunk_notifications(self) -> None:
        # one NOTIFY per run per window: later publishes in the window ride on this one, sent
        # as soon as the earliest pending run's window closes
        loop = asyncio.get_running_loop()
        window = self.settings.stream_notify_window
        while self._chunk_pending:
            opened = min(self._chunk_notified_at.get(run_id, 0.0) for run_id in self._chunk_pending)
            await asyncio.sleep(max(0.0, opened + window - loop.time()))
            now = loop.time()
            due = {
                run_id: seq
                for run_id, seq in self._chunk_pending.items()
                if now - self._chunk_notified_at.get(run_id, 0.0) >= window
            }
            for run_id in due:
                del self._chunk_pending[run_id]
                self._chunk_notified_at[run_id] = now
            try:
                async with self._read() as connection:
                    await repository.notify_chunks(connection, due)
            except Exception:
                # subscribers still catch up at their safety re-check; the rows are there
                logger.warning("coalesced chunk notification failed", exc_info=True)
        horizon = loop.time() - window
        for run_id, at in list(self._chunk_notified_at.items()):
            if at < horizon:
                del self._chunk_notified_at[run_id]

    async def _read_chunks(self, run_id: str, after: int) -> list[StreamChunk]:
        """Read a run's chunks after ``after``, sharing one query among this process's
        subscribers of the run when it is recent enough to serve them."""
        watch = self._watches.get(run_id)
        generation = 0 if watch is None else watch.chunk_generation
        shared = self._chunk_reads.get(run_id)
        # only a read started after the wake-up that sent us here has seen what it announced
        if shared is not None and shared.after <= after and shared.generation >= generation:
            chunks = await asyncio.shield(shared.result)
            wanted = [chunk for chunk in chunks if chunk.seq > after]
            if wanted or len(chunks) < self.settings.stream_read_batch:
                return wanted
        read = asyncio.ensure_future(self._read_chunks_from_table(run_id, after))
        # retrieved even if every waiter was cancelled, so it is never "never retrieved"
        read.add_done_callback(lambda done: done.cancelled() or done.exception())
        mine = _SharedRead(after, generation, read)
        self._chunk_reads[run_id] = mine
        try:
            return await asyncio.shield(read)
        finally:
            if self._chunk_reads.get(run_id) is mine:
                del self._chunk_reads[run_id]

    async def _read_chunks_from_table(self, run_id: str, after: int) -> list[StreamChunk]:
        limit = self.settings.stream_read_batch
        return await self._patiently(
            lambda connection: repository.read_chunks(connection, run_id, after=after, limit=limit)
        )

    # --- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryClosedError()

    def _check_decisions(
        self, decisions: Sequence[ToolCallDecision | Mapping[str, object]]
    ) -> tuple[list[ToolCallDecision], list[str]]:
        """Validate a batch; return it with each ``result`` encoded once, as stored."""
        self._check_open()
        if isinstance(decisions, str | bytes | Mapping) or not isinstance(decisions, Iterable):
            raise InvalidInputError("decisions", "expected a sequence of decisions")
        batch = list(decisions)
        limit = self.settings.max_decisions_per_forward
        if len(batch) > limit:
            raise TooManyDecisionsError(len(batch), limit)
        checked = [
            ToolCallDecision.coerce(f"decisions[{index}]", item) for index, item in enumerate(batch)
        ]
        results = [
            json.dumps(decision.result, ensure_ascii=False, separators=(",", ":"))
            for decision in checked
        ]
        for index, result in enumerate(results):
            size = len(result.encode())
            if size > self.settings.max_result_bytes:
                raise InvalidInputError(
                    f"decisions[{index}].result",
                    f"is {size} bytes of JSON; the limit is {self.settings.max_result_bytes}",
                )
        return checked, results

    def _watch(self, run_id: str) -> RunWatch:
        watch = self._watches.get(run_id)
        if watch is None:
            watch = RunWatch(run_id)
            # a notification that arrived between reading the row and this line is kept here
            recent = self._recent.get(run_id)
            if recent is not None:
                self._apply(watch, recent)
            self._watches[run_id] = watch
        return watch

    @contextlib.asynccontextmanager
    async def _connection(self, *, begin: bool) -> AsyncIterator[AsyncConnection]:
        self._check_open()
        try:
            async with self._lane.connection(transaction=begin) as connection:
                yield connection
        except UNREACHABLE as exc:
            raise DatabaseUnavailableError(str(exc)) from exc
        except DBAPIError as exc:
            if is_unavailable(exc):
                raise DatabaseUnavailableError(str(exc)) from exc
            raise

    def _read(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A connection for one statement, without BEGIN/COMMIT round trips."""
        return self._connection(begin=False)

    def _write(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A connection inside a transaction that commits when the block exits cleanly."""
        return self._connection(begin=True)

    async def _idempotent(self, operation: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        """Run a statement that is safe to repeat, once more if the first connection was dead.

        After a server restart every pooled connection is broken; the first failure
        invalidates the pool, so the repeat gets a fresh connection.
        """
        try:
            async with self._read() as connection:
                return await operation(connection)
        except DatabaseUnavailableError:
            logger.debug("retrying an idempotent statement on a fresh connection")
        async with self._read() as connection:
            return await operation(connection)

    async def _patiently(self, operation: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        """Run a repeatable statement for a waiter, retrying until the database is back.

        Inboxes and subscriptions wait through an outage instead of failing their consumer;
        only closing the registry stops them.
        """
        delay = 0.05
        while True:
            try:
                return await self._idempotent(operation)
            except DatabaseUnavailableError as exc:
                logger.warning("database unavailable (%s); retrying in %.2fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.safety_interval)

    async def _claim(self, run_id: str, after: int) -> repository.Claim:
        # repeatable: a claim that committed unseen is claimed again (one more attempt counted)
        limit, max_attempts = self.settings.inbox_batch, self.settings.max_delivery_attempts
        claim = await self._patiently(
            lambda connection: repository.claim_decisions(
                connection, run_id, after=after, limit=limit, max_attempts=max_attempts
            )
        )
        if claim.dead_lettered:
            logger.warning(
                "dead-lettered %d decisions of run %s after %d delivery attempts",
                claim.dead_lettered,
                run_id,
                max_attempts,
                extra={"run_id": run_id},
            )
        return claim

    async def _ack(self, delivery: DecisionDelivery) -> bool:
        async with self._read() as connection:
            return await repository.ack_decision(connection, delivery.run_id, delivery.delivery_id)

    async def _refresh(self, watch: RunWatch) -> None:
        states = await self._idempotent(
            lambda connection: repository.run_states(connection, [watch.run_id])
        )
        if not states:
            watch.end()
        for state in states:
            watch.apply(state.status, state.cancel_requested)

    def _on_notification(self, notification: Notification) -> None:
        if notification.kind is NotificationKind.CHUNK:
            chunk_watch = self._watches.get(notification.id)
            if chunk_watch is not None and notification.seq is not None:
                chunk_watch.chunk_generation += 1
                for stream in list(chunk_watch.streams):
                    if isinstance(stream, StreamSubscription):
                        stream.offer(notification.seq, notification.data)
            return
        if notification.kind is not NotificationKind.DECISION:
            self._recent[notification.id] = notification.kind
            if len(self._recent) > _RECENT_LIMIT:
                self._recent.popitem(last=False)
        watch = self._watches.get(notification.id)
        if watch is not None:
            self._apply(watch, notification.kind)

    @staticmethod
    def _apply(watch: RunWatch, kind: NotificationKind) -> None:
        # cancel, supersede and end are irreversible once committed, and NOTIFY is sent only
        # at commit, so they may be applied without re-reading the row
        if kind is NotificationKind.DECISION:
            watch.wake_inboxes()
        elif kind is NotificationKind.CANCEL:
            watch.cancelled.set()
        elif kind is NotificationKind.SUPERSEDED:
            watch.cancelled.set()
            watch.end()
        elif kind is NotificationKind.ENDED:
            watch.end()

    def _on_reconnect(self) -> None:
        # notifications sent while the listener was away are lost: everyone reads the tables
        for watch in list(self._watches.values()):
            watch.wake_streams()
        self._recheck_now.set()

    async def _recheck_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recheck_now.wait(), self.settings.safety_interval)
            self._recheck_now.clear()
            try:
                await self._recheck()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("safety re-check failed; retrying", exc_info=True)

    async def _recheck(self) -> None:
        """Re-read the tables for every live watch: the net under lost notifications."""
        watches = [watch for watch in self._watches.values() if not watch.ended.is_set()]
        if not watches:
            return
        by_id = {watch.run_id: watch for watch in watches}
        async with self._read() as connection:
            states = await repository.run_states(connection, list(by_id))
            with_inboxes = [watch.run_id for watch in watches if len(watch.inboxes)]
            heads = (
                await repository.open_decision_heads(connection, with_inboxes)
                if with_inboxes
                else {}
            )
        seen = set()
        for state in states:
            seen.add(state.run_id)
            by_id[state.run_id].apply(state.status, state.cancel_requested)
        for run_id, open_decisions in heads.items():
            for inbox in by_id[run_id].inboxes:
                if open_decisions.pending or inbox.position() < open_decisions.newest:
                    inbox.wake()
        for state in states:
            if state.stream_seq is None:
                continue
            for stream in by_id[state.run_id].streams:
                if stream.position() < state.stream_seq:
                    stream.wake()
        for run_id in by_id.keys() - seen:
            by_id[run_id].end()  # the row is gone: nothing will ever arrive
