"""Group commit of chunk appends: concurrent publishes to many runs share one statement and
one wake-up, and each keeps its own answer (seqs, fencing, refusal) as if it went alone; the
reads of subscribers woken together share one round trip; acks of many inboxes one statement."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import asyncpg
import pytest

from registry import (
    DatabaseError,
    LeaseLostError,
    RegistrySettings,
    RunHandle,
    RunRegistry,
    StreamChunk,
    StreamClosedError,
    StreamConflictError,
    StreamSubscription,
    ToolCallDecision,
    repository,
)
from registry.database import DriverConnection, asyncpg_dsn
from registry.notifications import CHANNEL, MAC_LENGTH

# one statement in flight: whatever arrives meanwhile waits and goes together
SERIAL = RegistrySettings(pool_size=2, stream_notify_window=0)


@asynccontextmanager
async def wake_ups(url: str) -> AsyncIterator[list[dict[str, object]]]:
    """The chunk wake-ups sent on the registry's channel while the block runs, as JSON."""
    seen: list[dict[str, object]] = []
    connection = await asyncpg.connect(asyncpg_dsn(url))

    def received(_c: object, _pid: int, _channel: str, payload: object) -> None:
        body = json.loads(str(payload)[MAC_LENGTH:])
        if body["kind"] in ("chunk", "chunks"):
            seen.append(body)

    await connection.add_listener(CHANNEL, received)
    try:
        yield seen
    finally:
        await connection.close()


@asynccontextmanager
async def plain_sql(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection, as an operator would use one."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        yield connection
    finally:
        await connection.close()


@asynccontextmanager
async def both_ends(
    url: str,
) -> AsyncIterator[tuple[RunRegistry, RunRegistry, list[dict[str, object]]]]:
    """A publishing registry (one statement in flight), a reading one, and the wake-ups."""
    async with (
        await RunRegistry.connect(url, settings=SERIAL) as publisher,
        await RunRegistry.connect(url) as reader,
        wake_ups(url) as seen,
    ):
        yield publisher, reader, seen


def batched(seen: list[dict[str, object]]) -> list[list[str]]:
    """The run ids listed by each ``chunks`` wake-up."""
    return [[entry[0] for entry in body["runs"]] for body in seen if body["kind"] == "chunks"]  # type: ignore[attr-defined]


def riding(seen: list[dict[str, object]]) -> int:
    """How many entries of the ``chunks`` wake-ups carried their chunk inline (sealed)."""
    return sum(
        len(entry) == 3
        for body in seen
        if body["kind"] == "chunks"
        for entry in body["runs"]  # type: ignore[attr-defined]
    )


async def subscribed(reader: RunRegistry, handles: list[RunHandle]) -> list[StreamSubscription]:
    """A subscription from the start to each run's stream."""
    subscriptions = []
    for handle in handles:
        subscription = await reader.subscribe_thread_run_stream(handle.run_id, after_seq=0)
        assert subscription is not None
        subscriptions.append(subscription)
    return subscriptions


async def bound(registry: RunRegistry, count: int, prefix: str = "run") -> list[RunHandle]:
    handles = []
    for index in range(count):
        handle = await registry.register(f"{prefix}-{index}", "agent-a", f"thread-{index}")
        assert await handle.bind_stream_fanout()
        handles.append(handle)
    return handles


async def test_many_runs_publishing_at_once_share_statements_and_lose_nothing(
    registry_database_url: str,
) -> None:
    async with both_ends(registry_database_url) as (publisher, reader, seen):
        handles = await bound(publisher, 40)
        subscriptions = await subscribed(reader, handles)

        async def stream(handle: RunHandle) -> list[int]:
            return [await handle.publish(f"{handle.run_id}/{n}".encode()) for n in range(15)]

        results = await asyncio.gather(*(stream(handle) for handle in handles))
        assert results == [list(range(1, 16))] * 40, "each run's seqs gapless, in call order"
        for handle, subscription in zip(handles, subscriptions, strict=True):
            async with asyncio.timeout(10):
                got = [await anext(subscription) for _ in range(15)]
            assert [chunk.data for chunk in got] == [
                f"{handle.run_id}/{n}".encode() for n in range(15)
            ]
        # the point of it: statements carried several runs, announced by one wake-up each,
        # their small chunks inside it
        assert max(len(runs) for runs in batched(seen)) > 1
        assert riding(seen) > 0
        assert all(len(runs) == len(set(runs)) for runs in batched(seen)), "one append per run"


async def test_concurrent_publishes_to_one_run_are_stored_in_call_order(
    run_registry: RunRegistry,
) -> None:
    [handle] = await bound(run_registry, 1)
    seqs = await asyncio.gather(*(handle.publish(bytes([n])) for n in range(60)))
    assert seqs == list(range(1, 61))
    subscription = await run_registry.subscribe_thread_run_stream(handle.run_id, after_seq=0)
    assert subscription is not None
    async with asyncio.timeout(10):
        got = [await anext(subscription) for _ in range(60)]
    assert [chunk.data for chunk in got] == [bytes([n]) for n in range(60)]


async def test_each_append_in_a_batch_is_checked_and_refused_on_its_own(
    registry_database_url: str,
) -> None:
    async with (
        await RunRegistry.connect(registry_database_url, settings=SERIAL) as publisher,
        await RunRegistry.connect(registry_database_url, worker_id="other") as other,
        wake_ups(registry_database_url) as seen,
    ):
        lead, ok_1, ended, conflicted, fenced, ok_2 = await bound(publisher, 6)
        assert await lead.publish(b"x") == 1
        assert await conflicted.publish(b"x") == 1
        # behind the publisher's back: one run ends, another is taken over
        assert await other.remove_by_run_id(ended.run_id)
        async with plain_sql(registry_database_url) as sql:
            await sql.execute(
                "UPDATE registry.runs SET owner_epoch = owner_epoch + 1 WHERE run_id = $1",
                fenced.run_id,
            )
        # the first goes alone (nothing in flight); the rest wait for it and go together
        results = await asyncio.gather(
            lead.publish(b"lead"),
            ok_1.publish(b"a"),
            ended.publish(b"b"),
            conflicted.publish(b"c", after_seq=0),
            fenced.publish(b"d"),
            ok_2.publish(b"e"),
            return_exceptions=True,
        )
        assert results[0] == 2
        assert results[1] == 1
        assert isinstance(results[2], StreamClosedError)
        assert isinstance(results[3], StreamConflictError)
        assert isinstance(results[4], LeaseLostError)
        assert results[5] == 1
        assert [ok_1.run_id, ok_2.run_id] in batched(seen), "refused appends are not announced"
        async with plain_sql(registry_database_url) as sql:
            stored = await sql.fetch(
                "SELECT run_id, seq, data FROM registry.stream_chunks ORDER BY 1, 2"
            )
        assert {(row["run_id"], row["seq"], row["data"]) for row in stored} == {
            (lead.run_id, 1, b"x"),
            (lead.run_id, 2, b"lead"),
            (ok_1.run_id, 1, b"a"),
            (conflicted.run_id, 1, b"x"),
            (ok_2.run_id, 1, b"e"),
        }


async def test_a_statement_the_server_refuses_fails_only_the_append_that_caused_it(
    registry_database_url: str,
) -> None:
    async with plain_sql(registry_database_url) as sql:
        await sql.execute(
            """
            CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.data = 'poison'::bytea THEN
                    RAISE EXCEPTION 'poisoned chunk' USING ERRCODE = 'P0001';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_poison BEFORE INSERT ON registry.stream_chunks
               FOR EACH ROW EXECUTE FUNCTION refuse_poison();
            """
        )
    async with await RunRegistry.connect(registry_database_url, settings=SERIAL) as publisher:
        lead, first, poisoned, last = await bound(publisher, 4)
        results = await asyncio.gather(
            lead.publish(b"lead"),
            first.publish(b"a"),
            poisoned.publish(b"poison"),
            last.publish(b"c"),
            return_exceptions=True,
        )
        assert results[0] == 1
        assert results[1] == 1
        assert isinstance(results[2], DatabaseError)
        assert results[2].sqlstate == "P0001"
        assert results[3] == 1
        assert await poisoned.publish(b"fine") == 1, "the refused append wrote nothing"


async def test_a_batch_of_long_run_ids_is_announced_in_payloads_under_the_limit(
    registry_database_url: str,
) -> None:
    async with both_ends(registry_database_url) as (publisher, reader, seen):
        handles = []
        for index in range(61):
            run_id = f"{index:03d}-" + "ü" * 251  # 255 characters, 506 bytes
            handle = await publisher.register(run_id, "agent-a", f"thread-{index}")
            assert await handle.bind_stream_fanout()
            handles.append(handle)
        subscriptions = await subscribed(reader, handles)
        assert await asyncio.gather(*(handle.publish(b"one") for handle in handles)) == [1] * 61
        for subscription in subscriptions:
            async with asyncio.timeout(10):
                assert (await anext(subscription)).data == b"one"
        groups = batched(seen)
        assert sum(len(runs) for runs in groups) == 60, "all but the first, which went alone"
        assert len(groups) >= 4, "split across several payloads"


@pytest.mark.parametrize("concurrency", [1, 5])
async def test_closing_sends_every_accepted_publish(
    registry_database_url: str, concurrency: int
) -> None:
    settings = RegistrySettings(pool_size=2 * concurrency)
    registry = await RunRegistry.connect(registry_database_url, settings=settings)
    handles = await bound(registry, 30)
    publishes = [asyncio.ensure_future(handle.publish(b"last words")) for handle in handles]
    await asyncio.sleep(0)  # every publish is queued or in flight
    await registry.close()
    assert [await publish for publish in publishes] == [1] * 30
    async with plain_sql(registry_database_url) as sql:
        assert await sql.fetchval("SELECT count(*) FROM registry.stream_chunks") == 30


async def test_one_round_trip_reads_many_runs_each_from_its_own_position(
    registry_database_url: str,
) -> None:
    async with both_ends(registry_database_url) as (publisher, _reader, _seen):
        first, second = await bound(publisher, 2)
        await first.publish_many([b"a1", b"a2", b"a3"])
        await second.publish_many([b"b1", b"b2"])
    async with plain_sql(registry_database_url) as sql:
        pages = await repository.read_chunk_batch(
            sql,
            [(first.run_id, 0), (second.run_id, 1), (first.run_id, 2), ("nobody", 0)],
            limit=2,
        )
    assert pages == [
        [StreamChunk(1, b"a1"), StreamChunk(2, b"a2")],
        [StreamChunk(2, b"b2")],
        [StreamChunk(3, b"a3")],
        [],
    ]


async def test_subscribers_woken_together_read_together(
    registry_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    read_chunk_batch = repository.read_chunk_batch

    async def counted(
        connection: DriverConnection, positions: Sequence[tuple[str, int]], *, limit: int
    ) -> list[list[StreamChunk]]:
        batches.append(len(positions))
        return await read_chunk_batch(connection, positions, limit=limit)

    monkeypatch.setattr(repository, "read_chunk_batch", counted)
    async with (
        await RunRegistry.connect(registry_database_url) as publisher,
        await RunRegistry.connect(registry_database_url, settings=SERIAL) as reader,
    ):
        handles = await bound(publisher, 30)
        subscriptions = await subscribed(reader, handles)
        for handle in handles:
            await handle.publish_many([b"one", b"two"])

        async def first_two(subscription: StreamSubscription) -> list[bytes]:
            return [(await anext(subscription)).data for _ in range(2)]

        async with asyncio.timeout(10):
            got = await asyncio.gather(*(first_two(s) for s in subscriptions))
    assert got == [[b"one", b"two"]] * 30
    assert batches, "the reads went together"
    assert max(batches) > 1


async def test_acks_of_many_inboxes_share_a_statement_and_keep_their_answers(
    registry_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    ack_decisions = repository.ack_decisions

    async def counted(
        connection: DriverConnection, acks: Sequence[repository.Ack]
    ) -> list[bool | None]:
        batches.append(len(acks))
        return await ack_decisions(connection, acks)

    monkeypatch.setattr(repository, "ack_decisions", counted)
    async with await RunRegistry.connect(registry_database_url, settings=SERIAL) as consumer:
        handles = await bound(consumer, 6)
        for handle in handles:
            decision = ToolCallDecision.resume(f"call-{handle.run_id}", {"ok": True}, updated_at=1)
            await consumer.forward_decisions_by_run_id(handle.run_id, [decision])
        inboxes = [handle.decisions() for handle in handles]
        async with asyncio.timeout(10):
            deliveries = [await anext(inbox) for inbox in inboxes]
        fenced = handles[-1]
        async with plain_sql(registry_database_url) as sql:
            await sql.execute(
                "UPDATE registry.runs SET owner_epoch = owner_epoch + 1 WHERE run_id = $1",
                fenced.run_id,
            )
        results = await asyncio.gather(
            *(inbox.ack(delivery) for inbox, delivery in zip(inboxes, deliveries, strict=True)),
            inboxes[0].ack(deliveries[0]),  # the same delivery once more
            return_exceptions=True,
        )
        assert results[:5] == [True] * 5
        assert isinstance(results[5], LeaseLostError)
        assert results[6] is False, "acknowledged once, by the first"
        assert max(batches) > 1
        async with plain_sql(registry_database_url) as sql:
            statuses = await sql.fetch(
                "SELECT run_id, status FROM registry.decisions ORDER BY run_id"
            )
        assert [row["status"] for row in statuses] == ["acked"] * 5 + ["delivered"]


def resume(target_id: str, decision_id: str = "") -> ToolCallDecision:
    return ToolCallDecision.resume(target_id, {"ok": True}, updated_at=1, decision_id=decision_id)


def three(run_id: str) -> list[ToolCallDecision]:
    return [resume(f"{run_id}-{n}") for n in "xyz"]


async def test_forwards_to_many_runs_share_a_statement_and_keep_their_answers(
    registry_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    forward_batch = repository.forward_batch

    async def counted(
        connection: DriverConnection, forwards: Sequence[repository.Forward], key: object
    ) -> list[repository.ForwardResult | None]:
        sizes.append(len(forwards))
        return await forward_batch(connection, forwards, key)  # type: ignore[arg-type]

    monkeypatch.setattr(repository, "forward_batch", counted)
    async with await RunRegistry.connect(registry_database_url, settings=SERIAL) as runs:
        handles = await bound(runs, 4)
        ended = handles[-1]
        assert await runs.remove_by_run_id(ended.run_id)
        lead = runs.forward_decisions_by_run_id(handles[0].run_id, [resume("lead")])
        results = await asyncio.gather(
            lead,
            *(
                runs.forward_decisions_by_run_id(
                    h.run_id, [resume(f"{h.run_id}-{n}") for n in "xyz"]
                )
                for h in handles[1:]
            ),
            runs.forward_decisions_by_thread("agent-a", "thread-0", [resume("by-thread")]),
            runs.forward_decisions_by_thread("agent-b", "thread-1", [resume("not-yours")]),
            runs.forward_decisions_by_thread("agent-a", "thread-2", [resume("by-thread-2")]),
        )
        assert [None if r is None else r.run_id for r in results] == [
            "run-0",
            "run-1",
            "run-2",
            None,
            "run-0",
            None,
            "run-2",
        ]
        assert max(sizes) > 1
        for handle, expected in [
            (handles[0], ["lead", "by-thread"]),
            (handles[1], ["run-1-x", "run-1-y", "run-1-z"]),
            (handles[2], ["run-2-x", "run-2-y", "run-2-z", "by-thread-2"]),
        ]:
            inbox = handle.decisions()
            async with asyncio.timeout(10):
                got = [(await anext(inbox)).decision.target_id for _ in expected]
            # all delivered; each forward's own in order (by run id and by thread go in
            # statements of their own, whose commits may come in either order)
            assert sorted(got) == sorted(expected)
            ours = [target for target in got if target.startswith(handle.run_id)]
            assert ours == [target for target in expected if target.startswith(handle.run_id)]
        async with plain_sql(registry_database_url) as sql:
            assert await sql.fetchval("SELECT count(*) FROM registry.decisions") == 9


async def test_a_retried_forward_in_a_batch_stores_its_decisions_once(
    run_registry: RunRegistry,
) -> None:
    handles = await bound(run_registry, 3)
    calls = [
        run_registry.forward_decisions_by_run_id(h.run_id, [resume("t", decision_id="once")])
        for h in handles
        for _attempt in range(2)
    ]
    assert all(result is not None for result in await asyncio.gather(*calls))
    for handle in handles:
        inbox = handle.decisions()
        async with asyncio.timeout(10):
            delivery = await anext(inbox)
        assert delivery.decision.decision_id == "once"
        assert await inbox.ack(delivery)
    decisions = await run_registry.decisions_of_run(handles[0].run_id)
    assert len(decisions) == 1


async def test_small_chunks_ride_inside_the_batch_wake_up_and_need_no_read(
    registry_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    read_chunks, read_chunk_batch = repository.read_chunks, repository.read_chunk_batch

    async def one(
        connection: DriverConnection, run_id: str, *, after: int, limit: int
    ) -> list[StreamChunk]:
        reads.append(run_id)
        return await read_chunks(connection, run_id, after=after, limit=limit)

    async def many(
        connection: DriverConnection, positions: Sequence[tuple[str, int]], *, limit: int
    ) -> list[list[StreamChunk]]:
        reads.extend(run_id for run_id, _after in positions)
        return await read_chunk_batch(connection, positions, limit=limit)

    monkeypatch.setattr(repository, "read_chunks", one)
    monkeypatch.setattr(repository, "read_chunk_batch", many)
    async with both_ends(registry_database_url) as (publisher, reader, seen):
        handles = await bound(publisher, 12)
        live = []
        for handle in handles:  # from now on: nothing to replay
            subscription = await reader.subscribe_thread_run_stream(handle.run_id)
            assert subscription is not None
            live.append(subscription)
        for round_ in ("warm", "hot"):
            if round_ == "hot":
                # a subscription's first step reads the table once, to catch up: done
                reads.clear()
                seen.clear()
            sent = [f"{handle.run_id} says {round_}".encode() for handle in handles]
            await asyncio.gather(*(h.publish(data) for h, data in zip(handles, sent, strict=True)))
            async with asyncio.timeout(10):
                got = [(await anext(subscription)).data for subscription in live]
            assert got == sent
    assert riding(seen) >= 10, "all but the first (alone, with its own inline wake-up)"
    assert reads == [], "every chunk came inside its wake-up"
