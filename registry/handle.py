"""A run as this process sees it: :class:`RunHandle` and its :class:`RunCancellationToken`.

Handles are views: they read what the registry's parts keep current (the run's watch) and act
through the registry's public calls, the decision queue and the chunk publisher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from registry import repository
from registry.connections import ConnectionLane
from registry.database import translate_errors
from registry.inbox import DecisionInbox, DecisionQueue
from registry.listener import Listener
from registry.models import RunRecord, check_chunks
from registry.settings import RegistrySettings
from registry.streams import ChunkPublisher, SharedChunkReader
from registry.upkeep import LeaseKeeper, SafetyNet
from registry.watch import Dispatcher, RunWatch


class RunCalls(Protocol):
    """The registry calls a handle forwards to (``RunRegistry`` provides them)."""

    async def cancel_active_run_by_id(self, run_id: str) -> bool: ...

    async def remove_by_run_id(self, run_id: str) -> bool: ...

    async def bind_thread_run_stream_fanout(self, run_id: str) -> bool: ...


class RunParts:
    """What handles and tokens of one registry share, and the registry's background work.

    Built from the settings over the registry's connection lane: the dispatcher of
    notifications, the decision queue, the chunk publisher and shared chunk reader, the lease
    keeper, the safety net, and (after ``start(listen=True)``) the LISTEN supervisor.
    """

    def __init__(
        self,
        calls: RunCalls,
        lane: ConnectionLane,
        *,
        dsn: str,
        worker_id: str,
        settings: RegistrySettings,
    ) -> None:
        self.calls = calls
        self.max_chunk_bytes = settings.max_chunk_bytes
        self.dispatcher = Dispatcher()
        self.decisions = DecisionQueue(
            lane,
            batch=settings.inbox_batch,
            max_attempts=settings.max_delivery_attempts,
            max_delay=settings.safety_interval,
        )
        self.publisher = ChunkPublisher(
            lane, window=settings.stream_notify_window, inline_limit=settings.inline_chunk_bytes
        )
        self.reader = SharedChunkReader(
            lane,
            self.dispatcher,
            batch=settings.stream_read_batch,
            max_delay=settings.safety_interval,
        )
        self.leases = LeaseKeeper(
            lane,
            worker_id,
            lease_seconds=settings.lease_seconds,
            heartbeat_interval=settings.heartbeat_interval,
        )
        self.safety_net = SafetyNet(lane, self.dispatcher, interval=settings.safety_interval)
        self.listener: Listener | None = None
        self._dsn = dsn
        self._health_interval = settings.health_interval

    async def start(self, *, listen: bool) -> None:
        """Start listening (unless ``listen=False``) and the safety net.

        Raises :class:`DatabaseUnavailableError` if the LISTEN connection fails.
        """
        if listen and self.listener is None:
            self.listener = Listener(
                self._dsn,
                self.dispatcher.apply,
                self._on_reconnect,
                probe=repository.health_probe,
                health_interval=self._health_interval,
            )
            with translate_errors():
                await self.listener.start()
        self.safety_net.start()

    def _on_reconnect(self) -> None:
        # notifications sent while the listener was away are lost: everyone reads the tables
        self.dispatcher.wake_streams()
        self.safety_net.recheck_soon()

    async def stop(self) -> None:
        """Flush pending wake-ups, release the leases, stop the background tasks and the
        listener, and end every open inbox. The connection lane stays open."""
        await self.publisher.stop()
        await self.leases.stop()
        await self.safety_net.stop()
        if self.listener is not None:
            await self.listener.stop()
        self.dispatcher.wake_inboxes()


class RunCancellationToken:
    """Trips when the run is cancelled or superseded, from whichever process asked.

    ``is_cancelled()`` reads local state kept current by notifications and by the safety-net
    re-check; ``await wait()`` returns once it trips; ``await refresh()`` re-reads the row.
    """

    __slots__ = ("_parts", "_watch")

    def __init__(self, parts: RunParts, watch: RunWatch) -> None:
        self._parts = parts
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
        return await self._parts.calls.cancel_active_run_by_id(self.run_id)

    async def refresh(self) -> bool:
        """Re-read the run's row now and return :meth:`is_cancelled`."""
        await self._parts.safety_net.refresh(self._watch)
        return self.is_cancelled()


class RunHandle:
    """An active run as seen from this process: ids, ownership, token, inbox, stream.

    A handle is a view of a row, not the run itself: the run may be cancelled, superseded or
    removed from any process, which its token and inbox then report.
    """

    __slots__ = ("_parts", "_record", "_watch")

    def __init__(self, parts: RunParts, record: RunRecord) -> None:
        self._parts = parts
        self._record = record
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
    def record(self) -> RunRecord:
        """The run's row as it was when this handle was obtained."""
        return self._record

    def can_own(self, agent_id: str) -> bool:
        """Whether ``agent_id`` is the agent that owns this run."""
        return self._record.agent_id == agent_id

    def cancellation_token(self) -> RunCancellationToken:
        """The run's cancellation token, shared with every other token of the run here."""
        return RunCancellationToken(self._parts, self._watch)

    def decisions(self) -> DecisionInbox:
        """Open the run's inbox (the seed's ``bind_decision_tx`` and ``pending_decisions``)."""
        return DecisionInbox(self._parts.decisions, self._watch)

    async def cancel(self) -> bool:
        """Request cancellation of this run; ``False`` if it is no longer active."""
        return await self._parts.calls.cancel_active_run_by_id(self.run_id)

    async def remove(self) -> bool:
        """Finish this run (the seed's ``remove_thread_run_handle``); see ``remove_by_run_id``."""
        return await self._parts.calls.remove_by_run_id(self.run_id)

    async def bind_stream_fanout(self) -> bool:
        """Open this run's stream; see :meth:`RunRegistry.bind_thread_run_stream_fanout`."""
        return await self._parts.calls.bind_thread_run_stream_fanout(self.run_id)

    async def publish(self, chunk: bytes) -> int:
        """Append ``chunk`` to the run's stream and return its sequence number.

        Raises :class:`StreamClosedError` if the stream is not bound or the run has ended,
        :class:`InvalidInputError` for a chunk that is not bytes or is over ``max_chunk_bytes``.
        """
        [seq] = await self.publish_many([chunk])
        return seq

    async def publish_many(self, chunks: Sequence[bytes]) -> list[int]:
        """Append ``chunks`` in order, in one transaction; return their sequence numbers."""
        batch = check_chunks(chunks, max_chunk_bytes=self._parts.max_chunk_bytes)
        return await self._parts.publisher.publish(self.run_id, batch)

    def __repr__(self) -> str:
        return (
            f"RunHandle(run_id={self.run_id!r}, thread_id={self.thread_id!r}, "
            f"agent_id={self.agent_id!r})"
        )
