"""Streams: durable, ordered, resumable fan-out of a run's output across subscribers."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from registry import (
    InvalidInputError,
    RegistrySettings,
    RunRegistry,
    StreamChunk,
    StreamClosedError,
    StreamSubscription,
    inspection,
    repository,
)
from registry.database import DriverConnection, asyncpg_dsn
from registry.listener import LISTENER_APPLICATION_NAME
from tests.helpers.database import session_pids


async def _take(subscription: StreamSubscription, count: int, timeout: float = 10) -> list[int]:
    seqs: list[int] = []
    async with asyncio.timeout(timeout):
        for _ in range(count):
            seqs.append((await anext(subscription)).seq)
    return seqs


async def _drain(subscription: StreamSubscription, timeout: float = 10) -> list[StreamChunk]:
    async with asyncio.timeout(timeout):
        return [chunk async for chunk in subscription]


async def test_stream_fanout_bind_and_subscribe(run_registry: RunRegistry) -> None:
    # the seed's fifth test
    await run_registry.register("run-1", "agent-a", "thread-1")
    handle = await run_registry.handle_by_run_id("run-1")
    assert handle is not None
    assert await run_registry.bind_thread_run_stream_fanout("run-1")
    subscription = await run_registry.subscribe_thread_run_stream("run-1")
    assert subscription is not None
    assert await handle.publish(b"chunk") == 1
    got = await asyncio.wait_for(anext(subscription), 5)
    assert got == StreamChunk(1, b"chunk")


async def test_bind_and_subscribe_report_missing_streams(run_registry: RunRegistry) -> None:
    assert not await run_registry.bind_thread_run_stream_fanout("nope")
    assert await run_registry.subscribe_thread_run_stream("nope") is None
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    assert await run_registry.subscribe_thread_run_stream("run-1") is None, "not bound yet"
    with pytest.raises(StreamClosedError):
        await handle.publish(b"too early")
    assert await handle.bind_stream_fanout()
    assert await handle.bind_stream_fanout(), "binding twice is harmless"
    await handle.remove()
    assert not await run_registry.bind_thread_run_stream_fanout("run-1")
    with pytest.raises(StreamClosedError):
        await handle.publish(b"too late")


async def test_sequence_numbers_are_gapless(run_registry: RunRegistry) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await handle.bind_stream_fanout()
    assert await handle.publish(b"a") == 1
    assert await handle.publish_many([b"b", b"c", b"d"]) == [2, 3, 4]
    assert await handle.publish_many([]) == []
    assert await handle.publish(b"e") == 5


async def test_replay_then_live_without_gap_or_duplicate(run_registry: RunRegistry) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await handle.bind_stream_fanout()
    await handle.publish_many([f"early-{i}".encode() for i in range(5)])
    from_start = await run_registry.subscribe_thread_run_stream("run-1", after_seq=0)
    from_three = await run_registry.subscribe_thread_run_stream("run-1", after_seq=3)
    live_only = await run_registry.subscribe_thread_run_stream("run-1")
    assert from_start is not None
    assert from_three is not None
    assert live_only is not None

    publisher = asyncio.create_task(handle.publish_many([f"late-{i}".encode() for i in range(5)]))
    assert await _take(from_start, 10) == list(range(1, 11))
    assert await _take(from_three, 7) == list(range(4, 11))
    assert await _take(live_only, 5) == list(range(6, 11))
    await publisher
    await handle.remove()
    for subscription in (from_start, from_three, live_only):
        assert await _drain(subscription) == [], "nothing after the end"


async def test_subscription_ends_after_the_last_chunk(run_registry: RunRegistry) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await handle.bind_stream_fanout()
    subscription = await run_registry.subscribe_thread_run_stream("run-1", after_seq=0)
    assert subscription is not None
    await handle.publish_many([b"1", b"2", b"3"])
    await handle.remove()
    chunks = await _drain(subscription)
    assert [chunk.data for chunk in chunks] == [b"1", b"2", b"3"]


async def test_superseded_runs_stream_ends(run_registry: RunRegistry) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await handle.bind_stream_fanout()
    subscription = await run_registry.subscribe_thread_run_stream("run-1", after_seq=0)
    assert subscription is not None
    await handle.publish(b"only")
    await run_registry.register("run-2", "agent-a", "thread-1")
    assert [chunk.data for chunk in await _drain(subscription)] == [b"only"]


async def test_finished_runs_stream_can_be_replayed(run_registry: RunRegistry) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await handle.bind_stream_fanout()
    await handle.publish_many([b"x", b"y"])
    await handle.remove()
    replay = await run_registry.subscribe_thread_run_stream("run-1", after_seq=0)
    assert replay is not None
    assert [chunk.data for chunk in await _drain(replay)] == [b"x", b"y"]


async def test_large_and_binary_chunks_round_trip(registry_database_url: str) -> None:
    settings = RegistrySettings(max_chunk_bytes=200_000, inline_chunk_bytes=100)
    async with await RunRegistry.connect(registry_database_url, settings=settings) as registry:
        handle = await registry.register("run-1", "agent-a", "thread-1")
        await handle.bind_stream_fanout()
        subscription = await registry.subscribe_thread_run_stream("run-1")
        assert subscription is not None
        small, binary, large = b"\x00\xff\x01", bytes(range(256)), b"L" * 150_000
        for chunk in (small, binary, large):
            await handle.publish(chunk)
        got = [await asyncio.wait_for(anext(subscription), 5) for _ in range(3)]
        assert [chunk.data for chunk in got] == [small, binary, large]
        with pytest.raises(InvalidInputError, match="limit is 200000") as caught:
            await handle.publish_many([b"ok", b"x" * 200_001])
        assert caught.value.field == "chunks[1]"
        with pytest.raises(InvalidInputError) as not_bytes:
            await handle.publish("text")  # type: ignore[arg-type]
        assert not_bytes.value.field == "chunks[0]"
        assert await handle.publish(b"next") == 4, "a refused batch wrote nothing"


async def test_concurrent_publishers_keep_seq_gapless(registry_database_url: str) -> None:
    async with (
        await RunRegistry.connect(registry_database_url) as first,
        await RunRegistry.connect(registry_database_url) as second,
    ):
        handle = await first.register("run-1", "agent-a", "thread-1")
        await handle.bind_stream_fanout()
        other = await second.handle_by_run_id("run-1")
        assert other is not None
        subscription = await second.subscribe_thread_run_stream("run-1", after_seq=0)
        assert subscription is not None

        async def publish(publisher_handle: object, name: str) -> list[int]:
            assert hasattr(publisher_handle, "publish")
            return [await publisher_handle.publish(f"{name}-{i}".encode()) for i in range(40)]

        results = await asyncio.gather(
            *(publish(handle if n % 2 else other, f"p{n}") for n in range(6))
        )
        seqs = sorted(seq for result in results for seq in result)
        assert seqs == list(range(1, 241))
        received = await _take(subscription, 240)
        assert received == list(range(1, 241))


async def test_slow_subscriber_catches_up_from_the_table(registry_database_url: str) -> None:
    settings = RegistrySettings(subscriber_buffer=4, stream_notify_window=0)
    async with await RunRegistry.connect(registry_database_url, settings=settings) as registry:
        handle = await registry.register("run-1", "agent-a", "thread-1")
        await handle.bind_stream_fanout()
        slow = await registry.subscribe_thread_run_stream("run-1")
        fast = await registry.subscribe_thread_run_stream("run-1")
        assert slow is not None
        assert fast is not None
        fast_seqs: list[int] = []

        async def read_fast() -> None:
            fast_seqs.extend(await _take(fast, 100))

        reader = asyncio.create_task(read_fast())
        for i in range(100):
            await handle.publish(f"c{i}".encode())  # one notification each, inline
        await asyncio.wait_for(reader, 10)
        assert fast_seqs == list(range(1, 101))
        # the slow one read nothing meanwhile: its 4-chunk buffer overflowed long ago
        chunks = [await asyncio.wait_for(anext(slow), 5) for _ in range(100)]
        assert [chunk.data for chunk in chunks] == [f"c{i}".encode() for i in range(100)]


async def test_thousand_subscribers_share_one_listener(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await handle.bind_stream_fanout()
    subscriptions = []
    for _ in range(1000):
        subscription = await run_registry.subscribe_thread_run_stream("run-1")
        assert subscription is not None
        subscriptions.append(subscription)
    await handle.publish_many([b"a", b"b"])
    await handle.publish(b"c")
    results = await asyncio.wait_for(
        asyncio.gather(*(_take(subscription, 3) for subscription in subscriptions)), 30
    )
    assert all(seqs == [1, 2, 3] for seqs in results)
    assert len(await session_pids(registry_database_url, LISTENER_APPLICATION_NAME)) == 1


async def test_prune_deletes_only_ended_streams(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    ended = await run_registry.register("run-old", "agent-a", "thread-1")
    await ended.bind_stream_fanout()
    await ended.publish_many([b"1", b"2"])
    await run_registry.forward_decisions_by_run_id(
        "run-old", [{"target_id": "t", "action": "resume", "updated_at": 1}]
    )
    await ended.remove()
    active = await run_registry.register("run-live", "agent-a", "thread-2")
    await active.bind_stream_fanout()
    await active.publish(b"keep")

    assert await run_registry.prune(older_than=timedelta(hours=1)) == 0, "ended too recently"
    assert await run_registry.prune(older_than=timedelta(0)) == 2
    assert await run_registry.subscribe_thread_run_stream("run-old", after_seq=0) is None
    live = await run_registry.subscribe_thread_run_stream("run-live", after_seq=0)
    assert live is not None
    assert (await asyncio.wait_for(anext(live), 5)).data == b"keep"
    connection = await asyncpg.connect(asyncpg_dsn(registry_database_url))
    try:
        assert await connection.fetchval("SELECT count(*) FROM registry.decisions") == 1
    finally:
        await connection.close()
    with pytest.raises(InvalidInputError):
        await run_registry.prune(older_than=timedelta(seconds=-1))


async def test_prune_works_through_a_backlog_in_batches(
    run_registry: RunRegistry, registry_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inspection, "PRUNE_BATCH_RUNS", 4)
    for index in range(10):
        handle = await run_registry.register(f"run-{index}", "agent-a", f"thread-{index}")
        await handle.bind_stream_fanout()
        await handle.publish_many([b"a", b"b", b"c"])
        await handle.remove()
    live = await run_registry.register("run-live", "agent-a", "thread-live")
    await live.bind_stream_fanout()
    await live.publish(b"keep")
    batches: list[int] = []
    prune_streams = repository.prune_streams

    async def counted(
        connection: DriverConnection, older_than: timedelta, limit: int
    ) -> repository.Pruned:
        pruned = await prune_streams(connection, older_than, limit)
        batches.append(pruned.runs)
        return pruned

    monkeypatch.setattr(repository, "prune_streams", counted)
    assert await run_registry.prune(older_than=timedelta(0)) == 30
    assert batches == [4, 4, 2], "three transactions; the short one was the last"
    connection = await asyncpg.connect(asyncpg_dsn(registry_database_url))
    try:
        left = await connection.fetch("SELECT run_id FROM registry.stream_chunks")
    finally:
        await connection.close()
    assert [row["run_id"] for row in left] == ["run-live"]
    assert await run_registry.prune(older_than=timedelta(0)) == 0


async def test_chunks_missed_while_listener_was_down_are_replayed(
    registry_database_url: str,
) -> None:
    settings = RegistrySettings(safety_interval=60, health_interval=0.5)
    async with await RunRegistry.connect(registry_database_url, settings=settings) as registry:
        handle = await registry.register("run-1", "agent-a", "thread-1")
        await handle.bind_stream_fanout()
        subscription = await registry.subscribe_thread_run_stream("run-1")
        assert subscription is not None
        await handle.publish(b"before")
        assert (await asyncio.wait_for(anext(subscription), 5)).data == b"before"
        waiting = asyncio.create_task(_take(subscription, 3, timeout=15))
        connection = await asyncpg.connect(asyncpg_dsn(registry_database_url))
        try:
            # chunks whose notification is never sent, as if published while it was down
            await connection.execute(
                "WITH a AS (UPDATE registry.runs SET stream_seq = stream_seq + 3 WHERE run_id = $1"
                " RETURNING stream_seq) INSERT INTO registry.stream_chunks (run_id, seq, data)"
                " SELECT $1, a.stream_seq - 3 + g, 'x'::bytea FROM a, generate_series(1, 3) g",
                "run-1",
            )
            listener = registry.listener
            assert listener is not None
            await connection.execute("SELECT pg_terminate_backend($1)", listener.backend_pid)
        finally:
            await connection.close()
        assert await waiting == [2, 3, 4]
        await handle.publish(b"after")
        assert (await asyncio.wait_for(anext(subscription), 5)).seq == 5
