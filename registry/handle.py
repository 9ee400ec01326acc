"""A run as this process sees it: :class:`RunHandle` and its :class:`RunCancellationToken`.

Handles are views: they read what the registry's parts keep current (the run's watch) and act
through the registry's public calls, the decision queue and the chunk publisher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from registry import repository, telemetry
from registry.connections import ConnectionLane
from registry.database import connect, translate_errors
from registry.errors import LeaseLostError, RunNotStartedError
from registry.inbox import DecisionInbox, DecisionQueue
from registry.listener import LISTENER_APPLICATION_NAME, Listener
from registry.models import (
    MAX_BIGINT,
    RunOutcome,
    RunRecord,
    RunStatus,
    check_choice,
    check_chunks,
    check_count,
    check_timeout,
    end_reason,
)
from registry.notifications import Keyring
from registry.publisher import ChunkPublisher
from registry.settings import RegistrySettings
from registry.streams import SharedChunkReader
from registry.telemetry import traced
from registry.upkeep import LeaseKeeper, SafetyNet
from registry.watch import Dispatcher, Lease, RunWatch

logger = logging.getLogger(__name__)

# the connections' close of each closing registry, held until it ends: the event loop keeps
# only weak references to tasks, and after a cancelled close() nobody awaits it
_FINISHING: set[asyncio.Task[None]] = set()


class RunCalls(Protocol):
    """The registry calls a handle forwards to (``RunRegistry`` provides them)."""

    async def cancel_active_run_by_id(self, run_id: str) -> bool: ...

    async def bind_thread_run_stream_fanout(self, run_id: str) -> bool: ...


class RunParts:
    """What handles and tokens of one registry share, and the registry's background work.

    Built from the settings over the registry's connection lane: the dispatcher of
    notifications, the decision queue, the chunk publisher and shared chunk reader, the lease
    keeper, the safety net, and (after ``start(listen=True)``) the LISTEN supervisor.
    ``target``: what the registry's spans and metrics say of its database and worker.
    :meth:`close` ends them all and closes the lane.
    """

    def __init__(
        self,
        calls: RunCalls,
        lane: ConnectionLane,
        *,
        dsn: str,
        target: telemetry.Target,
        settings: RegistrySettings,
    ) -> None:
        self.calls = calls
        self.target = target
        self.max_chunk_bytes = settings.max_chunk_bytes
        self.dispatcher = Dispatcher()
        # statements of each kind in flight at most: half the lane; group commit gathers the
        # calls that arrive meanwhile into the next one
        concurrency = max(1, settings.pool_size // 2)
        #: the notification key, read from the database when first needed
        self.keyring = Keyring(lambda: lane.retry_once(repository.notification_secret))
        self.decisions = DecisionQueue(
            lane,
            batch=settings.inbox_batch,
            max_attempts=settings.max_delivery_attempts,
            max_delay=settings.safety_interval,
            concurrency=concurrency,
            target=target,
        )
        self.publisher = ChunkPublisher(
            lane,
            self.keyring,
            window=settings.stream_notify_window,
            inline_limit=settings.inline_chunk_bytes,
            concurrency=concurrency,
        )
        self.reader = SharedChunkReader(
            lane,
            self.dispatcher,
            batch=settings.stream_read_batch,
            max_delay=settings.safety_interval,
            concurrency=concurrency,
        )
        self.leases = LeaseKeeper(
            lane,
            self.dispatcher,
            self.keyring,
            lease_seconds=settings.lease_seconds,
            heartbeat_interval=settings.heartbeat_interval,
        )
        self.safety_net = SafetyNet(lane, self.dispatcher, interval=settings.safety_interval)
        telemetry.watch_held_runs(self.leases, target)
        self.listener: Listener | None = None
        self._lane = lane
        self._dsn = dsn
        self._health_interval = settings.health_interval
        self._close_timeout = settings.close_timeout
        self._finishing: asyncio.Task[None] | None = None

    async def start(self, *, listen: bool) -> None:
        """Start listening (unless ``listen=False``) and the safety net.

        Raises :class:`DatabaseUnavailableError` if the LISTEN connection fails.
        """
        if listen and self.listener is None:
            key = await self.keyring.get()
            dsn = self._dsn
            self.listener = Listener(
                dsn,
                self.dispatcher.apply,
                self._on_reconnect,
                key=key,
                probe=repository.health_probe,
                health_interval=self._health_interval,
                # the URL's parameters (TLS, options, ...) apply as on the query connections
                connect=lambda timeout: connect(
                    dsn, application_name=LISTENER_APPLICATION_NAME, connect_timeout=timeout
                ),
            )
            with translate_errors():
                await self.listener.start()
        self.safety_net.start()

    def _on_reconnect(self) -> None:
        # notifications sent while the listener was away are lost: everyone reads the tables
        self.dispatcher.wake_streams()
        self.safety_net.recheck_soon()
        telemetry.reconnected(self.target)

    async def end_held_run(
        self, lease: Lease, outcome: RunOutcome | None = None, reason: str | None = None
    ) -> bool:
        """Finish the run under ``lease``'s owner epoch as ``outcome`` (``None``: see
        ``RunRegistry.remove_by_run_id``); ``False`` if it was not active. Raises
        :class:`LeaseLostError` (nothing written) if another registry took the run over."""
        key = await self.keyring.get()
        async with self._lane.transaction() as connection:
            ended = await repository.end_run(
                connection,
                lease.run_id,
                key,
                lease=self.leases.lease,
                epoch=lease.epoch,
                outcome=outcome,
                reason=reason,
            )
            taken = not ended and await repository.owner_epoch_of(connection, lease.run_id)
        if taken:
            self.leases.lose(lease)
            raise LeaseLostError(lease.run_id)
        self.leases.let_go(lease.run_id)
        return ended

    async def read_run(self, run_id: str) -> RunRecord | None:
        """The run's row now, in any status (``None``: no such run)."""
        return await self._lane.retry_once(
            lambda connection: repository.run_by_id(connection, run_id)
        )

    async def close(self) -> None:
        """End every waiter, flush pending wake-ups, release the leases, stop the background
        tasks and the listener, and close the connection lane.

        Waiters raise :class:`RegistryClosedError` at once. Each goodbye to the server (the
        last flush, the lease release) and each background round trip still in flight waits
        at most ``close_timeout`` seconds, then is skipped (a goodbye with a warning). If the
        caller is cancelled meanwhile, what is left is done without waiting for the server
        (tasks cancelled, connections closed in the background) and ``CancelledError`` is
        raised.
        """
        # first what needs no server, so that no cancel or silent server can stop it: every
        # waiter ends now, and no new work starts (a background round trip in flight may
        # finish: cut mid-statement, it would leave the driver a half-done exchange)
        telemetry.forget_held_runs(self.leases)
        self.dispatcher.close()
        self.reader.close()
        self.leases.halt()
        self.safety_net.halt()
        try:
            await self.publisher.stop(self._close_timeout)
            await self.leases.stop(self._close_timeout)
            await self.safety_net.stop(self._close_timeout)
        except BaseException:
            self.abort()
            raise
        # in a task of its own: a cancel of our caller must not interrupt it half way (an idle
        # connection not yet closed would be left open), and Listener.stop awaits its
        # supervisor in a way that would swallow that cancel
        await asyncio.shield(self._finish_closing())

    def abort(self) -> None:
        """Close without waiting for anything (a cancelled close): waiters end, background tasks
        are cancelled, and the listener and the lane close in a task of their own."""
        self.dispatcher.close()
        self.reader.close()
        self.publisher.abort()
        self.leases.abort()
        self.safety_net.abort()
        self._finish_closing()

    def _finish_closing(self) -> asyncio.Task[None]:
        # the listener's and the lane's close, started once
        if self._finishing is None:
            self._finishing = asyncio.create_task(
                self._close_connections(), name="registry-close-connections"
            )
            _FINISHING.add(self._finishing)
            self._finishing.add_done_callback(_finished)
        return self._finishing

    async def _close_connections(self) -> None:
        # side by side: each waits on the server only up to its own bound, and not in turn
        closes = [self._lane.close()]
        if self.listener is not None:
            closes.append(self.listener.stop())
        for outcome in await asyncio.gather(*closes, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome


def _finished(task: asyncio.Task[None]) -> None:
    _FINISHING.discard(task)
    # retrieved here too: after a cancelled close nobody awaits the task
    if not task.cancelled() and task.exception() is not None:
        logger.debug("closing the connections failed", exc_info=task.exception())


class RunCancellationToken:
    """Trips when the run is cancelled or superseded, from whichever process asked.

    ``is_cancelled()`` reads local state kept current by notifications and by the safety-net
    re-check (after the registry's close it still answers, from what it last saw);
    ``await wait()`` returns once it trips; ``await refresh()`` re-reads the row.
    """

    __slots__ = ("_lease", "_parts", "_watch")

    def __init__(self, parts: RunParts, watch: RunWatch, lease: Lease) -> None:
        self._parts = parts
        self._watch = watch
        self._lease = lease

    @property
    def run_id(self) -> str:
        """The run this token belongs to."""
        return self._watch.run_id

    def is_cancelled(self) -> bool:
        """Whether a cancel (or a supersede) of the run has been seen, or that another
        registry took the run over (see :attr:`lease_lost`)."""
        return self._watch.cancelled.is_set() or self._lease.lost.is_set()

    @property
    def lease_lost(self) -> bool:
        """Whether another registry took the run over (resumed or adopted it): stop working
        on it; its claims, acks, publishes and removes from here are refused."""
        return self._lease.lost.is_set()

    async def wait(self) -> None:
        """Return once the run is cancelled or superseded, or its lease is lost.

        Raises :class:`RegistryClosedError` if the registry closes first, at once if it is
        already closed (a token that had tripped before still returns).
        """
        await self._watch.wait_cancelled(self._lease.lost)

    async def cancel(self) -> bool:
        """Request cancellation of the run; ``False`` if it is no longer active."""
        return await self._parts.calls.cancel_active_run_by_id(self.run_id)

    async def refresh(self) -> bool:
        """Re-read the run's row now and return :meth:`is_cancelled` (a takeover by another
        registry is seen too)."""
        epoch = await self._parts.safety_net.refresh(self._watch)
        if epoch is not None and epoch != self._lease.epoch:
            self._parts.leases.lose(self._lease)
        return self.is_cancelled()


class RunHandle:
    """An active run as seen from this process: ids, ownership, token, inbox, stream.

    A handle is a view of a row, not the run itself: the run may be cancelled, superseded or
    removed from any process, which its token and inbox then report.
    """

    __slots__ = ("_lease", "_parts", "_record", "_watch")

    def __init__(self, parts: RunParts, record: RunRecord) -> None:
        self._parts = parts
        self._record = record
        self._lease = parts.leases.lease_for(record)
        self._watch = parts.dispatcher.watch(record.run_id)
        self._watch.apply(record.status, cancel_requested=record.cancel_requested_at is not None)

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
    def telemetry_target(self) -> telemetry.Target:
        """What this run's spans and metrics say of the database and the worker."""
        return self._parts.target

    @property
    def record(self) -> RunRecord:
        """The run's row as it was when this handle was obtained (or :meth:`wait_active`
        returned): ``stream_seq`` and ``decision_cursor`` say how far a resumed or adopted
        run had got."""
        return self._record

    def can_own(self, agent_id: str) -> bool:
        """Whether ``agent_id`` is the agent that owns this run."""
        return self._record.agent_id == agent_id

    def cancellation_token(self) -> RunCancellationToken:
        """The run's cancellation token, shared with every other token of the run here."""
        return RunCancellationToken(self._parts, self._watch, self._lease)

    def decisions(self, *, until_cancelled: bool = False) -> DecisionInbox:
        """Open the run's inbox (the seed's ``bind_decision_tx`` and ``pending_decisions``).

        With ``until_cancelled=True`` the inbox ends as soon as a cancel or supersede of the
        run is seen (iteration stops; ``get`` raises :class:`RunCancelledError`), rather than
        when the run ends; decisions not acknowledged are delivered again to the next inbox.
        """
        return DecisionInbox(
            self._parts.decisions,
            self._watch,
            self._lease,
            self._parts.leases.lose,
            until_cancelled=until_cancelled,
        )

    # a timeout argument for symmetry with ``DecisionInbox.get``
    async def wait_active(self, timeout: float | None = None) -> RunRecord:  # noqa: ASYNC109
        """Wait until this run is the thread's active run (a run registered with
        ``on_conflict="enqueue"`` waits its turn); return its row, now also :attr:`record`.

        Returns at once for an active run. The row is the truth: a notification from the
        promoting transaction wakes the wait, the safety-net re-check covers a lost one.
        Raises :class:`TimeoutError` after ``timeout`` seconds (``None``: no limit; the run
        stays queued), :class:`RunNotStartedError` (a :class:`RunEndedError`) if the run
        ended without becoming active (a queued run cancelled), :class:`LeaseLostError` if
        another registry took it over, and :class:`RegistryClosedError` if the registry
        closes first; :class:`InvalidInputError` for a ``timeout`` that is not a
        non-negative number.
        """
        async with asyncio.timeout(check_timeout(timeout)):
            while True:
                record = await self._parts.read_run(self.run_id)
                if record is None or record.status.is_finished:
                    status = None if record is None else record.status.value
                    raise RunNotStartedError(self.run_id, status)
                if record.owner_epoch != self._lease.epoch:
                    self._parts.leases.lose(self._lease)
                    raise LeaseLostError(self.run_id)
                if record.status is RunStatus.ACTIVE:
                    self._record = record
                    return record
                await self._watch.wait_active()

    @traced("finish", run_id="self.run_id", thread_id="self.thread_id")
    async def finish(self, outcome: RunOutcome | str, reason: str | None = None) -> bool:
        """End this run as ``outcome`` (``completed``, ``failed``, ``cancelled`` or
        ``interrupted``) with ``reason`` (stored as its ``end_reason``; default: the
        outcome's name; cut to 2000 characters). Its open decisions are dropped, its inboxes
        end, and the oldest run queued on its thread becomes active, in the same transaction.

        Returns ``False`` (nothing written) if the run is not active: it ended already
        (whatever its outcome, it is never overwritten), was superseded, or is still queued.
        Raises :class:`InvalidInputError` for another outcome or a reason that is not text,
        and :class:`LeaseLostError` (nothing written) if another registry took the run over.
        """
        checked = check_choice("outcome", outcome, RunOutcome)
        return await self._parts.end_held_run(self._lease, checked, end_reason(reason))

    async def cancel(self) -> bool:
        """Request cancellation of this run (a queued run ends ``cancelled`` at once); ``False``
        if it is no longer active or queued."""
        return await self._parts.calls.cancel_active_run_by_id(self.run_id)

    async def remove(self) -> bool:
        """Finish this run (the seed's ``remove_thread_run_handle``); see ``remove_by_run_id``
        and :meth:`finish`, which records how it ended.

        Fenced: raises :class:`LeaseLostError` (nothing written) if another registry has
        taken the run over since this handle was obtained.
        """
        return await self._parts.end_held_run(self._lease)

    async def bind_stream_fanout(self) -> bool:
        """Open this run's stream; see :meth:`RunRegistry.bind_thread_run_stream_fanout`."""
        return await self._parts.calls.bind_thread_run_stream_fanout(self.run_id)

    @traced("publish", run_id="self.run_id", thread_id="self.thread_id")
    async def publish(self, chunk: bytes, *, after_seq: int | None = None) -> int:
        """Append ``chunk`` to the run's stream and return its sequence number.

        With ``after_seq`` (the last seq this publisher knows), the chunk is stored only as
        ``after_seq + 1``: a retry after :class:`OutcomeUnknownError` converges (the seq is
        returned when the first attempt was stored), and the registry retries a lost reply
        by itself. Raises :class:`StreamClosedError` if the stream is not bound or the run has
        ended, :class:`InvalidInputError` for a chunk that is not bytes or is over
        ``max_chunk_bytes``, :class:`LeaseLostError` if another registry took the run over,
        :class:`StreamConflictError` if the stream is past ``after_seq`` with other chunks
        (nothing written in each case), and :class:`OutcomeUnknownError` without
        ``after_seq`` when the reply was lost (the chunk may be stored).
        """
        [seq] = await self._append([chunk], after_seq)
        return seq

    @traced("publish_many", run_id="self.run_id", thread_id="self.thread_id")
    async def publish_many(
        self, chunks: Sequence[bytes], *, after_seq: int | None = None
    ) -> list[int]:
        """Append ``chunks`` in order, in one transaction; return their sequence numbers.

        ``after_seq`` and the errors are as for :meth:`publish`.
        """
        return await self._append(chunks, after_seq)

    async def _append(self, chunks: Sequence[bytes], after_seq: int | None) -> list[int]:
        batch = check_chunks(chunks, max_chunk_bytes=self._parts.max_chunk_bytes)
        if after_seq is not None:
            # the chunk is stored as after_seq + 1, which must fit a bigint too
            check_count("after_seq", after_seq, minimum=0, maximum=MAX_BIGINT - 1)
        if self._lease.lost.is_set():
            raise LeaseLostError(self.run_id)
        try:
            return await self._parts.publisher.publish(
                self.run_id, batch, epoch=self._lease.epoch, after_seq=after_seq
            )
        except LeaseLostError:
            self._parts.leases.lose(self._lease)
            raise

    def __repr__(self) -> str:
        return (
            f"RunHandle(run_id={self.run_id!r}, thread_id={self.thread_id!r}, "
            f"agent_id={self.agent_id!r})"
        )
