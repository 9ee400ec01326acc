"""The seed's five tests, ported: the in-memory registry's behaviour holds on PostgreSQL."""

from __future__ import annotations

import asyncio

from registry import RunRegistry, ToolCallDecision


async def test_registry_register_and_lookup_by_thread(run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")

    handle = await run_registry.handle_by_thread("thread-1")
    assert handle is not None, "handle should exist"
    assert handle.run_id == "run-1"
    assert handle.can_own("agent-a")
    assert not handle.can_own("agent-b")


async def test_registry_lookup_by_run_id(run_registry: RunRegistry) -> None:
    registered = await run_registry.register("run-1", "agent-a", "thread-1")
    token = registered.cancellation_token()

    retrieved = await run_registry.handle_by_run_id("run-1")
    assert retrieved is not None, "handle should exist"
    retrieved_token = retrieved.cancellation_token()
    assert await retrieved_token.cancel()
    await asyncio.wait_for(token.wait(), 5)
    assert token.is_cancelled()


async def test_registry_thread_key_enforces_single_run_per_thread(
    run_registry: RunRegistry,
) -> None:
    await run_registry.register("run-a", "agent-a", "shared-thread")
    await run_registry.register("run-b", "agent-b", "shared-thread")

    handle = await run_registry.handle_by_thread("shared-thread")
    assert handle is not None
    assert handle.run_id == "run-b"
    assert handle.can_own("agent-b")
    assert await run_registry.handle_by_run_id("run-a") is None
    assert await run_registry.handle_by_run_id("run-b") is not None


async def test_registry_remove_cleans_both_indexes(run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")

    assert await run_registry.remove_by_run_id("run-1")
    assert await run_registry.handle_by_thread("thread-1") is None
    assert await run_registry.handle_by_run_id("run-1") is None


async def test_decisions_queued_before_the_inbox_opens_come_first(
    run_registry: RunRegistry,
) -> None:
    # the seed's bind_decision_tx: pending decisions are delivered before new ones
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    early = [ToolCallDecision.resume(f"call-{i}", i, i) for i in range(3)]
    assert await run_registry.forward_decisions_by_run_id("run-1", early) is not None

    async with handle.decisions() as inbox:
        got = [await asyncio.wait_for(anext(inbox), 5) for _ in range(3)]
        late = ToolCallDecision.cancel("call-9", reason="late", updated_at=9)
        await run_registry.forward_decisions_by_thread("agent-a", "thread-1", [late])
        got.append(await asyncio.wait_for(anext(inbox), 5))

    # in forward order; a decision forwarded without an id is given one by the forward
    delivered = [delivery.decision for delivery in got]
    assert all(d.decision_id.startswith("registry-") for d in delivered)
    assert [d.model_copy(update={"decision_id": ""}) for d in delivered] == [*early, late]
