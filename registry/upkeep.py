"""The registry's background jobs, one small class each with ``start`` and ``stop``.

:class:`LeaseKeeper` renews the leases of the runs this worker owns, finishes cancelled
orphans, and releases the leases on a clean shutdown. :class:`SafetyNet` re-reads the tables
for every live watch on an interval and after a listener reconnect: NOTIFY is not durable, so
a lost notification costs at most one interval of latency, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from registry import repository
from registry.connections import ConnectionLane
from registry.watch import Dispatcher, RunWatch

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """Keeps this worker's claim on its runs: a heartbeat every ``heartbeat_interval`` seconds
    renews every lease it holds to ``lease_seconds`` (one statement) and sweeps cancelled
    orphans; :meth:`stop` releases the leases so that another worker may adopt the runs at once.
    """

    def __init__(
        self,
        lane: ConnectionLane,
        worker_id: str,
        *,
        lease_seconds: float,
        heartbeat_interval: float,
    ) -> None:
        self._lane = lane
        self._worker_id = worker_id
        self.lease = timedelta(seconds=lease_seconds)
        self._interval = heartbeat_interval
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        """Start the heartbeat unless it runs (called whenever this worker takes runs)."""
        if self._task is None and not self._stopped:
            self._task = asyncio.create_task(self._beat(), name="registry-heartbeat")

    async def stop(self) -> None:
        """Stop the heartbeat and, if it ran, release this worker's leases."""
        self._stopped = True
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        try:
            async with self._lane.autocommit() as connection:
                await repository.release_leases(connection, self._worker_id)
        except Exception:
            logger.warning("could not release leases on close", exc_info=True)

    async def sweep_cancelled_orphans(self) -> list[str]:
        """Finish as ``cancelled`` the active runs whose cancel is pending and whose lease
        expired more than one lease ago; drop their open decisions; return their ids."""
        async with self._lane.transaction() as connection:
            swept = await repository.sweep_cancelled_orphans(connection, self.lease)
            for run_id in swept:
                await repository.drop_open_decisions(
                    connection, run_id, f"run {run_id} cancelled while its owner was gone"
                )
        return swept

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                async with self._lane.autocommit() as connection:
                    renewed = await repository.renew_leases(connection, self._worker_id, self.lease)
                logger.debug("renewed the leases of %d runs", len(renewed))
                swept = await self.sweep_cancelled_orphans()
                if swept:
                    logger.info("finished %d cancelled orphaned runs", len(swept))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("heartbeat failed; retrying next interval", exc_info=True)


class SafetyNet:
    """Re-reads the tables for every live watch every ``interval`` seconds, or at once after
    :meth:`recheck_soon`; applies cancels and ends, and wakes inboxes and subscribers that are
    behind the table."""

    def __init__(self, lane: ConnectionLane, dispatcher: Dispatcher, *, interval: float) -> None:
        self._lane = lane
        self._dispatcher = dispatcher
        self._interval = interval
        self._now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the periodic re-check."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="registry-recheck")

    async def stop(self) -> None:
        """Stop it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def recheck_soon(self) -> None:
        """Re-check now rather than at the next interval (after a listener reconnect)."""
        self._now.set()

    async def refresh(self, watch: RunWatch) -> None:
        """Re-read one run's row now and apply it (a token's ``refresh``)."""
        states = await self._lane.retry_once(
            lambda connection: repository.run_states(connection, [watch.run_id])
        )
        if not states:
            watch.end()
        for state in states:
            watch.apply(state.status, cancel_requested=state.cancel_requested)

    async def recheck(self) -> None:
        """Re-read the tables for every live watch, in two round trips at most."""
        watches = self._dispatcher.live()
        if not watches:
            return
        by_id = {watch.run_id: watch for watch in watches}
        with_inboxes = [watch.run_id for watch in watches if len(watch.inboxes)]
        async with self._lane.autocommit() as connection:
            states = await repository.run_states(connection, list(by_id))
            heads = (
                await repository.open_decision_heads(connection, with_inboxes)
                if with_inboxes
                else {}
            )
        for state in states:
            by_id[state.run_id].apply(state.status, cancel_requested=state.cancel_requested)
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
        for run_id in by_id.keys() - {state.run_id for state in states}:
            by_id[run_id].end()  # the row is gone: nothing will ever arrive

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._now.wait(), self._interval)
            self._now.clear()
            try:
                await self.recheck()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("safety re-check failed; retrying", exc_info=True)
