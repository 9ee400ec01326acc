"""StreamSubscription over an in-memory chunk table: replay, inline chunks, fallbacks, ending."""

from __future__ import annotations

import asyncio

import pytest

from registry.errors import RegistryClosedError
from registry.models import StreamChunk
from registry.streams import ChunkPage, StreamSubscription
from registry.watch import RunWatch

RUN_ID = "run-1"


class FakeTable:
    """A run's stored chunks behind an async reader that returns at most ``batch`` of them.

    ``reads`` records the ``after`` of every read. With ``gate`` set, a read takes its snapshot
    first and then waits for the gate, like a query in flight while notifications arrive.
    """

    def __init__(self, *, batch: int = 100) -> None:
        self.batch = batch
        self.chunks: list[StreamChunk] = []
        self.reads: list[int] = []
        self.gate: asyncio.Event | None = None

    def publish(self, count: int) -> list[StreamChunk]:
        """Commit ``count`` new chunks (gapless seqs) and return them."""
        added: list[StreamChunk] = []
        for _ in range(count):
            seq = len(self.chunks) + len(added) + 1
            added.append(StreamChunk(seq, f"chunk-{seq}".encode()))
        self.chunks.extend(added)
        return added

    async def read(self, run_id: str, after: int) -> ChunkPage:
        assert run_id == RUN_ID
        self.reads.append(after)
        snapshot = [chunk for chunk in self.chunks if chunk.seq > after][: self.batch]
        if self.gate is not None:
            await self.gate.wait()
        return ChunkPage(snapshot, full=len(snapshot) >= self.batch)


def subscribe(
    table: FakeTable, watch: RunWatch, *, after_seq: int = 0, buffer_limit: int = 16
) -> StreamSubscription:
    return StreamSubscription(table.read, watch, after_seq=after_seq, buffer_limit=buffer_limit)


async def take(subscription: StreamSubscription, count: int) -> list[StreamChunk]:
    """The next ``count`` chunks, each within a second."""
    return [await asyncio.wait_for(anext(subscription), 1) for _ in range(count)]


async def assert_ends(subscription: StreamSubscription) -> None:
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(subscription), 1)


async def parked(subscription: StreamSubscription) -> asyncio.Task[StreamChunk]:
    """A task waiting for the next chunk, run until it blocks (the fake reader never blocks
    without a gate, so one pass of the loop gets it to its wait)."""
    task: asyncio.Task[StreamChunk] = asyncio.ensure_future(anext(subscription))
    await asyncio.sleep(0)
    if task.done():  # report what it did instead of waiting (and retrieve it)
        outcome = task.exception() or task.result()
        pytest.fail(f"the iterator did not wait for a chunk: {outcome!r}")
    return task


def seqs(chunks: list[StreamChunk]) -> list[int]:
    return [chunk.seq for chunk in chunks]


async def test_replay_yields_every_stored_chunk_once_in_order() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    stored = table.publish(5)
    subscription = subscribe(table, watch)
    assert await take(subscription, 5) == stored
    assert table.reads == [0]
    assert subscription.position() == 5
    watch.end()
    await assert_ends(subscription)  # nothing yielded twice
    assert table.reads == [0, 5]


async def test_replay_starts_after_after_seq() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    stored = table.publish(5)
    subscription = subscribe(table, watch, after_seq=3)
    assert subscription.position() == 3
    assert await take(subscription, 2) == stored[3:]
    assert table.reads == [3]
    watch.end()
    await assert_ends(subscription)


async def test_replay_of_an_empty_stream_waits_then_takes_live_chunks() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    subscription = subscribe(table, watch)
    task = await parked(subscription)
    assert table.reads == [0]
    [chunk] = table.publish(1)
    subscription.offer(1, chunk.data)
    assert await asyncio.wait_for(task, 1) == chunk
    assert table.reads == [0]


async def test_inline_next_chunk_is_yielded_without_a_read() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    table.publish(1)
    subscription = subscribe(table, watch)
    await take(subscription, 1)
    task = await parked(subscription)  # caught up: from here on, no read is needed
    reads = len(table.reads)

    # taken in while the iterator is parked
    [second] = table.publish(1)
    subscription.offer(second.seq, second.data)
    assert await asyncio.wait_for(task, 1) == second

    # and while nobody iterates
    [third] = table.publish(1)
    subscription.offer(third.seq, third.data)
    assert subscription.position() == 3
    assert await take(subscription, 1) == [third]

    assert len(table.reads) == reads


async def test_consecutive_inline_chunks_are_yielded_without_a_read() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    subscription = subscribe(table, watch)
    task = await parked(subscription)  # replayed the empty table, now waits
    reads = len(table.reads)
    published = table.publish(3)
    for chunk in published:
        subscription.offer(chunk.seq, chunk.data)
    assert subscription.position() == 3
    assert await asyncio.wait_for(task, 1) == published[0]
    assert await take(subscription, 2) == published[1:]
    assert len(table.reads) == reads


async def test_offer_without_data_reads_the_table() -> None:
    # a coalesced wake-up announces the newest seq without its bytes
    table, watch = FakeTable(), RunWatch(RUN_ID)
    subscription = subscribe(table, watch)
    task = await parked(subscription)
    published = table.publish(3)
    subscription.offer(3, None)
    assert await asyncio.wait_for(task, 1) == published[0]
    assert await take(subscription, 2) == published[1:]
    assert table.reads == [0, 0]


async def test_offer_with_a_gap_reads_the_table_in_order_without_duplicates() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    table.publish(2)
    subscription = subscribe(table, watch)
    await take(subscription, 2)
    reads = len(table.reads)

    third, fourth, fifth = table.publish(3)
    subscription.offer(third.seq, third.data)  # the next one: kept inline
    subscription.offer(fifth.seq, fifth.data)  # chunk 4's notification was lost: a gap

    assert await take(subscription, 3) == [third, fourth, fifth]
    assert table.reads[reads:] == [2]

    # caught up again: the leftover inline chunk 3 must not hold back the next inline one
    task = await parked(subscription)
    assert subscription.position() == 5
    reads = len(table.reads)
    [sixth] = table.publish(1)
    subscription.offer(sixth.seq, sixth.data)
    assert await asyncio.wait_for(task, 1) == sixth
    assert len(table.reads) == reads

    watch.end()
    await assert_ends(subscription)  # chunk 3 was not yielded a second time from inline


async def test_offer_of_an_old_seq_is_ignored() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    table.publish(3)
    subscription = subscribe(table, watch)
    await take(subscription, 3)
    task = await parked(subscription)
    reads = len(table.reads)

    subscription.offer(2, b"stale")
    subscription.offer(3, None)
    await asyncio.sleep(0)  # had the offers woken it, the task would read now
    assert not task.done()
    assert subscription.position() == 3
    assert len(table.reads) == reads

    # an ignored offer neither marks the table stale nor fills the inline buffer
    [fourth] = table.publish(1)
    subscription.offer(fourth.seq, fourth.data)
    assert await asyncio.wait_for(task, 1) == fourth
    assert len(table.reads) == reads
    watch.end()
    await assert_ends(subscription)


async def test_full_inline_buffer_falls_back_to_the_table_without_loss() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    table.publish(1)
    subscription = subscribe(table, watch, buffer_limit=2)
    await take(subscription, 1)
    reads = len(table.reads)

    published = table.publish(4)
    for chunk in published:  # chunks 2 and 3 fill the buffer; 4 and 5 do not fit
        subscription.offer(chunk.seq, chunk.data)

    assert await take(subscription, 4) == published
    assert len(table.reads) > reads
    watch.end()
    await assert_ends(subscription)


async def test_overflow_by_one_is_not_lost() -> None:
    # only the chunk past the buffer is announced out of line: no gap to hide the overflow
    table, watch = FakeTable(), RunWatch(RUN_ID)
    table.publish(1)
    subscription = subscribe(table, watch, buffer_limit=2)
    await take(subscription, 1)
    published = table.publish(3)
    for chunk in published:
        subscription.offer(chunk.seq, chunk.data)
    assert await take(subscription, 3) == published


async def test_offers_during_a_read_are_neither_lost_nor_duplicated() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    stored = table.publish(3)
    table.gate = asyncio.Event()
    subscription = subscribe(table, watch)
    first = asyncio.ensure_future(anext(subscription))
    await asyncio.sleep(0)
    assert table.reads == [0]  # the replay read is in flight with a snapshot of 1..3

    subscription.offer(1, stored[0].data)  # a late notification of a replayed chunk
    [fourth] = table.publish(1)
    subscription.offer(4, fourth.data)  # committed after the read's snapshot
    table.gate.set()

    assert await asyncio.wait_for(first, 1) == stored[0]
    assert await take(subscription, 3) == [*stored[1:], fourth]
    watch.end()
    await assert_ends(subscription)


async def test_end_stops_only_after_the_remaining_stored_chunks() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    table.publish(2)
    subscription = subscribe(table, watch)
    await take(subscription, 2)

    last = table.publish(2)  # committed, but their notification was lost
    watch.end()
    assert await take(subscription, 2) == last
    await assert_ends(subscription)
    assert subscription not in watch.streams
    await assert_ends(subscription)  # and it stays ended


async def test_end_wakes_a_parked_subscriber_to_drain_and_stop() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    subscription = subscribe(table, watch)
    task = await parked(subscription)
    [last] = table.publish(1)
    watch.end()
    assert await asyncio.wait_for(task, 1) == last
    await assert_ends(subscription)


async def test_subscription_to_an_ended_run_replays_then_stops() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    stored = table.publish(3)
    watch.end()
    subscription = subscribe(table, watch)
    assert await take(subscription, 3) == stored
    await assert_ends(subscription)


async def test_aclose_ends_a_parked_iteration() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    table.publish(1)
    subscription = subscribe(table, watch)
    await take(subscription, 1)
    task = await parked(subscription)
    reads = len(table.reads)

    await subscription.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(task, 1)
    assert subscription not in watch.streams

    # nothing more comes, not even chunks in the table or offered inline
    [second] = table.publish(1)
    subscription.offer(second.seq, second.data)
    await assert_ends(subscription)
    assert len(table.reads) == reads


async def test_context_exit_closes_the_subscription() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    async with subscribe(table, watch) as subscription:
        assert subscription.run_id == RUN_ID
        assert subscription in watch.streams
    assert subscription not in watch.streams
    await assert_ends(subscription)
    assert table.reads == []


async def test_replay_longer_than_one_read_batch_reads_on() -> None:
    table, watch = FakeTable(batch=10), RunWatch(RUN_ID)
    stored = table.publish(25)
    subscription = subscribe(table, watch)

    async def take_all() -> list[StreamChunk]:
        return [await anext(subscription) for _ in range(len(stored))]

    # no offer, no wake-up, no end: the reader must page through the table by itself
    assert await asyncio.wait_for(take_all(), 1) == stored
    assert table.reads == [0, 10, 20]


async def test_registry_close_ends_a_parked_subscriber_at_once() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    table.publish(1)
    subscription = subscribe(table, watch)
    await take(subscription, 1)
    task = await parked(subscription)
    reads = len(table.reads)
    watch.close()
    with pytest.raises(RegistryClosedError):
        await asyncio.wait_for(task, 1)
    # and every later step, even with chunks stored or offered: they cannot be trusted now
    [second] = table.publish(1)
    subscription.offer(second.seq, second.data)
    with pytest.raises(RegistryClosedError):
        await asyncio.wait_for(anext(subscription), 1)
    assert len(table.reads) == reads


async def test_registry_close_drops_chunks_already_read() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    table.publish(3)
    subscription = subscribe(table, watch)
    await take(subscription, 1)  # chunks 2 and 3 are read, not yet yielded
    watch.close()
    with pytest.raises(RegistryClosedError):
        await asyncio.wait_for(anext(subscription), 1)


async def test_an_ended_subscription_stays_ended_after_registry_close() -> None:
    table, watch = FakeTable(), RunWatch(RUN_ID)
    watch.end()
    subscription = subscribe(table, watch)
    await assert_ends(subscription)
    watch.close()
    await assert_ends(subscription)


async def test_aclose_drops_chunks_already_read() -> None:
    stored = [StreamChunk(seq, b"x") for seq in (1, 2, 3)]

    async def read(_run_id: str, after: int) -> ChunkPage:
        return ChunkPage([chunk for chunk in stored if chunk.seq > after], full=False)

    subscription = StreamSubscription(read, RunWatch("run-1"), after_seq=0, buffer_limit=8)
    assert (await anext(subscription)).seq == 1
    await subscription.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(subscription)
