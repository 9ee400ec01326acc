"""The registry's background jobs, one small class each, started, then stopped on close.

:class:`LeaseKeeper` holds this registry's :class:`Lease` on each run it took (register,
resume, adopt), renews them on a heartbeat, notices the runs another registry took over
(fencing: the run's owner epoch moved on), finishes cancelled orphans, and releases its own
leases, and only those, on a clean shutdown. :class:`SafetyNet` re-reads the tables
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
from registry.connections import ConnectionLane, converge
from registry.database import constraint_name
from registry.errors import (
    OutcomeUnknownError,
    RegistryClosedError,
    RunAlreadyExistsError,
    ThreadBusyError,
)
from registry.models import ConflictPolicy, RunRecord
from registry.notifications import Keyring, NotificationKey
from registry.tables import ONE_ACTIVE_RUN_PER_THREAD, RUN_ID_TAKEN
from registry.watch import Dispatcher, Lease, RunWatch

logger = logging.getLogger(__name__)

# how often register retries after losing a race on the one-active-run index
_REGISTER_ATTEMPTS = 5


class LeaseKeeper:
    """This registry's leases: a heartbeat every ``heartbeat_interval`` seconds renews each
    run it holds to ``lease_seconds`` (one statement, under the epoch it holds the run at),
    notices runs another registry took, and sweeps cancelled orphans; :meth:`stop` releases
    the leases it holds so that another worker may adopt those runs at once.

    What it keeps is bounded by the runs it holds now: a run leaves when it is removed here,
    or when the heartbeat sees it ended or taken.
    """

    def __init__(
        self,
        lane: ConnectionLane,
        dispatcher: Dispatcher,
        keyring: Keyring,
        *,
        lease_seconds: float,
        heartbeat_interval: float,
    ) -> None:
        self._lane = lane
        self._dispatcher = dispatcher
        self._keyring = keyring
        self.lease = timedelta(seconds=lease_seconds)
        self._interval = heartbeat_interval
        self._held: dict[str, Lease] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._stopping = asyncio.Event()

    async def register(
        self,
        worker_id: str,
        *,
        run_id: str,
        agent_id: str,
        thread_id: str,
        key: NotificationKey,
        on_conflict: ConflictPolicy = ConflictPolicy.SUPERSEDE,
    ) -> RunRecord:
        """Register and hold ``run_id`` on the thread under ``on_conflict``, owned by
        ``worker_id`` (see ``RunRegistry.register``): retried after losing a race on the
        one-active-run index, and once after a lost reply, where the same ids of the same
        worker id, active or queued, are the run this call created. Raises
        :class:`RunAlreadyExistsError` otherwise, and :class:`ThreadBusyError` under
        ``reject``."""
        reply_lost = False
        for attempt in range(1, _REGISTER_ATTEMPTS + 1):
            try:
                async with self._lane.transaction() as connection:
                    record = await repository.register_run(
                        connection,
                        run_id=run_id,
                        thread_id=thread_id,
                        agent_id=agent_id,
                        owner_id=worker_id,
                        lease=self.lease,
                        key=key,
                        on_conflict=on_conflict,
                    )
            except OutcomeUnknownError:
                if reply_lost:
                    raise
                reply_lost = True  # once more: a register that committed unseen is found below
                continue
            except ThreadBusyError:
                raise  # the policy's answer, nothing written: not a race to retry
            except Exception as exc:
                name = constraint_name(exc)
                if name == RUN_ID_TAKEN:
                    existing = await self._lane.retry_once(
                        lambda connection: repository.run_by_id(connection, run_id)
                    )
                    ours = (thread_id, agent_id, worker_id)
                    if (
                        existing is None
                        or existing.status.is_finished
                        or (
                            existing.thread_id,
                            existing.agent_id,
                            existing.owner_id,
                        )
                        != ours
                    ):
                        raise RunAlreadyExistsError(run_id) from exc
                    record = existing
                elif name != ONE_ACTIVE_RUN_PER_THREAD or attempt == _REGISTER_ATTEMPTS:
                    raise
                else:
                    continue
            return self._take([record])[0]
        raise AssertionError("unreachable")  # pragma: no cover

    async def resume(self, worker_id: str) -> list[RunRecord]:
        """Renew and hold the active runs of ``worker_id``, and hold its queued runs, oldest
        first (see ``RunRegistry.resume_owned_runs``); retried once after a lost reply."""

        async def resume() -> list[RunRecord]:
            async with self._lane.autocommit(write=True) as connection:
                # the queued runs first: one promoted between the two statements is active
                # by the second, which takes it under the epoch the first gave it
                queued = await repository.resume_owned_queued(connection, worker_id, self.held())
                held = self.held() | {record.run_id: record.owner_epoch for record in queued}
                active = await repository.resume_owned(connection, worker_id, self.lease, held)
            records = {record.run_id: record for record in queued}
            records.update((record.run_id, record) for record in active)
            return sorted(records.values(), key=lambda record: record.created_at)

        return self._take(await converge(resume))

    async def adopt(self, worker_id: str, limit: int) -> list[RunRecord]:
        """Adopt and hold up to ``limit`` runs whose lease expired, never one held here (see
        ``RunRegistry.adopt_orphaned_runs``)."""
        async with self._lane.autocommit(write=True) as connection:
            records = await repository.adopt_orphans(
                connection, worker_id, self.lease, limit, list(self._held)
            )
        return self._take(records)

    def _take(self, records: list[RunRecord]) -> list[RunRecord]:
        for record in records:
            self.hold(record)
        self.start()
        return records

    def held(self) -> dict[str, int]:
        """The runs this registry holds, each with the owner epoch it holds it under."""
        return {run_id: lease.epoch for run_id, lease in self._held.items()}

    def hold(self, record: RunRecord) -> Lease:
        """Take the run of ``record`` (just registered, resumed or adopted) under its epoch; a
        lease of an older epoch of the run is lost."""
        current = self._held.get(record.run_id)
        if current is not None and current.epoch == record.owner_epoch:
            return current
        if current is not None:
            self._lose(current)
        lease = Lease(record.run_id, record.owner_epoch)
        self._held[record.run_id] = lease
        return lease

    def lease_for(self, record: RunRecord) -> Lease:
        """The lease a handle of ``record`` acts under: the one held when it is of the same
        epoch, else a lease nobody renews (a handle looked up, not taken)."""
        current = self._held.get(record.run_id)
        if current is not None and current.epoch == record.owner_epoch:
            return current
        return Lease(record.run_id, record.owner_epoch)

    def let_go(self, run_id: str) -> None:
        """Forget the run (it ended here); nothing is written."""
        self._held.pop(run_id, None)

    def lose(self, lease: Lease) -> None:
        """Another registry took the run: trip its tokens and end its inboxes, here."""
        if self._held.get(lease.run_id) is lease:
            del self._held[lease.run_id]
        self._lose(lease)

    def _lose(self, lease: Lease) -> None:
        if lease.lost.is_set():
            return
        logger.warning(
            "lost run %s: another registry took it over (owner epoch %d moved on)",
            lease.run_id,
            lease.epoch,
            extra={"run_id": lease.run_id},
        )
        lease.lost.set()
        watch = self._dispatcher.get(lease.run_id)
        if watch is not None:
            watch.wake_token_waiters()
            watch.wake_inboxes()

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
        held = self.held()
        if not held:
            return
        try:
            async with asyncio.timeout(grace):
                async with self._lane.autocommit() as connection:
                    await repository.release_leases(connection, held)
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
        key = await self._keyring.get()
        async with self._lane.transaction() as connection:
            swept = await repository.sweep_cancelled_orphans(connection, self.lease, key)
            for run_id in swept:
                await repository.drop_open_decisions(
                    connection, run_id, f"run {run_id} cancelled while its owner was gone"
                )
        return swept

    async def renew(self) -> None:
        """Renew every lease held, and let go of the runs that ended or were taken over (their
        tokens trip and their inboxes end with :class:`LeaseLostError`)."""
        held = self.held()
        if not held:
            return
        async with self._lane.autocommit() as connection:
            renewed = await repository.renew_leases(connection, held, self.lease)
            missing = [run_id for run_id in held if run_id not in renewed]
            states = await repository.held_run_states(connection, missing) if missing else {}
        logger.debug("renewed the leases of %d runs", len(renewed))
        for run_id in missing:
            lease = self._held.get(run_id)
            if lease is None or lease.epoch != held[run_id]:
                continue  # let go or taken anew meanwhile
            status, epoch = states.get(run_id, (None, None))
            if status is None or status.is_finished:
                self.let_go(run_id)  # ended (or deleted): its watch ends it here
            elif epoch != lease.epoch:
                self.lose(lease)

    async def _beat(self) -> None:
        while True:
            await _wait(self._stopping, self._interval)
            if self._stopped:
                return
            try:
                await self.renew()
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

    async def refresh(self, watch: RunWatch) -> int | None:
        """Re-read one run's row now and apply it (a token's ``refresh``); return the run's
        owner epoch while it is active or queued, else ``None``."""
        states = await self._lane.retry_once(
            lambda connection: repository.run_states(connection, [watch.run_id])
        )
        if not states:
            watch.end()
        for state in states:
            watch.apply(state.status, cancel_requested=state.cancel_requested)
            if not state.status.is_finished:
                return state.owner_epoch
        return None

    async def recheck(self) -> None:
        """Re-read the tables for every live watch, in two round trips at most; the server
        compares and answers only for the runs whose rows say more than the watch knows."""
        watches = self._dispatcher.live()
        if not watches:
            return
        by_id = {watch.run_id: watch for watch in watches}
        known = repository.KnownRuns(list(by_id), [], [], {})
        positions: list[tuple[str, int]] = []  # the lowest cursor of each run's inboxes
        # one pass, short lists: what goes over the wire beyond the ids is the exceptions
        for watch in watches:
            if watch.cancelled.is_set():
                known.cancelled.append(watch.run_id)
            if not watch.activated.is_set():
                known.not_active.append(watch.run_id)
            if watch.streams:
                position = min([stream.position() for stream in watch.streams])
                known.stream_positions[watch.run_id] = position
            if watch.inboxes:
                positions.append((watch.run_id, min([inbox.position() for inbox in watch.inboxes])))
        async with self._lane.autocommit() as connection:
            states, gone = await repository.changed_run_states(connection, known)
            behind = await repository.inboxes_behind(connection, positions) if positions else []
        for state in states:
            watch = by_id[state.run_id]
            watch.apply(state.status, cancel_requested=state.cancel_requested)
            if state.stream_seq is not None:
                for stream in watch.streams:
                    if stream.position() < state.stream_seq:
                        stream.wake()
        for run_id in behind:
            for inbox in by_id[run_id].inboxes:
                inbox.wake()
        for run_id in gone:
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
