"""A run's lifetime: connect as a block, the run scope's outcomes, finish, inbox timeouts and
cancels, and a resumed run that knows how far it got."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from registry import (
    InvalidInputError,
    RegistryClosedError,
    RunCancelledError,
    RunEndedError,
    RunHandle,
    RunRegistry,
    RunStatus,
    StreamClosedError,
    ToolCallDecision,
)
from registry.scope import INTERRUPTED_REASON
from tests.helpers.database import decisions_of_run

#: a wake-up within one process takes milliseconds
DEADLINE = 5.0


async def status_of(registry: RunRegistry, run_id: str) -> tuple[RunStatus, str | None]:
    record = await registry.run(run_id)
    assert record is not None
    return record.status, record.end_reason


async def body_in_task(
    body: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
) -> tuple[asyncio.Task[None], asyncio.Event]:
    """Start ``body`` in a task and wait until it says it has started."""
    started = asyncio.Event()
    task = asyncio.create_task(body(started))
    await asyncio.wait_for(started.wait(), DEADLINE)
    return task, started


# --- 1: connect is a block ------------------------------------------------------------------


async def test_connect_is_a_block_and_still_awaitable(registry_database_url: str) -> None:
    async with RunRegistry.connect(registry_database_url, listen=False) as runs:
        await runs.register("run-1", "agent-a", "thread-1")
        assert not runs.closed
    assert runs.closed
    with pytest.raises(RegistryClosedError):
        await runs.handle_by_run_id("run-1")

    awaited = await RunRegistry.connect(registry_database_url, listen=False)
    async with awaited as same:
        assert await same.active_run_id_for_thread("agent-a", "thread-1") == "run-1"
    assert awaited.closed


async def test_connect_block_closes_when_its_body_raises(registry_database_url: str) -> None:
    opened: list[RunRegistry] = []

    async def serve() -> None:
        async with RunRegistry.connect(registry_database_url, listen=False) as runs:
            opened.append(runs)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await serve()
    assert opened[0].closed


# --- 3: the run scope records how the run ended ------------------------------------------------


async def test_a_body_that_returns_completes_the_run(run_registry: RunRegistry) -> None:
    async with run_registry.run("run-1", "agent-a", "thread-1") as run:
        assert run.record.status is RunStatus.ACTIVE
    assert await status_of(run_registry, "run-1") == (RunStatus.COMPLETED, "completed")
    assert await run_registry.handle_by_thread("thread-1") is None


async def test_a_body_that_raises_fails_the_run_with_its_reason(
    run_registry: RunRegistry,
) -> None:
    with pytest.raises(ValueError, match="model refused"):
        async with run_registry.run("run-1", "agent-a", "thread-1"):
            raise ValueError("model refused\nsecond line")
    assert await status_of(run_registry, "run-1") == (
        RunStatus.FAILED,
        "ValueError: model refused",
    )


async def test_a_cancel_of_the_run_stops_the_body_and_cancels_the_run(
    run_registry: RunRegistry,
) -> None:
    async def body(started: asyncio.Event) -> None:
        async with run_registry.run("run-1", "agent-a", "thread-1"):
            started.set()
            await asyncio.Event().wait()  # an LLM call that would never return

    task, _ = await body_in_task(body)
    assert await run_registry.cancel_active_run_by_id("run-1")
    await asyncio.wait_for(task, DEADLINE)  # the cancel is absorbed: the task ends cleanly
    assert await status_of(run_registry, "run-1") == (RunStatus.CANCELLED, "cancelled")


async def test_a_body_that_stops_on_its_token_records_cancelled(
    run_registry: RunRegistry,
) -> None:
    async with run_registry.run("run-1", "agent-a", "thread-1", cancel_body=False) as run:
        token = run.cancellation_token()
        await run.cancel()
        await asyncio.wait_for(token.wait(), DEADLINE)
    assert (await status_of(run_registry, "run-1"))[0] is RunStatus.CANCELLED


async def test_a_cancel_from_elsewhere_interrupts_the_run(run_registry: RunRegistry) -> None:
    async def body(started: asyncio.Event) -> None:
        async with run_registry.run("run-1", "agent-a", "thread-1"):
            started.set()
            await asyncio.Event().wait()

    task, _ = await body_in_task(body)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE)
    assert await status_of(run_registry, "run-1") == (RunStatus.INTERRUPTED, INTERRUPTED_REASON)


@pytest.mark.parametrize("waits_on", ["inbox", "elsewhere"])
async def test_a_shutdown_leaves_the_run_active_for_adoption(
    registry_database_url: str, run_registry: RunRegistry, waits_on: str
) -> None:
    server = await RunRegistry.connect(registry_database_url, worker_id="server")

    async def body(started: asyncio.Event) -> None:
        async with server.run("run-1", "agent-a", "thread-1") as run:
            started.set()
            if waits_on == "inbox":
                async for _ in run.decisions():
                    pass
            await asyncio.Event().wait()

    task, _ = await body_in_task(body)
    await server.close()
    if waits_on == "inbox":
        await asyncio.wait_for(task, DEADLINE)  # RegistryClosedError is absorbed
    else:
        task.cancel()  # what the event loop does to tasks left at shutdown
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, DEADLINE)
    assert await status_of(run_registry, "run-1") == (RunStatus.ACTIVE, None)
    # close() released the lease: another registry adopts the run at once
    adopted = await run_registry.adopt_orphaned_runs()
    assert [handle.run_id for handle in adopted] == ["run-1"]


async def test_finish_stores_each_outcome_and_never_overwrites(
    run_registry: RunRegistry,
) -> None:
    for index, outcome in enumerate(["completed", "failed", "cancelled", "interrupted"]):
        handle = await run_registry.register(f"run-{index}", "agent-a", f"thread-{index}")
        assert await handle.finish(outcome, reason=f"because {index}")
        assert await status_of(run_registry, f"run-{index}") == (
            RunStatus(outcome),
            f"because {index}",
        )
        assert not await handle.finish("completed")  # ended: the outcome stays
        assert (await status_of(run_registry, f"run-{index}"))[0] is RunStatus(outcome)
    handle = await run_registry.register("run-9", "agent-a", "thread-9")
    with pytest.raises(InvalidInputError, match="outcome"):
        await handle.finish("superseded")
    with pytest.raises(InvalidInputError, match="reason"):
        await handle.finish("failed", reason=b"bytes")  # type: ignore[arg-type]
    assert (await status_of(run_registry, "run-9"))[0] is RunStatus.ACTIVE


async def test_remove_keeps_the_seed_outcomes(run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    assert await run_registry.remove_by_run_id("run-1")
    assert await status_of(run_registry, "run-1") == (RunStatus.COMPLETED, "removed")
    await run_registry.register("run-2", "agent-a", "thread-1")
    await run_registry.cancel_active_run_by_id("run-2")
    assert await run_registry.remove_by_run_id("run-2")
    assert await status_of(run_registry, "run-2") == (RunStatus.CANCELLED, "cancelled")


# --- 5: a supersede ends the body quietly ---------------------------------------------------


async def test_a_publish_after_a_supersede_ends_the_scope_quietly(
    run_registry: RunRegistry,
) -> None:
    superseded = asyncio.Event()

    async def body(started: asyncio.Event) -> None:
        # no try/except: the scope deals with the publish that finds the run superseded
        async with run_registry.run("run-1", "agent-a", "thread-1", cancel_body=False) as run:
            await run.bind_stream_fanout()
            await run.publish(b"one")
            started.set()
            await superseded.wait()
            await run.publish(b"two")
            raise AssertionError("the publish after the supersede must raise")

    task, _ = await body_in_task(body)
    await run_registry.register("run-2", "agent-a", "thread-1")
    superseded.set()
    await asyncio.wait_for(task, DEADLINE)
    record = await run_registry.run("run-1")
    assert record is not None
    assert record.status is RunStatus.SUPERSEDED
    assert record.end_reason == "superseded by run run-2"


async def test_a_supersede_stops_a_waiting_body(run_registry: RunRegistry) -> None:
    async def body(started: asyncio.Event) -> None:
        async with run_registry.run("run-1", "agent-a", "thread-1"):
            started.set()
            await asyncio.Event().wait()

    task, _ = await body_in_task(body)
    await run_registry.register("run-2", "agent-a", "thread-1")
    await asyncio.wait_for(task, DEADLINE)
    assert (await status_of(run_registry, "run-1"))[0] is RunStatus.SUPERSEDED
    assert (await status_of(run_registry, "run-2"))[0] is RunStatus.ACTIVE


async def test_a_run_taken_over_ends_the_old_scope_quietly(registry_database_url: str) -> None:
    old = await RunRegistry.connect(registry_database_url, worker_id="server")
    taken = asyncio.Event()

    async def body(started: asyncio.Event) -> None:
        async with old.run("run-1", "agent-a", "thread-1", cancel_body=False) as run:
            await run.bind_stream_fanout()
            started.set()
            await taken.wait()
            await run.publish(b"from the old owner")  # LeaseLostError: absorbed
            raise AssertionError("the publish of a fenced owner must raise")

    try:
        task, _ = await body_in_task(body)
        # an overlapping deploy of the same worker id resumes the run: the old one is fenced
        new, resumed = await resume_elsewhere(registry_database_url, "server")
        taken.set()
        await asyncio.wait_for(task, DEADLINE)
        try:
            record = await new.run("run-1")
            assert record is not None
            assert (record.status, record.owner_epoch) == (RunStatus.ACTIVE, 2)
            assert await resumed.finish("completed")
        finally:
            await new.close()
    finally:
        await old.close()


def test_stream_closed_and_lease_lost_are_run_ended() -> None:
    from registry import LeaseLostError

    assert issubclass(StreamClosedError, RunEndedError)
    assert issubclass(LeaseLostError, RunEndedError)


async def test_a_stream_never_bound_fails_the_run(run_registry: RunRegistry) -> None:
    # the same error type as after an end, but the run is still active: a mistake, recorded
    with pytest.raises(StreamClosedError):
        async with run_registry.run("run-1", "agent-a", "thread-1") as run:
            await run.publish(b"chunk")
    status, reason = await status_of(run_registry, "run-1")
    assert status is RunStatus.FAILED
    assert reason is not None
    assert reason.startswith("StreamClosedError")


# --- 2: an inbox with a timeout, acks by the delivery, and an end on cancel ---------------


async def test_inbox_get_times_out_and_keeps_what_arrives_later(
    run_registry: RunRegistry,
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    async with handle.decisions() as inbox:
        with pytest.raises(TimeoutError):
            await inbox.get(timeout=0.05)
        await run_registry.forward_decisions_by_run_id(
            "run-1", [ToolCallDecision.resume("call-1", decision_id="d-1")]
        )
        delivery = await inbox.get(timeout=DEADLINE)
        assert delivery.decision.decision_id == "d-1"
        assert await delivery.ack()
        assert not await delivery.ack()  # idempotent
    with pytest.raises(InvalidInputError, match="timeout"):
        await handle.decisions().get(timeout=-1)


async def test_inbox_get_raises_run_ended_after_the_run_ends(run_registry: RunRegistry) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    inbox = handle.decisions()
    waiting = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    assert await run_registry.remove_by_run_id("run-1")
    with pytest.raises(RunEndedError):
        await asyncio.wait_for(waiting, DEADLINE)


async def test_an_inbox_until_cancelled_ends_on_the_runs_cancel(
    run_registry: RunRegistry,
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.forward_decisions_by_run_id(
        "run-1", [ToolCallDecision.resume("call-1", decision_id="d-1")]
    )
    iterating = handle.decisions(until_cancelled=True)
    getting = handle.decisions(until_cancelled=True)
    plain = handle.decisions()

    async def drain() -> list[str]:
        return [delivery.decision.decision_id async for delivery in iterating]

    first = await getting.get(timeout=DEADLINE)
    assert await first.ack()
    drained = asyncio.create_task(drain())
    parked = asyncio.create_task(getting.get())
    plain_next = asyncio.create_task(plain.get())
    await asyncio.sleep(0.05)
    assert await handle.cancel()
    assert await asyncio.wait_for(drained, DEADLINE) == []
    with pytest.raises(RunCancelledError):
        await asyncio.wait_for(parked, DEADLINE)
    assert not plain_next.done()  # a plain inbox goes on until the run ends
    plain_next.cancel()
    await plain.aclose()


async def test_a_body_reading_its_inbox_until_cancelled_needs_no_handler(
    run_registry: RunRegistry,
) -> None:
    applied: list[str] = []

    async def body(started: asyncio.Event) -> None:
        async with run_registry.run("run-1", "agent-a", "thread-1", cancel_body=False) as run:
            started.set()
            async for delivery in run.decisions(until_cancelled=True):
                applied.append(delivery.decision.decision_id)
                await delivery.ack()

    task, _ = await body_in_task(body)
    await run_registry.forward_decisions_by_run_id(
        "run-1", [ToolCallDecision.resume("call-1", decision_id="d-1")]
    )
    await run_registry.cancel_active_run_by_id("run-1")
    await asyncio.wait_for(task, DEADLINE)
    assert (await status_of(run_registry, "run-1"))[0] is RunStatus.CANCELLED


# --- 4: a resumed run continues where it was --------------------------------------------------


async def resume_elsewhere(url: str, worker_id: str) -> tuple[RunRegistry, RunHandle]:
    registry = await RunRegistry.connect(url, worker_id=worker_id)
    [handle] = await registry.resume_owned_runs()
    return registry, handle


async def test_a_resumed_run_publishes_on_from_its_last_seq(
    registry_database_url: str, run_registry: RunRegistry
) -> None:
    async def body(run: RunHandle, upto: int) -> None:
        # the run body: from where its record says it was, never again from 1
        seq = run.record.stream_seq or 0
        while seq < upto:
            seq = await run.publish(f"chunk {seq + 1}".encode(), after_seq=seq)

    first = await RunRegistry.connect(registry_database_url, worker_id="server")
    handle = await first.register("run-1", "agent-a", "thread-1")
    await handle.bind_stream_fanout()
    await first.forward_decisions_by_run_id(
        "run-1", [ToolCallDecision.resume(f"call-{i}", decision_id=f"d-{i}") for i in range(3)]
    )
    inbox = handle.decisions()
    acked = [await inbox.get(timeout=DEADLINE) for _ in range(2)]
    for delivery in acked:
        assert await delivery.ack()
    await body(handle, 5)
    await first.close()  # the server restarts

    second, resumed = await resume_elsewhere(registry_database_url, "server")
    try:
        assert resumed.record.stream_seq == 5
        assert resumed.record.decision_cursor == acked[-1].delivery_id
        async with second.continue_run(resumed) as run:
            await body(run, 10)
    finally:
        await second.close()
    chunks = await run_registry.read_chunks("run-1")
    assert [chunk.data for chunk in chunks] == [f"chunk {i}".encode() for i in range(1, 11)]
    assert (await status_of(run_registry, "run-1"))[0] is RunStatus.COMPLETED


async def test_a_run_resumed_while_waiting_for_an_approval_reads_it(
    registry_database_url: str, run_registry: RunRegistry
) -> None:
    pieces = [b"piece 1: may I call the tool?", b"piece 2: done"]

    async def body(run: RunHandle) -> list[int]:
        # the README's body: from its last published piece (published again: it converges)
        seq = max((run.record.stream_seq or 0) - 1, 0)
        attempts = []
        for piece in pieces[seq:]:
            seq = await run.publish(piece, after_seq=seq)
            if seq == 1:  # the piece that asks for an approval
                async with run.decisions(until_cancelled=True) as inbox:
                    delivery = await inbox.get(timeout=DEADLINE)
                    attempts.append(delivery.attempts)
                    assert await delivery.ack()
        return attempts

    first = await RunRegistry.connect(registry_database_url, worker_id="server")
    handle = await first.register("run-1", "agent-a", "thread-1")
    await handle.bind_stream_fanout()
    await handle.publish(pieces[0], after_seq=0)
    await first.forward_decisions_by_run_id(
        "run-1", [ToolCallDecision.resume("call-1", {"ok": True}, decision_id="approval-1")]
    )
    inbox = handle.decisions()
    await inbox.get(timeout=DEADLINE)  # delivered, never acknowledged: the server dies
    await first.close()

    second, resumed = await resume_elsewhere(registry_database_url, "server")
    try:
        async with second.continue_run(resumed) as run:
            assert await body(run) == [2], "the decision is delivered again, once"
    finally:
        await second.close()
    chunks = await run_registry.read_chunks("run-1")
    assert [chunk.data for chunk in chunks] == pieces
    [decision] = await decisions_of_run(registry_database_url, "run-1")
    assert decision["status"] == "acked"
