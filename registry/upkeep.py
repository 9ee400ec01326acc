"""The registry's background jobs, one small class each, started, then stopped on close.

:class:`LeaseKeeper` renews the leases of the runs this worker owns, finishes cancelled
orphans, and releases the leases on a clean shutdown. :class:`SafetyNet` re-reads the tables
for every live watch on an interval and after a listener reconnect: NOTIFY is not durable, so
a lost notification costs at most one interval of latency, never correctness.

``halt`` asks a job to stop (it finishes the round trip in flight), ``stop`` also waits for it
a bounded time, ``abort`` cancels it. A job told to stop exits without a word whatever its
last round trip raised: an error there comes from the close itself (a connection cut, the
registry closed), not from the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from registry import repository
from registry.connections import ConnectionLane
from registry.errors import RegistryClosedError
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
        self._stopping = asyncio.Event()

    def start(self) -> None:
        """Start the heartbeat unless it runs (called whenever this worker takes runs)."""
        if self._task is None and not self._stopped:
            self._task = asyncio.create_task(self._beat(), name="registry-heartbeat")

    def halt(self) -> None:
        """Ask the heartbeat to stop: it ends at once between beats, or after the beat in
        flight (never blocks)."""
        self._stopped = True
        self._stopping.set()

    async def stop(self, grace: float) -> None:
        """Stop the heartbeat and, if it ran, release this worker's leases so that another
        worker may adopt the runs at once.

        Each step waits at most ``grace`` seconds (a beat still in flight then is cancelled);
        a release that does not finish in time or fails is skipped with one warning line
        (the leases then expire on their own).
        """
        self.halt()
        task = self._task
        if task is None:
            return
        await _end(task, grace)
        try:
            async with asyncio.timeout(grace):
                async with self._lane.autocommit() as connection:
                    await repository.release_leases(connection, self._worker_id)
        except TimeoutError:
            logger.warning(
                "close: skipped releasing the leases (no answer within %gs); they expire "
                "within %gs",
                grace,
                self.lease.total_seconds(),
            )
        except RegistryClosedError:
            pass  # closed under us: the leases expire on their own
        except Exception as exc:
            logger.warning(
                "close: could not release the leases (%s); they expire within %gs",
                exc,
                self.lease.total_seconds(),
            )

    def abort(self) -> None:
        """Stop the heartbeat now, even mid-beat, releasing nothing (never blocks)."""
        self.halt()
        if self._task is not None:
            self._task.cancel()

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
            await _wait(self._stopping, self._interval)
            if self._stopped:
                return
            try:
                async with self._lane.autocommit() as connection:
                    renewed = await repository.renew_leases(connection, self._worker_id, self.lease)
                logger.debug("renewed the leases of %d runs", len(renewed))
                if self._stopped:
                    return
                swept = await self.sweep_cancelled_orphans()
                if swept:
                    logger.info("finished %d cancelled orphaned runs", len(swept))
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopped or self._lane.closed:
                    return  # the registry is closing: the failure is the close's own doing
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
        self._stopped = False

    def start(self) -> None:
        """Start the periodic re-check (not after :meth:`halt`)."""
        if self._task is None and not self._stopped:
            self._task = asyncio.create_task(self._loop(), name="registry-recheck")

    def halt(self) -> None:
        """Ask it to stop: it ends at once between re-checks, or after the one in flight
        (never blocks)."""
        self._stopped = True
        self._now.set()

    async def stop(self, grace: float) -> None:
        """Stop it, waiting at most ``grace`` seconds for a re-check in flight (then cancelled)."""
        self.halt()
        if self._task is not None:
            await _end(self._task, grace)

    def abort(self) -> None:
        """Stop it now, even mid-re-check (never blocks)."""
        self.halt()
        if self._task is not None:
            self._task.cancel()

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
            await _wait(self._now, self._interval)
            if self._stopped:
                return
            self._now.clear()
            try:
                await self.recheck()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopped or self._lane.closed:
                    return  # the registry is closing: the failure is the close's own doing
                logger.warning("safety re-check failed; retrying", exc_info=True)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait until ``event`` is set, for at most ``seconds``."""
    # asyncio.timeout, not wait_for: in Python 3.11 wait_for may swallow a cancel that lands
    # as the event is set, and the job would then go on
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


async def _end(task: asyncio.Task[None], grace: float) -> None:
    """Let a job told to stop finish its round trip in flight, for at most ``grace`` seconds,
    then cancel it. A cancel aimed at our caller still reaches it: the task is waited for
    with ``asyncio.wait``, never awaited (which would take that cancel for the task's own)."""
    await asyncio.wait({task}, timeout=grace)
    if not task.done():
        task.cancel()
