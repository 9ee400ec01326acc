"""What a register does on a busy thread: supersede (the seed's), reject, or enqueue.

A queued run waits its turn: the thread's active run ending, however it ends, makes the
oldest queued run active in the same transaction, and its ``wait_active`` returns.
"""

from __future__ import annotations

import asyncio

import pytest

from registry import (
    InvalidInputError,
    RegistrySettings,
    RunEndedError,
    RunNotStartedError,
    RunRegistry,
    RunStatus,
    ThreadBusyError,
    ToolCallDecision,
)

#: a wake-up within one process takes milliseconds
DEADLINE = 5.0


async def statuses(registry: RunRegistry, thread_id: str) -> dict[str, RunStatus]:
    return {
        record.run_id: record.status for record in await registry.list_runs(thread_id=thread_id)
    }


# --- reject ---------------------------------------------------------------------------------


async def test_reject_names_the_active_run_and_writes_nothing(run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1", on_conflict="reject")
    with pytest.raises(ThreadBusyError) as raised:
        await run_registry.register("run-2", "agent-b", "thread-1", on_conflict="reject")
    assert (raised.value.thread_id, raised.value.active_run_id) == ("thread-1", "run-1")
    assert await run_registry.run("run-2") is None
    assert await statuses(run_registry, "thread-1") == {"run-1": RunStatus.ACTIVE}
    # a retry of the register that made the active run converges on it
    again = await run_registry.register("run-1", "agent-a", "thread-1", on_conflict="reject")
    assert again.run_id == "run-1"


async def test_an_unknown_policy_is_refused(run_registry: RunRegistry) -> None:
    with pytest.raises(InvalidInputError, match="on_conflict"):
        await run_registry.register("run-1", "agent-a", "thread-1", on_conflict="interrupt")
    assert await run_registry.run("run-1") is None


# --- enqueue --------------------------------------------------------------------------------


async def test_enqueue_waits_behind_the_active_run_until_it_finishes(
    run_registry: RunRegistry,
) -> None:
    first = await run_registry.register("run-1", "agent-a", "thread-1", on_conflict="enqueue")
    assert first.record.status is RunStatus.ACTIVE
    second = await run_registry.register("run-2", "agent-a", "thread-1", on_conflict="enqueue")
    assert second.record.status is RunStatus.QUEUED
    assert second.record.queued_at is not None
    with pytest.raises(TimeoutError):
        await second.wait_active(timeout=0.05)

    # lookups and forwards by thread reach the active run, never the queued one
    assert await run_registry.handle_by_run_id("run-2") is None
    forwarded = await run_registry.forward_decisions_by_thread(
        "agent-a", "thread-1", [ToolCallDecision.resume("call-1")]
    )
    assert forwarded is not None
    assert forwarded.run_id == "run-1"

    waiting = asyncio.create_task(second.wait_active())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert await first.finish("completed")
    record = await asyncio.wait_for(waiting, DEADLINE)
    assert record.status is RunStatus.ACTIVE
    now_held = second.record  # the handle's record is the row wait_active read
    assert now_held.status is RunStatus.ACTIVE
    handle = await run_registry.handle_by_thread("thread-1")
    assert handle is not None
    assert handle.run_id == "run-2"


@pytest.mark.parametrize("ending", ["finish", "remove", "cancel-then-remove", "fail"])
async def test_each_end_of_the_active_run_promotes_the_oldest_queued(
    run_registry: RunRegistry, ending: str
) -> None:
    active = await run_registry.register("run-0", "agent-a", "thread-1")
    for index in range(1, 4):
        await run_registry.register(f"run-{index}", "agent-a", "thread-1", on_conflict="enqueue")
    if ending == "finish":
        assert await active.finish("completed")
    elif ending == "remove":
        assert await run_registry.remove_by_run_id("run-0")
    elif ending == "cancel-then-remove":
        assert await run_registry.cancel_active_run_by_id("run-0")
        assert await active.remove()
    else:
        assert await active.finish("failed", reason="boom")
    now = await statuses(run_registry, "thread-1")
    assert [run for run, status in sorted(now.items()) if status is RunStatus.ACTIVE] == ["run-1"]
    assert [run for run, status in sorted(now.items()) if status is RunStatus.QUEUED] == [
        "run-2",
        "run-3",
    ]


async def test_a_queued_run_cancelled_ends_and_is_never_promoted(
    run_registry: RunRegistry,
) -> None:
    active = await run_registry.register("run-1", "agent-a", "thread-1")
    queued = await run_registry.register("run-2", "agent-a", "thread-1", on_conflict="enqueue")
    await run_registry.register("run-3", "agent-a", "thread-1", on_conflict="enqueue")
    token = queued.cancellation_token()
    waiting = asyncio.create_task(queued.wait_active())
    await asyncio.sleep(0.05)
    assert await queued.cancel()
    with pytest.raises(RunEndedError):
        await asyncio.wait_for(waiting, DEADLINE)
    await asyncio.wait_for(token.wait(), DEADLINE)
    record = await run_registry.run("run-2")
    assert record is not None
    assert (record.status, record.end_reason) == (RunStatus.CANCELLED, "cancelled while queued")
    assert not await queued.cancel()

    assert await active.finish("completed")
    now = await statuses(run_registry, "thread-1")
    assert now == {
        "run-1": RunStatus.COMPLETED,
        "run-2": RunStatus.CANCELLED,
        "run-3": RunStatus.ACTIVE,
    }


async def test_cancel_by_id_answers_true_for_an_active_or_a_queued_run(
    run_registry: RunRegistry,
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.register("run-2", "agent-a", "thread-1", on_conflict="enqueue")
    assert await run_registry.cancel_active_run_by_id("run-2"), "queued: now cancelled"
    assert not await run_registry.cancel_active_run_by_id("run-2"), "ended"
    assert await run_registry.cancel_active_run_by_id("run-1"), "active: cancel requested"
    assert await run_registry.cancel_active_run_by_id("run-1"), "still active: asked again"
    assert not await run_registry.cancel_active_run_by_id("run-unknown")
    assert await statuses(run_registry, "thread-1") == {
        "run-1": RunStatus.ACTIVE,
        "run-2": RunStatus.CANCELLED,
    }


async def test_a_supersede_keeps_the_queue_behind_the_new_run(run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.register("run-2", "agent-a", "thread-1", on_conflict="enqueue")
    newest = await run_registry.register("run-3", "agent-a", "thread-1")
    assert await statuses(run_registry, "thread-1") == {
        "run-1": RunStatus.SUPERSEDED,
        "run-2": RunStatus.QUEUED,
        "run-3": RunStatus.ACTIVE,
    }
    assert await newest.finish("completed")
    assert (await statuses(run_registry, "thread-1"))["run-2"] is RunStatus.ACTIVE


async def test_a_retried_enqueue_converges_on_the_queued_run(run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.register("run-2", "agent-a", "thread-1", on_conflict="enqueue")
    again = await run_registry.register("run-2", "agent-a", "thread-1", on_conflict="enqueue")
    assert again.record.status is RunStatus.QUEUED
    assert len(await run_registry.list_runs(thread_id="thread-1")) == 2


async def test_a_swept_cancelled_orphan_promotes_the_queue(registry_database_url: str) -> None:
    fast = RegistrySettings(lease_seconds=0.2, heartbeat_interval=0.1)
    async with (
        RunRegistry.connect(registry_database_url, worker_id="gone", settings=fast) as gone,
        RunRegistry.connect(registry_database_url, worker_id="next", settings=fast) as runs,
    ):
        await gone.register("run-1", "agent-a", "thread-1")
        queued = await runs.register("run-2", "agent-a", "thread-1", on_conflict="enqueue")
        await runs.cancel_active_run_by_id("run-1")
        await gone.close()  # its lease is released; the sweep waits one more lease length
        # the heartbeat of ``runs`` sweeps the orphan and promotes the queued run
        record = await queued.wait_active(timeout=DEADLINE)
        assert record.status is RunStatus.ACTIVE
        orphan = await runs.run("run-1")
        assert orphan is not None
        assert orphan.status is RunStatus.CANCELLED


# --- the run scope on a busy thread -----------------------------------------------------------


async def body_that_must_not_run(registry: RunRegistry, policy: str) -> None:
    async with registry.run("run-2", "agent-a", "thread-1", on_conflict=policy):
        raise AssertionError("the body must not run")


async def test_a_scope_that_enqueues_runs_its_body_in_turn(run_registry: RunRegistry) -> None:
    first = await run_registry.register("run-1", "agent-a", "thread-1")
    entered = asyncio.Event()

    async def body() -> None:
        async with run_registry.run("run-2", "agent-a", "thread-1", on_conflict="enqueue"):
            entered.set()

    task = asyncio.create_task(body())
    await asyncio.sleep(0.1)
    assert not entered.is_set()
    assert await first.finish("completed")
    await asyncio.wait_for(task, DEADLINE)
    assert (await statuses(run_registry, "thread-1"))["run-2"] is RunStatus.COMPLETED


async def test_a_scope_cancelled_while_queued_cancels_its_run(run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")

    task = asyncio.create_task(body_that_must_not_run(run_registry, "enqueue"))
    for _ in range(100):
        if await run_registry.run("run-2") is not None:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE)
    assert (await statuses(run_registry, "thread-1"))["run-2"] is RunStatus.CANCELLED


async def test_a_queued_scope_whose_run_is_cancelled_raises_run_not_started(
    run_registry: RunRegistry,
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    task = asyncio.create_task(body_that_must_not_run(run_registry, "enqueue"))
    async with asyncio.timeout(DEADLINE):
        while await run_registry.run("run-2") is None:
            await asyncio.sleep(0.02)
    assert await run_registry.cancel_active_run_by_id("run-2")
    with pytest.raises(RunNotStartedError) as raised:
        await asyncio.wait_for(task, DEADLINE)
    assert isinstance(raised.value, RunEndedError)
    assert (raised.value.run_id, raised.value.status) == ("run-2", "cancelled")
    assert (await statuses(run_registry, "thread-1"))["run-2"] is RunStatus.CANCELLED


async def test_a_scope_that_rejects_raises_before_its_body(run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")

    with pytest.raises(ThreadBusyError):
        await body_that_must_not_run(run_registry, "reject")


# --- a queued run whose worker went away -------------------------------------------------------


async def test_a_restarted_worker_runs_its_queued_run_in_turn(registry_database_url: str) -> None:
    gone = await RunRegistry.connect(registry_database_url, worker_id="server")
    await gone.register("run-1", "agent-a", "thread-1")
    await gone.register("run-2", "agent-a", "thread-1", on_conflict="enqueue")
    await gone.close()  # the process goes away (a queued run keeps no lease to release)
    async with RunRegistry.connect(registry_database_url, worker_id="server") as again:
        resumed = {handle.run_id: handle for handle in await again.resume_owned_runs()}
        assert {run_id: h.record.status for run_id, h in resumed.items()} == {
            "run-1": RunStatus.ACTIVE,
            "run-2": RunStatus.QUEUED,
        }
        entered = asyncio.Event()

        async def carry_on() -> None:
            async with again.continue_run(resumed["run-2"]):
                entered.set()

        task = asyncio.create_task(carry_on())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(entered.wait()), 0.1)
        assert await resumed["run-1"].finish("completed")
        await asyncio.wait_for(task, DEADLINE)
        assert (await statuses(again, "thread-1"))["run-2"] is RunStatus.COMPLETED


async def test_a_queued_run_of_a_gone_worker_is_adopted_once_promoted(
    registry_database_url: str,
) -> None:
    fast = RegistrySettings(lease_seconds=0.3, heartbeat_interval=0.1)
    gone = await RunRegistry.connect(registry_database_url, worker_id="gone")
    await gone.register("run-1", "agent-a", "thread-1")
    await gone.register("run-2", "agent-a", "thread-1", on_conflict="enqueue")
    await gone.close()
    async with RunRegistry.connect(registry_database_url, worker_id="other", settings=fast) as runs:
        [first] = await runs.adopt_orphaned_runs()
        assert first.run_id == "run-1"
        assert await first.finish("completed")
        # promoted with a lease nobody renews: adoptable once it expires
        async with asyncio.timeout(DEADLINE):
            while not (adopted := await runs.adopt_orphaned_runs()):
                await asyncio.sleep(0.05)
        assert [handle.run_id for handle in adopted] == ["run-2"]
        async with runs.continue_run(adopted[0]):
            pass
        assert (await statuses(runs, "thread-1"))["run-2"] is RunStatus.COMPLETED
