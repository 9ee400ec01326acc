"""Stream subscriptions: ordered, gapless, resumable delivery of a run's output chunks.

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
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from registry.models import StreamChunk
from registry.watch import RunWatch

#: Reads the run's stored chunks with seq greater than the second argument, in order.
ChunkReader = Callable[[str, int], Awaitable[list[StreamChunk]]]


class StreamSubscription:
    """An async iterator of :class:`StreamChunk` for one run, ending when the run ends.

    It yields every chunk with ``seq`` greater than its starting point exactly once, in order,
    first from the table (replay), then live. It ends after the last chunk of a run that is
    completed, cancelled or superseded.
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
        """Read the table at the next step (reconnects, re-checks, run end)."""
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
            if self._ready:
                return self._ready.popleft()
            if self._closed:
                raise StopAsyncIteration
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
                chunks = await self._read(self.run_id, self._next - 1)
                if chunks:
                    self._ready.extend(chunks)
                    self._next = chunks[-1].seq + 1
                    continue
                if ended:
                    await self.aclose()
                    raise StopAsyncIteration
                if self._inline:
                    # the inline chunks are ahead of a commit we cannot see yet: wait for it
                    self._stale = True
            await self._wakeup.wait()

    async def aclose(self) -> None:
        """Stop the subscription; iteration ends."""
        self._closed = True
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
