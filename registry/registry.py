"""The public registry: :class:`RunRegistry`, a facade over small parts.

It mirrors the in-memory registry of the agent runtime (one active run per thread, decisions
queued until the run reads them, ownership by agent id, cancellation tokens, stream fan-out)
with rows in PostgreSQL as the truth and LISTEN/NOTIFY as the wake-up, so any process can reach
a run. :class:`RunRegistry` is a thin facade: each call validates its arguments, takes a
connection from the lane and runs the repository's statements; the parts it builds do the rest
(``inbox``, ``streams``, ``upkeep``, ``watch``, ``listener``).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Self, TypeVar, overload

from registry import repository, telemetry
from registry.connections import converge
from registry.database import DriverConnection, asyncpg_dsn
from registry.errors import InvalidInputError
from registry.forwarding import DecisionForwarder
from registry.handle import RunHandle, RunParts
from registry.inspection import RegistryInspector
from registry.listener import Listener
from registry.models import (
    ConflictPolicy,
    ForwardedDecision,
    RunRecord,
    ToolCallDecision,
    check_after_seq,
    check_choice,
    check_count,
    check_decision_batch,
    check_id,
)
from registry.notifications import NotificationKey
from registry.schema import check_revision
from registry.scope import Connecting, RunScope
from registry.settings import RegistrySettings
from registry.streams import StreamSubscription
from registry.telemetry import traced
from registry.urls import endpoint

_T = TypeVar("_T")


class RunRegistry(RegistryInspector):
    """The durable, cross-process registry of active runs. Use one per process.

    Open with ``async with RunRegistry.connect(url) as runs:`` (or ``await ...connect(url)``
    and :meth:`close` yourself). Run a body in ``async with runs.run(...) as run:``.
    Every method is one transaction: it happened entirely or not at all. Method names and
    return values follow the in-memory registry this one makes durable. Every method raises
    :class:`DatabaseUnavailableError` when the server cannot be reached within
    ``call_timeout`` (:class:`OutcomeUnknownError` for a write whose reply was lost: see each
    method), :class:`DatabaseError` for what the server refused, and
    :class:`RegistryClosedError` after :meth:`close`; nothing else.
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
        namespace, address, port = endpoint(dsn)
        target = telemetry.Target(
            namespace=namespace, address=address, port=port, worker_id=worker_id
        )
        self._parts = RunParts(self, self._lane, dsn=listen_dsn, target=target, settings=settings)
        # forwards to many runs at once share statements (group commit)
        self._forwarder = DecisionForwarder(
            self._lane, self._parts.keyring, concurrency=max(1, settings.pool_size // 2)
        )

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        worker_id: str | None = None,
        settings: RegistrySettings | None = None,
        listen: bool = True,
        listen_url: str | None = None,
    ) -> Connecting[Self]:
        """Connect to the database at ``url``, check its schema, and start listening.

        Both ``await RunRegistry.connect(url)`` (the registry) and ``async with
        RunRegistry.connect(url) as runs:`` (closed when the block ends) work; nothing
        happens until one of them.

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
        return Connecting(
            lambda: cls._connect(
                url, worker_id=worker_id, settings=settings, listen=listen, listen_url=listen_url
            )
        )

    @classmethod
    async def _connect(
        cls,
        url: str,
        *,
        worker_id: str | None,
        settings: RegistrySettings | None,
        listen: bool,
        listen_url: str | None,
    ) -> Self:
        settings = settings or RegistrySettings()
        if worker_id is None:
            worker_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
        check_id("worker_id", worker_id)
        listen_dsn = None if listen_url is None else asyncpg_dsn(listen_url)
        registry = cls(
            dsn=asyncpg_dsn(url, schema=settings.schema),
            worker_id=worker_id,
            settings=settings,
            listen_dsn=listen_dsn,
        )
        try:
            check_revision(await registry.schema_revision())
            await registry.start(listen=listen)
        except BaseException:
            await registry.close()
            raise
        return registry

    async def start(self, *, listen: bool = True) -> None:
        """Start LISTEN (unless ``listen=False``) and the safety net; :meth:`connect` calls it."""
        await self._parts.start(listen=listen)

    async def close(self) -> None:
        """End every waiter, flush pending wake-ups, release this registry's leases, stop
        listening, and close every connection. Idempotent.

        Waiters (subscriptions, inboxes, ``token.wait()``) and later calls raise
        :class:`RegistryClosedError` at once. Bounded whatever the server does: the last
        flush and the lease release get ``close_timeout`` seconds each. A cancelled
        ``close()`` still closes, without waiting for the server, then raises
        ``CancelledError``.
        """
        if self._closed:
            return
        self._closed = True
        await self._parts.close()

    @property
    def telemetry_target(self) -> telemetry.Target:
        """What this registry's spans and metrics say of its database and worker
        (:mod:`registry.telemetry`)."""
        return self._parts.target

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

    @traced("register", run_id="run_id", thread_id="thread_id")
    async def register(
        self,
        run_id: str,
        agent_id: str,
        thread_id: str,
        *,
        on_conflict: ConflictPolicy | str = ConflictPolicy.SUPERSEDE,
    ) -> RunHandle:
        """Register ``run_id`` on the thread and return its handle.

        With a run already active on the thread, ``on_conflict`` (:class:`ConflictPolicy`)
        decides in the same transaction (the thread's lock serialises registers across
        processes): ``"supersede"`` (the seed's), it becomes ``superseded``, its token trips
        wherever it lives and its unacknowledged decisions are dropped with the reason;
        ``"reject"``, :class:`ThreadBusyError`, nothing written; ``"enqueue"``, the run is
        stored ``queued`` and becomes active, in order of arrival, once the runs before it
        have ended (``handle.wait_active()``); meanwhile it gets no decisions and may be
        cancelled, ending ``cancelled``.

        Idempotent for its own retry: registering again the same ids from the same
        ``worker_id`` while the run is active or queued returns its handle (so a register
        whose reply was lost is retried here, once, and converges). Raises
        :class:`RunAlreadyExistsError` if ``run_id`` was registered before otherwise, and
        :class:`InvalidInputError` for another ``on_conflict``.
        """
        check_id("run_id", run_id)
        check_id("agent_id", agent_id)
        check_id("thread_id", thread_id)
        policy = check_choice("on_conflict", on_conflict, ConflictPolicy)
        key = await self._key()
        record = await self._parts.leases.register(
            self.worker_id,
            run_id=run_id,
            agent_id=agent_id,
            thread_id=thread_id,
            key=key,
            on_conflict=policy,
        )
        return self._handle(record)

    @overload
    def run(self, run_id: str) -> Coroutine[Any, Any, RunRecord | None]: ...

    @overload
    def run(
        self,
        run_id: str,
        agent_id: str,
        thread_id: str,
        *,
        on_conflict: ConflictPolicy | str = ...,
        cancel_body: bool = ...,
    ) -> RunScope: ...

    def run(
        self,
        run_id: str,
        agent_id: str | None = None,
        thread_id: str | None = None,
        *,
        on_conflict: ConflictPolicy | str = ConflictPolicy.SUPERSEDE,
        cancel_body: bool = True,
    ) -> RunScope | Coroutine[Any, Any, RunRecord | None]:
        """``async with runs.run(run_id, agent_id, thread_id) as run:`` registers the run (a
        queued one waits its turn) and records how it ended when the block exits:
        ``completed``, ``failed`` (re-raised), ``cancelled``, ``interrupted``, or ``active``
        for adoption when the registry is closing (every case: :mod:`registry.scope`). With
        ``cancel_body``, a cancel or supersede of the run cancels the block.

        ``await runs.run(run_id)`` alone is the operator's read of the row (any status).
        """
        if agent_id is None and thread_id is None:
            return super().run(run_id)
        if agent_id is None or thread_id is None:
            raise InvalidInputError("thread_id", "give both agent_id and thread_id, or neither")
        return RunScope(
            lambda: self.register(run_id, agent_id, thread_id, on_conflict=on_conflict),
            lambda: self.closed,
            cancel_body=cancel_body,
        )

    def continue_run(self, handle: RunHandle, *, cancel_body: bool = True) -> RunScope:
        """The scope of :meth:`run` for a run resumed or adopted (``handle.record`` says how
        far it got: ``stream_seq``, ``decision_cursor``); nothing is registered. A resumed
        run still queued waits its turn first, as in :meth:`run`."""

        async def start() -> RunHandle:
            return handle

        return RunScope(start, lambda: self.closed, cancel_body=cancel_body)

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

    @traced("remove_by_run_id", run_id="run_id")
    async def remove_by_run_id(self, run_id: str) -> bool:
        """Finish the active run ``run_id``: ``cancelled`` if a cancel was requested, else
        ``completed`` (``RunHandle.finish`` records another outcome and a reason). Its
        unacknowledged decisions are dropped, its inboxes end, and the oldest run queued on
        its thread becomes active.

        Returns ``False`` if the run was not active (the row stays as history either way).
        """
        check_id("run_id", run_id)
        key = await self._key()
        async with self._lane.transaction() as connection:
            ended = await repository.end_run(
                connection, run_id, key, lease=self._parts.leases.lease
            )
        self._parts.leases.let_go(run_id)
        return ended

    async def active_run_id_for_thread(self, agent_id: str, thread_id: str) -> str | None:
        """The thread's active run id if ``agent_id`` owns it, else ``None``."""
        check_id("agent_id", agent_id)
        record = await self._active_run_of_thread(thread_id, agent_id)
        return None if record is None else record.run_id

    @traced("forward_decisions_by_thread", thread_id="thread_id")
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
        result = await self._forwarder.forward(
            repository.Forward(batch, results, thread_id=thread_id, agent_id=agent_id)
        )
        self._forwarded("thread_id", result)
        return None if result is None else ForwardedDecision(result.thread_id, result.run_id)

    @traced("forward_decisions_by_run_id", run_id="run_id")
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
        result = await self._forwarder.forward(repository.Forward(batch, results, run_id=run_id))
        self._forwarded("run_id", result)
        return None if result is None else ForwardedDecision(result.thread_id, result.run_id)

    def _forwarded(self, by: str, result: repository.ForwardResult | None) -> None:
        telemetry.forwarded(self.telemetry_target, by=by, landed=result is not None)
        if result is not None:
            telemetry.annotate(run_id=result.run_id, thread_id=result.thread_id)

    def _check_decisions(self, decisions: object) -> tuple[list[ToolCallDecision], list[str]]:
        self._check_open()
        return check_decision_batch(
            decisions,
            limit=self.settings.max_decisions_per_forward,
            max_result_bytes=self.settings.max_result_bytes,
        )

    async def _write(
        self, statement: Callable[[DriverConnection, NotificationKey], Awaitable[_T]]
    ) -> _T:
        # one statement that writes and notifies, idempotent: retried once after a lost reply
        key = await self._key()

        async def once() -> _T:
            async with self._lane.autocommit(write=True) as connection:
                return await statement(connection, key)

        return await converge(once)

    @traced("cancel_active_run_by_id", run_id="run_id")
    async def cancel_active_run_by_id(self, run_id: str) -> bool:
        """Request cancellation of the run ``run_id``: ``True`` if it was active (its cancel
        is requested) or queued (it is now ``cancelled``); ``False`` if it is neither.

        An active run's tokens trip in every process within milliseconds (or at the next
        safety re-check if the notification is lost); it stays active until it is removed.
        A queued run ends ``cancelled`` at once and never becomes active (its scope's entry
        raises :class:`RunNotStartedError`). Asking again returns ``True`` while the run is
        active (the cancel stays requested), ``False`` once it ended.
        """
        check_id("run_id", run_id)
        cancelled = await self._write(
            lambda c, key: repository.request_cancel_by_id(c, run_id, key)
        )
        if cancelled is not None:
            return True
        key = await self._key()
        async with self._lane.transaction() as connection:
            return await repository.cancel_queued_run(connection, run_id, key)

    @traced("cancel_active_run_by_thread", thread_id="thread_id")
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
        cancelled = await self._write(
            lambda c, key: repository.request_cancel_by_thread(c, thread_id, agent_id, key)
        )
        telemetry.annotate(run_id=cancelled)
        return cancelled

    # --- ownership and recovery --------------------------------------------------------------

    @traced("resume_owned_runs")
    async def resume_owned_runs(self) -> list[RunHandle]:
        """Renew and return the handles of the active runs this ``worker_id`` owns, and of its
        runs still queued, oldest first.

        A process restarted with the same ``worker_id`` continues its runs: their inboxes
        redeliver what was never acknowledged, and a cancel requested meanwhile has already
        tripped their tokens. A queued run's handle has ``record.status`` ``queued``: its
        ``wait_active()`` returns once it is promoted, and :meth:`continue_run` waits for
        that before its block runs (its lease is renewed from then on). Each run this
        registry did not already hold gets a new owner epoch: a registry of the same
        ``worker_id`` still running (an overlapping deploy) loses it (see
        :class:`LeaseLostError`).
        """
        self._check_open()
        records = await self._parts.leases.resume(self.worker_id)
        return [self._handle(record) for record in records]

    @traced("adopt_orphaned_runs")
    async def adopt_orphaned_runs(self, limit: int = 100) -> list[RunHandle]:
        """Claim up to ``limit`` active runs whose owner's lease expired; return their handles.

        Safe when many processes call it at once: each run is adopted by exactly one. Runs
        whose cancel is pending are adopted too (their tokens are already tripped), so the
        adopter can wind them down. Each adopted run gets a new owner epoch, which fences off
        the registry that held it before (see :class:`LeaseLostError`).
        """
        check_count("limit", limit, minimum=1)
        self._check_open()
        records = await self._parts.leases.adopt(self.worker_id, limit)
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

    @traced("bind_thread_run_stream_fanout", run_id="run_id")
    async def bind_thread_run_stream_fanout(self, run_id: str) -> bool:
        """Open the run's output stream; ``False`` when the run is not active. Idempotent."""
        check_id("run_id", run_id)
        return await self._write(lambda c, _key: repository.bind_stream(c, run_id))

    @traced("subscribe_thread_run_stream", run_id="run_id")
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
        self._check_open()
        return await self._parts.reader.subscribe(
            run_id, after_seq, buffer_limit=self.settings.subscriber_buffer
        )
