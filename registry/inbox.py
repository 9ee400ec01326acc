"""A run's decisions as a queue: claim, deliver in forward order, acknowledge.

:class:`DecisionQueue` runs the claim and the ack on the connection lane; :class:`DecisionInbox`
is what a run iterates (the seed's ``bind_decision_tx`` receiver plus ``pending_decisions``):
queued decisions first, then new ones as notifications wake it, until the run ends. Delivery is
at least once: a decision claimed but not acknowledged is claimed again by the next inbox.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Self

from registry import repository, telemetry
from registry.batching import Batcher
from registry.connections import ConnectionLane
from registry.errors import (
    InvalidInputError,
    LeaseLostError,
    OutcomeUnknownError,
    RunCancelledError,
    RunEndedError,
)
from registry.models import DecisionDelivery, check_timeout
from registry.telemetry import traced
from registry.watch import Lease, RunWatch

logger = logging.getLogger(__name__)

#: acknowledgements in one statement, at most
MAX_ACK_BATCH = 500


class DecisionQueue:
    """Claims and acknowledgements of decisions, for every inbox of one registry.

    ``batch``: decisions claimed per round trip. ``max_attempts``: a decision delivered this
    many times without an ack is dropped as dead-lettered. ``max_delay``: the longest pause
    between retries while the database is unavailable (claims wait through an outage).
    Acknowledgements that arrive together go in one statement, ``concurrency`` at most in
    flight (see :mod:`registry.batching`). ``target``: what its spans and metrics say of the
    database and the worker.
    """

    def __init__(
        self,
        lane: ConnectionLane,
        *,
        batch: int,
        max_attempts: int,
        max_delay: float,
        concurrency: int = 4,
        target: telemetry.Target,
    ) -> None:
        self._lane = lane
        self.telemetry_target = target
        self.batch = batch
        self._max_attempts = max_attempts
        self._max_delay = max_delay
        # acks of every inbox that arrive together share one statement (group commit); one
        # delivery at most once per statement
        self._acks: Batcher[repository.Ack, bool | None] = Batcher(
            self._send_acks,
            concurrency=concurrency,
            max_items=MAX_ACK_BATCH,
            key=lambda ack: ack.delivery_id,
            cut_short=lambda: OutcomeUnknownError("The ack was cut short; it may be stored."),
            name="registry-ack",
        )

    @traced("claim_decisions", run_id="lease.run_id")
    async def claim(self, lease: Lease, after: int) -> repository.Claim:
        """Claim the run's next decisions after ``after`` (and any pending below it), under
        ``lease``'s owner epoch (``Claim.lease_lost`` if the run's epoch moved on).

        Repeatable: a claim that committed unseen is claimed again (one more attempt counted).
        """
        run_id = lease.run_id
        claim = await self._lane.retry_until_available(
            lambda connection: repository.claim_decisions(
                connection,
                run_id,
                after=after,
                limit=self.batch,
                max_attempts=self._max_attempts,
                epoch=lease.epoch,
            ),
            max_delay=self._max_delay,
        )
        if claim.dead_lettered:
            logger.warning(
                "dead-lettered %d decisions of run %s after %d delivery attempts",
                claim.dead_lettered,
                run_id,
                self._max_attempts,
                extra=telemetry.log_fields(run_id, worker_id=self.telemetry_target.worker_id),
            )
        telemetry.claimed(self.telemetry_target, claim.deliveries, claim.dead_lettered)
        return claim

    async def ack(self, lease: Lease, delivery: DecisionDelivery) -> bool | None:
        """Mark ``delivery`` acknowledged under ``lease``'s owner epoch; ``False`` if it was
        not awaiting an ack, ``None`` (nothing written) if the run's epoch moved on."""
        return await self._acks.submit(
            repository.Ack(delivery.run_id, delivery.delivery_id, lease.epoch)
        )

    async def _send_acks(self, acks: list[repository.Ack]) -> list[bool | None]:
        async with self._lane.autocommit(write=True) as connection:
            return await repository.ack_decisions(connection, acks)


class DecisionInbox:
    """The run's queue of decisions: an async iterator of :class:`DecisionDelivery`.

    It first yields the decisions queued before it was opened, then new ones as they arrive,
    in forward order, and ends when the run ends (or, opened with ``until_cancelled=True``,
    once a cancel or supersede of the run is seen). :meth:`get` takes one decision with a
    timeout. Acknowledge each decision once applied with ``delivery.ack()`` (or :meth:`ack`);
    an unacknowledged decision is delivered again when an inbox is next opened for the run
    (after a crash, in another process), with ``attempts`` counting deliveries. Once the
    registry is closed, the next step raises :class:`RegistryClosedError` (a step parked
    waiting for decisions raises it at once); decisions claimed but not yet yielded are
    delivered again by the next inbox of the run.
    """

    def __init__(
        self,
        queue: DecisionQueue,
        watch: RunWatch,
        lease: Lease,
        lose: Callable[[Lease], None],
        *,
        until_cancelled: bool = False,
    ) -> None:
        self._queue = queue
        self._watch = watch
        self._lease = lease
        self._lose = lose
        self._until_cancelled = until_cancelled
        self._wakeup = asyncio.Event()
        self._wakeup.set()
        self._buffer: collections.deque[DecisionDelivery] = collections.deque()
        self._after = 0
        self._closed = False
        watch.inboxes.add(self)
        if until_cancelled:
            watch.cancel_inboxes.add(self)

    def wake(self) -> None:
        """Look at the table again (called by notifications and the safety-net re-check)."""
        self._wakeup.set()

    @property
    def run_id(self) -> str:
        """The run whose decisions this inbox delivers."""
        return self._watch.run_id

    @property
    def telemetry_target(self) -> telemetry.Target:
        """What this inbox's spans and metrics say of the database and the worker."""
        return self._queue.telemetry_target

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> DecisionDelivery:
        delivery = await self._next(None)
        if delivery is None:
            raise StopAsyncIteration
        return delivery

    # a timeout argument, not only asyncio.timeout around the call: the deadline must bound the
    # wait alone, never cut a claim in flight
    async def get(self, timeout: float | None = None) -> DecisionDelivery:  # noqa: ASYNC109
        """The next decision, waiting at most ``timeout`` seconds for one to arrive (``None``:
        no limit).

        Raises :class:`TimeoutError` (the builtin, as ``asyncio.timeout`` raises it) when none
        arrived in time (nothing is lost: a decision claimed meanwhile is kept for the next
        call); :class:`RunCancelledError` once the run's cancel or supersede is seen, for an
        inbox opened with ``until_cancelled=True``; :class:`RunEndedError` when the run has
        ended and every decision was delivered (where iterating would stop); and, as
        iterating does, :class:`LeaseLostError` and :class:`RegistryClosedError`;
        :class:`InvalidInputError` for a ``timeout`` that is not a non-negative number.
        """
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        delivery = await self._next(deadline)
        if delivery is not None:
            return delivery
        if self._stopped_by_cancel():
            raise RunCancelledError(self.run_id)
        raise RunEndedError(self.run_id, f"the inbox of run {self.run_id!r} has ended")

    def _stopped_by_cancel(self) -> bool:
        return self._until_cancelled and self._watch.cancelled.is_set()

    async def _next(self, deadline: float | None) -> DecisionDelivery | None:
        # the deadline bounds only the wait for a wake-up, never a claim in flight: a claim
        # cut mid-way would leave its decisions claimed and not yielded
        while True:
            if self._closed:
                return None
            # a delivery yielded now could not be acknowledged: leave it for the next inbox
            self._watch.closing.check()
            self._check_lease()
            if self._stopped_by_cancel():
                self._buffer.clear()  # not acknowledged: the run's next inbox redelivers them
                return None
            if self._buffer:
                return self._buffer.popleft()
            ended = self._watch.ended.is_set()
            if not ended and not self._wakeup.is_set():
                # a lost lease wakes the inboxes of its run too (see LeaseKeeper)
                # the last claim emptied the queue: claim again only when told to
                async with asyncio.timeout_at(deadline):
                    await self._wakeup.wait()
                continue
            # clear before reading: a wake-up that lands during the read is kept for the next wait
            self._wakeup.clear()
            # raced with close(): a claim in flight must not outlive the registry's connections
            claim = await self._watch.closing.race(self._queue.claim(self._lease, self._after))
            if claim.lease_lost:
                self._lose(self._lease)
                continue
            if claim.deliveries or claim.dead_lettered:
                # a late commit can bring a decision below the cursor: the cursor never moves back
                self._after = max(self._after, claim.examined)
                self._buffer.extend(
                    dataclasses.replace(delivery, acknowledge=self.ack)
                    for delivery in claim.deliveries
                )
                if claim.full:
                    self._wakeup.set()  # a full batch: more may be queued behind it
                continue
            if ended:
                self._closed = True
                return None

    def position(self) -> int:
        """The delivery id of the newest decision this inbox has claimed."""
        return self._after

    @traced("ack_decision", run_id="self.run_id")
    async def ack(self, delivery: DecisionDelivery) -> bool:
        """Record that ``delivery`` was applied; it will not be delivered again.

        Returns ``False`` if it was already acknowledged or dropped (for example because the
        run was superseded). Idempotent. Raises :class:`InvalidInputError` for a delivery of
        another run, and :class:`LeaseLostError` (nothing written) once another registry has
        taken the run over: it redelivers the decision, this one must not apply more.
        """
        if delivery.run_id != self.run_id:
            raise InvalidInputError(
                "delivery", f"belongs to run {delivery.run_id!r}, not {self.run_id!r}"
            )
        self._check_lease()
        acked = await self._queue.ack(self._lease, delivery)
        if acked is None:
            self._lose(self._lease)
            self._check_lease()
        if acked:
            telemetry.acknowledged(self.telemetry_target)
        return bool(acked)

    def _check_lease(self) -> None:
        if self._lease.lost.is_set():
            self._buffer.clear()  # claimed under the lost lease: the new owner redelivers them
            raise LeaseLostError(self.run_id)

    async def aclose(self) -> None:
        """Stop iterating. Decisions claimed but not acknowledged will be delivered again."""
        self._closed = True
        self._buffer.clear()
        self._watch.inboxes.discard(self)
        self._watch.cancel_inboxes.discard(self)
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
