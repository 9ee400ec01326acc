"""A run's output stream read back: shared reads and subscriptions (``publisher`` writes it).

:class:`SharedChunkReader` reads a run's stored chunks, sharing one query among the process's
subscribers of the run; :class:`StreamSubscription` is what a consumer iterates.

Chunks are rows (``stream_chunks``), so the table is the truth: a subscriber yields chunk
``seq`` only after chunk ``seq - 1``. Small chunks may arrive inline in their notification and
are yielded without a query when they are exactly the next expected; anything else (a gap, a
coalesced notification, a full buffer, a reconnect) makes the subscriber read the table. A
slow subscriber therefore never blocks the publisher or other subscribers and never loses a
chunk: past its buffer it simply reads from the table.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from registry import repository
from registry.batching import Batcher
from registry.connections import ConnectionLane
from registry.errors import (
    RegistryClosedError,
)
from registry.models import StreamChunk
from registry.watch import Dispatcher, RunWatch

logger = logging.getLogger(__name__)

#: runs whose reads share one statement, at most
MAX_READ_BATCH = 100


@dataclass(frozen=True, slots=True)
class ChunkPage:
    """One read of a run's stored chunks: ``chunks`` in order, and whether the read hit its
    limit (``full``: more may be stored after the last of them, so read on at once)."""

    chunks: list[StreamChunk]
    full: bool


#: Reads the run's stored chunks with seq greater than the second argument, in order.
ChunkReader = Callable[[str, int], Awaitable[ChunkPage]]


@dataclass(frozen=True, slots=True)
class _SharedRead:
    """A table read of one run's chunks in flight, that other subscribers may wait on."""

    after: int
    generation: int
    result: asyncio.Future[list[StreamChunk]]


class SharedChunkReader:
    """Reads runs' stored chunks for this process's subscribers, one query per run at a time,
    and the queries of many runs in one round trip.

    ``batch``: chunks per run per round trip. A read that finds fewer than ``concurrency``
    statements out goes at once; those that arrive meanwhile (one group-committed wake-up names
    many runs) go together in the next. Reads wait through a database outage (backoff up to
    ``max_delay`` seconds) instead of failing their subscriber; the registry's close ends them
    with :class:`RegistryClosedError`.
    """

    def __init__(
        self,
        lane: ConnectionLane,
        dispatcher: Dispatcher,
        *,
        batch: int,
        max_delay: float,
        concurrency: int = 4,
    ) -> None:
        self._lane = lane
        self._dispatcher = dispatcher
        self.batch = batch
        self._max_delay = max_delay
        self._concurrency = max(1, concurrency)
        self._reads: dict[str, _SharedRead] = {}
        self._in_flight: set[asyncio.Future[list[StreamChunk]]] = set()
        self._tables: Batcher[tuple[str, int], list[StreamChunk]] = Batcher(
            self._read_batch,
            concurrency=concurrency,
            max_items=MAX_READ_BATCH,
            cut_short=RegistryClosedError,
            name="registry-chunk-read",
        )

    async def read(self, run_id: str, after: int) -> ChunkPage:
        """Up to ``batch`` of the run's chunks after ``after``, in order.

        Joins a read of the run already in flight when that one started after the wake-up
        that sent this caller here (so it has seen what the wake-up announced) and from a
        position at or before ``after``. Raises :class:`RegistryClosedError` once the
        registry has closed, at once even if the read is in flight.
        """
        closing = self._dispatcher.closing
        closing.check()
        watch = self._dispatcher.get(run_id)
        generation = 0 if watch is None else watch.chunk_generation
        shared = self._reads.get(run_id)
        if shared is not None and shared.after <= after and shared.generation >= generation:
            chunks = await closing.race(asyncio.shield(shared.result))
            wanted = [chunk for chunk in chunks if chunk.seq > after]
            full = len(chunks) >= self.batch
            if wanted or not full:
                # a full shared read may end before the table does: the caller reads on
                return ChunkPage(wanted, full=full)
        read = asyncio.ensure_future(self._read_table(run_id, after))
        self._in_flight.add(read)
        # retrieved even if every waiter was cancelled, so it is never "never retrieved"
        read.add_done_callback(self._finished)
        mine = _SharedRead(after, generation, read)
        self._reads[run_id] = mine
        try:
            chunks = await closing.race(asyncio.shield(read))
        finally:
            if self._reads.get(run_id) is mine:
                del self._reads[run_id]
        return ChunkPage(chunks, full=len(chunks) >= self.batch)

    async def subscribe(
        self, run_id: str, after_seq: int | None, *, buffer_limit: int
    ) -> StreamSubscription | None:
        """A subscription to the run's stream (see ``RunRegistry.subscribe_thread_run_stream``),
        or ``None`` if it has none: from now on without ``after_seq``, else after that seq."""
        # interest is registered (the watch) before the read, so nothing slips in between
        watch = self._dispatcher.watch(run_id)
        state = await self._lane.retry_once(
            lambda connection: repository.stream_state(connection, run_id)
        )
        if state is None or state.stream_seq is None:
            return None
        watch.apply(state.status, cancel_requested=state.cancel_requested)
        start = state.stream_seq if after_seq is None else after_seq
        return StreamSubscription(self.read, watch, after_seq=start, buffer_limit=buffer_limit)

    def close(self) -> None:
        """Cancel the reads in flight, so their connections go now (never blocks)."""
        for read in list(self._in_flight):
            read.cancel()
        self._tables.cancel()

    def _finished(self, read: asyncio.Future[list[StreamChunk]]) -> None:
        self._in_flight.discard(read)
        if not read.cancelled():
            read.exception()

    async def _read_table(self, run_id: str, after: int) -> list[StreamChunk]:
        return await self._tables.submit((run_id, after))

    async def _read_batch(self, positions: list[tuple[str, int]]) -> list[list[StreamChunk]]:
        if len(positions) == 1:
            [(run_id, after)] = positions
            return [
                await self._lane.retry_until_available(
                    lambda connection: repository.read_chunks(
                        connection, run_id, after=after, limit=self.batch
                    ),
                    max_delay=self._max_delay,
                )
            ]
        return await self._lane.retry_until_available(
            lambda connection: repository.read_chunk_batch(connection, positions, limit=self.batch),
            max_delay=self._max_delay,
        )


class StreamSubscription:
    """An async iterator of :class:`StreamChunk` for one run, ending when the run ends.

    It yields every chunk with ``seq`` greater than its starting point exactly once, in order,
    first from the table (replay), then live. It ends after the last chunk of a run that is
    completed, cancelled or superseded. Once the registry is closed, the next step raises
    :class:`RegistryClosedError` (a step parked waiting for chunks raises it at once); chunks
    read but not yet yielded are dropped, so resume elsewhere with ``after_seq`` set to the
    last seq you took.
    """

    def __init__(
        self, read: ChunkReader, watch: RunWatch, *, after_seq: int, buffer_limit: int
    ) -> None:
        self._read = read
        self._watch = watch
        self._next = after_seq + 1
        self._buffer_limit = buffer_limit
        self._ready: collections.deque[StreamChunk] = collections.deque()
        self._inline: collections.deque[StreamChunk] = collections.deque()
        # start by reading the table: that is the replay, and it covers anything published
        # between the subscription's creation and its first read
        self._stale = True
        self._wakeup = asyncio.Event()
        self._wakeup.set()
        self._closed = False
        watch.streams.add(self)

    @property
    def run_id(self) -> str:
        """The run whose stream this is."""
        return self._watch.run_id

    def position(self) -> int:
        """The seq of the last chunk taken in: yielded, read, or received inline."""
        return self._inline[-1].seq if self._inline else self._next - 1

    def wake(self) -> None:
        """Read the table at the next step (reconnects, re-checks, run end, registry close)."""
        self._stale = True
        self._wakeup.set()

    def offer(self, seq: int, data: bytes | None) -> None:
        """Take a chunk notification: keep an inline chunk if it is the next one, else re-read.

        Called from the listener's callback: it never blocks and never awaits.
        """
        expected = self._inline[-1].seq + 1 if self._inline else self._next
        if seq < expected:
            return
        if data is not None and seq == expected and len(self._inline) < self._buffer_limit:
            self._inline.append(StreamChunk(seq, data))
        else:
            self._stale = True  # a gap, a coalesced wake-up, or a full buffer: use the table
        self._wakeup.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamChunk:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._watch.closed:
                raise RegistryClosedError()
            if self._ready:
                return self._ready.popleft()
            while self._inline and self._inline[0].seq < self._next:
                self._inline.popleft()
            if not self._stale and self._inline and self._inline[0].seq == self._next:
                chunk = self._inline.popleft()
                self._next = chunk.seq + 1
                return chunk
            ended = self._watch.ended.is_set()  # before the read: chunks precede the end
            self._wakeup.clear()
            if self._stale or self._inline or ended:
                self._stale = False
                page = await self._read(self.run_id, self._next - 1)
                if page.chunks:
                    self._ready.extend(page.chunks)
                    self._next = page.chunks[-1].seq + 1
                    if page.full:
                        self._stale = True  # more may be stored behind a full page: read on
                    continue
                if ended:
                    await self.aclose()
                    raise StopAsyncIteration
                if self._inline:
                    # the inline chunks are ahead of a commit we cannot see yet: wait for it
                    self._stale = True
            await self._wakeup.wait()

    async def aclose(self) -> None:
        """Stop the subscription; iteration ends, even with chunks already read."""
        self._closed = True
        self._ready.clear()
        self._inline.clear()
        self._watch.streams.discard(self)
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
