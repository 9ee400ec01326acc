"""The public registry: :class:`RunRegistry`, a facade over small parts.

It mirrors the in-memory registry of the agent runtime (one active run per thread, decisions
queued until the run reads them, ownership by agent id, cancellation tokens, stream fan-out)
with rows in PostgreSQL as the truth and LISTEN/NOTIFY as the wake-up, so any process can reach
a run. :class:`RunRegistry` is a thin facade: each call validates its arguments, takes a
connection from the lane and runs the repository's statements; the parts it builds do the rest
(``inbox``, ``streams``, ``upkeep``, ``watch``, ``listener``).
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from registry import repository
from registry.database import asyncpg_dsn, constraint_name
from registry.errors import (
    OutcomeUnknownError,
    RunAlreadyExistsError,
)
from registry.handle import RunHandle, RunParts
from registry.inspection import RegistryInspector
from registry.listener import Listener
from registry.models import (
    ForwardedDecision,
    RunRecord,
    ToolCallDecision,
    check_after_seq,
    check_count,
    check_decision_batch,
    check_id,
)
from registry.notifications import NotificationKey
from registry.schema import check_revision
from registry.settings import RegistrySettings
from registry.streams import StreamSubscription
from registry.tables import ONE_ACTIVE_RUN_PER_THREAD, RUN_ID_TAKEN

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# how often register retries after losing a race on the one-active-run index
_REGISTER_ATTEMPTS = 5


class RunRegistry(RegistryInspector):
    """The durable, cross-process registry of active runs. Use one per process.

    Open with ``await RunRegistry.connect(url)`` (or ``async with await ...connect(url)``).
    Every method is one transaction: it happened entirely or not at all. Method names and
    return values follow the in-memory registry this one makes durable. Every method raises
    :class:`DatabaseUnavailableError` when the server cannot be reached, and
    :class:`RegistryClosedError` after :meth:`close`.
    """

    def __init__(
        self,
        *,
        dsn: str,
        worker_id: str,
        settings: RegistrySettings,
        listen_dsn: str | None = None,
    ) -> None:
        """Prefer :meth:`connect`, which checks the schema and starts the listener."""
        super().__init__(dsn=dsn, settings=settings)
        self.worker_id = worker_id
        listen_dsn = dsn if listen_dsn is None else listen_dsn
        self._parts = RunParts(
            self, self._lane, dsn=listen_dsn, worker_id=worker_id, settings=settings
        )

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        worker_id: str | None = None,
        settings: RegistrySettings | None = None,
        listen: bool = True,
        listen_url: str | None = None,
    ) -> RunRegistry:
        """Connect to the database at ``url``, check its schema, and start listening.

        ``worker_id`` names this process as the owner of the runs it registers; one is
        generated (and logged) if not given. ``listen=False`` skips the LISTEN connection
        for short-lived callers that never wait on tokens or inboxes (the safety-net re-check
        alone then wakes them). ``listen_url`` is where the LISTEN connection goes when it
        must not follow ``url``: behind pgbouncer in transaction mode, give the server's own
        address here (LISTEN needs a session of its own). Raises
        :class:`DatabaseUnavailableError` if the server does not answer,
        :class:`SchemaNotReadyError` if migrations have not been run, and
        :class:`InvalidInputError` for a malformed URL or ``worker_id``.
        """
        settings = settings or RegistrySettings()
        if worker_id is None:
            worker_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
        check_id("worker_id", worker_id)
        listen_dsn = None if listen_url is None else asyncpg_dsn(listen_url)
        registry = cls(
            dsn=asyncpg_dsn(url), worker_id=worker_id, settings=settings, listen_dsn=listen_dsn
        )
        try:
            check_revision(await registry.schema_revision())
            await registry.start(listen=listen)
        except BaseException:
            await registry.close()
            raise
        return registry

    async def start(self, *, listen: bool = True) -> None:
        """Start listening (unless ``listen=False``) and the safety net; :meth:`connect`
        calls it. Raises :class:`DatabaseUnavailableError` if the LISTEN connection fails."""
        await self._parts.start(listen=listen)

    async def close(self) -> None:
        """End every waiter, flush pending wake-ups, release this worker's leases, stop
        listening, and close every connection. Idempotent.

        Waiters of this registry (stream subscriptions, inboxes, ``token.wait()``) raise
        :class:`RegistryClosedError` at once, and so does every later call (a token's
        ``is_cancelled()`` still answers from what it last saw). Bounded in time whatever the
        server does: the last flush and the lease release each get
        ``settings.close_timeout`` seconds, then are skipped with a warning (leases then
        expire on their own). Cancelling the task that runs ``close()`` cancels it: the
        registry is closed all the same, without waiting for the server, and
        ``CancelledError`` is raised.
        """
        if self._closed:
            return
        self._closed = True
        await self._parts.close()

    @property
    def listener(self) -> Listener | None:
        """The LISTEN connection's supervisor (``None`` when connected with ``listen=False``)."""
        return self._parts.listener

    async def _key(self) -> NotificationKey:
        # writes notify: they sign with the database's notification key (read once)
        self._check_open()
        return await self._parts.keyring.get()

    def _handle(self, record: RunRecord) -> RunHandle:
        return RunHandle(self._parts, record)

    # --- the seed's API ----------------------------------------------------------------------

    async def register(self, run_id: str, agent_id: str, thread_id: str) -> RunHandle:
        """Register ``run_id`` as the thread's active run and return its handle.

        A run already active on the thread is superseded in the same transaction: it becomes
        ``superseded``, its cancellation token trips wherever it lives, and its decisions not
        yet acknowledged are dropped with the reason.

        Idempotent for its own retry: registering again the same ids from the same
        ``worker_id`` while the run is active returns its handle (so a register whose reply
        was lost is retried here, once, and converges). Raises :class:`RunAlreadyExistsError`
        if ``run_id`` was registered before otherwise.
        """
        check_id("run_id", run_id)
        check_id("agent_id", agent_id)
        check_id("thread_id", thread_id)
        key = await self._key()
        reply_lost = False
        for attempt in range(1, _REGISTER_ATTEMPTS + 1):
            try:
                async with self._lane.transaction() as connection:
                    record = await repository.register_run(
                        connection,
                        run_id=run_id,
                        thread_id=thread_id,
                        agent_id=agent_id,
                        owner_id=self.worker_id,
                        lease=self._parts.leases.lease,
                        key=key,
                    )
            except OutcomeUnknownError:
                if reply_lost:
                    raise
                reply_lost = True  # once more: a register that committed unseen is found below
                continue
            except Exception as exc:
                name = constraint_name(exc)
                if name == RUN_ID_TAKEN:
                    existing = await self._retry_once(
                        lambda connection: repository.active_run_by_id(connection, run_id)
                    )
                    if existing is None or (
                        existing.thread_id,
                        existing.agent_id,
                        existing.owner_id,
                    ) != (thread_id, agent_id, self.worker_id):
                        raise RunAlreadyExistsError(run_id) from exc
                    record = existing
                elif name != ONE_ACTIVE_RUN_PER_THREAD or attempt == _REGISTER_ATTEMPTS:
                    raise
                else:
                    continue
            self._parts.leases.hold(record)
            self._parts.leases.start()
            return self._handle(record)
        raise AssertionError("unreachable")  # pragma: no cover

    async def handle_by_thread(
        self, thread_id: str, *, agent_id: str | None = None
    ) -> RunHandle | None:
        """The handle of the thread's active run, or ``None``.

        With ``agent_id``, ``None`` also when another agent owns the run (the check the
        seed's by-thread forwards make), so a caller acting for an agent sees only its runs.
        """
        record = await self._active_run_of_thread(thread_id, agent_id)
        return None if record is None else self._handle(record)

    async def handle_by_run_id(self, run_id: str) -> RunHandle | None:
        """The handle of the run ``run_id`` if it is active, else ``None``."""
        check_id("run_id", run_id)
        record = await self._retry_once(
            lambda connection: repository.active_run_by_id(connection, run_id)
        )
        return None if record is None else self._handle(record)

    async def remove_by_run_id(self, run_id: str) -> bool:
        """Finish the active run ``run_id``: ``cancelled`` if a cancel was requested, else
        ``completed``. Its unacknowledged decisions are dropped and its inboxes end.

        Returns ``False`` if the run was not active (the row stays as history either way).
        """
        check_id("run_id", run_id)
        key = await self._key()
        async with self._lane.transaction() as connection:
            ended = await repository.end_run(connection, run_id, key)
        self._parts.leases.let_go(run_id)
        return ended

    async def active_run_id_for_thread(self, agent_id: str, thread_id: str) -> str | None:
        """The thread's active run id if ``agent_id`` owns it, else ``None``."""
        check_id("agent_id", agent_id)
        record = await self._active_run_of_thread(thread_id, agent_id)
        return None if record is None else record.run_id

    async def _active_run_of_thread(self, thread_id: str, agent_id: str | None) -> RunRecord | None:
        # the seed's ownership check: another agent's run is no run at all
        check_id("thread_id", thread_id)
        if agent_id is not None:
            check_id("agent_id", agent_id)
        record = await self._retry_once(
            lambda connection: repository.active_run_by_thread(connection, thread_id)
        )
        return None if record is None or agent_id not in (None, record.agent_id) else record

    async def forward_decisions_by_thread(
        self,
        agent_id: str,
        thread_id: str,
        decisions: Sequence[ToolCallDecision | Mapping[str, object]],
    ) -> ForwardedDecision | None:
        """Queue ``decisions`` on the thread's active run if ``agent_id`` owns it.

        All or none are stored; a decision whose non-empty ``decision_id`` the run already
        holds is skipped (a retried forward is harmless). ``None``, with nothing written, if
        the thread has no active run or another agent owns it. Raises
        :class:`TooManyDecisionsError` or :class:`InvalidInputError` for a bad batch.
        """
        check_id("agent_id", agent_id)
        check_id("thread_id", thread_id)
        batch, results = self._check_decisions(decisions)
        key = await self._key()

        async def forward() -> repository.ForwardResult | None:
            async with self._lane.autocommit(write=True) as connection:
                return await repository.forward_by_thread(
                    connection, agent_id, thread_id, batch, results, key
                )

        result = await _converging(forward)
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
        key = await self._key()

        async def forward() -> repository.ForwardResult | None:
            async with self._lane.autocommit(write=True) as connection:
                return await repository.forward_by_run_id(connection, run_id, batch, results, key)

        result = await _converging(forward)
        return None if result is None else ForwardedDecision(result.thread_id, result.run_id)

    def _check_decisions(self, decisions: object) -> tuple[list[ToolCallDecision], list[str]]:
        self._check_open()
        batch, results = check_decision_batch(
            decisions,
            limit=self.settings.max_decisions_per_forward,
            max_result_bytes=self.settings.max_result_bytes,
        )
        # an id per decision that has none, made once per call: a retry of this very call
        # (after a lost reply) stores nothing twice
        return [
            d if d.decision_id else d.model_copy(update={"decision_id": f"registry-{uuid.uuid4()}"})
            for d in batch
        ], results

    async def cancel_active_run_by_id(self, run_id: str) -> bool:
        """Request cancellation of the active run ``run_id``; ``False`` if it is not active.

        The run's tokens trip in every process within milliseconds (or at the next safety
        re-check if the notification is lost). The run stays active until it is removed.
        """
        check_id("run_id", run_id)
        key = await self._key()

        async def cancel() -> str | None:
            async with self._lane.autocommit(write=True) as connection:
                return await repository.request_cancel_by_id(connection, run_id, key)

        return await _converging(cancel) is not None

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
        key = await self._key()

        async def cancel() -> str | None:
            async with self._lane.autocommit(write=True) as connection:
                return await repository.request_cancel_by_thread(
                    connection, thread_id, agent_id, key
                )

        return await _converging(cancel)

    # --- ownership and recovery --------------------------------------------------------------

    async def resume_owned_runs(self) -> list[RunHandle]:
        """Renew and return the handles of the active runs this ``worker_id`` owns, oldest
        first.

        A process restarted with the same ``worker_id`` continues its runs: their inboxes
        redeliver what was never acknowledged, and a cancel requested meanwhile has already
        tripped their tokens. Each run this registry did not already hold gets a new owner
        epoch: a registry of the same ``worker_id`` still running (an overlapping deploy)
        loses it (see :class:`LeaseLostError`).
        """
        self._check_open()
        leases = self._parts.leases

        async def resume() -> list[RunRecord]:
            async with self._lane.autocommit(write=True) as connection:
                return await repository.resume_owned(
                    connection, self.worker_id, leases.lease, leases.held()
                )

        return self._take(await _converging(resume))

    async def adopt_orphaned_runs(self, limit: int = 100) -> list[RunHandle]:
        """Claim up to ``limit`` active runs whose owner's lease expired; return their handles.

        Safe when many processes call it at once: each run is adopted by exactly one. Runs
        whose cancel is pending are adopted too (their tokens are already tripped), so the
        adopter can wind them down. Each adopted run gets a new owner epoch, which fences off
        the registry that held it before (see :class:`LeaseLostError`).
        """
        check_count("limit", limit, minimum=1)
        self._check_open()
        lease = self._parts.leases.lease
        async with self._lane.autocommit(write=True) as connection:
            records = await repository.adopt_orphans(
                connection, self.worker_id, lease, limit, list(self._parts.leases.held())
            )
        return self._take(records)

    def _take(self, records: list[RunRecord]) -> list[RunHandle]:
        for record in records:
            self._parts.leases.hold(record)
        self._parts.leases.start()
        return [self._handle(record) for record in records]

    async def sweep_cancelled_orphans(self) -> list[str]:
        """Finish as ``cancelled`` the orphaned runs whose cancel is pending; return their ids.

        An orphan is an active run whose lease expired more than one lease length ago (nobody
        adopted it). Every registry that owns runs does this on its heartbeat; call it yourself
        from a maintenance job if none does.
        """
        self._check_open()
        return await self._parts.leases.sweep_cancelled_orphans()

    # --- streams -----------------------------------------------------------------------------

    async def bind_thread_run_stream_fanout(self, run_id: str) -> bool:
        """Open the run's output stream; ``False`` when the run is not active. Idempotent."""
        check_id("run_id", run_id)
        self._check_open()

        async def bind() -> bool:
            async with self._lane.autocommit(write=True) as connection:
                return await repository.bind_stream(connection, run_id)

        return await _converging(bind)

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
        check_after_seq(after_seq)
        # interest is registered (the watch) before the read, so nothing slips in between
        watch = self._parts.dispatcher.watch(run_id)
        state = await self._retry_once(
            lambda connection: repository.stream_state(connection, run_id)
        )
        if state is None or state.stream_seq is None:
            return None
        watch.apply(state.status, cancel_requested=state.cancel_requested)
        start = state.stream_seq if after_seq is None else after_seq
        return StreamSubscription(
            self._parts.reader.read,
            watch,
            after_seq=start,
            buffer_limit=self.settings.subscriber_buffer,
        )


async def _converging(call: Callable[[], Awaitable[_T]]) -> _T:
    """Run a write whose retry converges (idempotent), once more if its connection broke
    before the reply; not after a missed deadline (a silent server would make the caller
    wait a second deadline)."""
    try:
        return await call()
    except OutcomeUnknownError as exc:
        if isinstance(exc.__cause__, TimeoutError):
            raise
        logger.info("retrying a write whose outcome is unknown (%s)", exc)
        return await call()
