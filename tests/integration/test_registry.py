"""Each RunRegistry method, including its None / False paths, against real PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from registry import (
    DecisionStatus,
    ForwardedDecision,
    RegistryClosedError,
    RunAlreadyExistsError,
    RunRegistry,
    RunStatus,
    ToolCallDecision,
)
from registry.database import asyncpg_dsn
from registry.listener import LISTENER_APPLICATION_NAME


async def _rows(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


def decision(target: str, decision_id: str = "", updated_at: int = 1) -> ToolCallDecision:
    return ToolCallDecision.resume(target, {"target": target}, updated_at, decision_id=decision_id)


# --- register ------------------------------------------------------------------------------


async def test_register_records_owner_lease_and_database_timestamps(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    assert (handle.run_id, handle.thread_id, handle.agent_id) == ("run-1", "thread-1", "agent-a")
    [row] = await _rows(
        registry_database_url,
        "SELECT status, owner_id, lease_expires_at > now() AS leased, created_at <= now() AS past,"
        " ended_at FROM registry.runs WHERE run_id = $1",
        "run-1",
    )
    assert row["status"] == "active"
    assert row["owner_id"] == run_registry.worker_id == "test-worker"
    assert row["leased"]
    assert row["past"]
    assert row["ended_at"] is None


async def test_register_reusing_a_run_id_is_refused_and_changes_nothing(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.register("run-2", "agent-a", "thread-2")
    with pytest.raises(RunAlreadyExistsError) as caught:
        # thread-2's active run must not be superseded by a register that fails
        await run_registry.register("run-1", "agent-a", "thread-2")
    assert isinstance(caught.value, ValueError)
    rows = await _rows(
        registry_database_url, "SELECT run_id, status FROM registry.runs ORDER BY run_id"
    )
    assert [(r["run_id"], r["status"]) for r in rows] == [
        ("run-1", "active"),
        ("run-2", "active"),
    ]


async def test_register_supersedes_and_drops_unacknowledged_decisions(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    old = await run_registry.register("run-a", "agent-a", "thread-1")
    old_token = old.cancellation_token()
    await run_registry.forward_decisions_by_run_id("run-a", [decision("c1"), decision("c2")])
    inbox = old.decisions()
    first = await asyncio.wait_for(anext(inbox), 5)
    assert await inbox.ack(first)
    second = await asyncio.wait_for(anext(inbox), 5)  # delivered, never acked

    await run_registry.register("run-b", "agent-b", "thread-1")

    await asyncio.wait_for(old_token.wait(), 5)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(inbox), 5)
    assert not await inbox.ack(second), "a dropped decision cannot be acked"
    record = await run_registry.run("run-a")
    assert record is not None
    assert record.status is RunStatus.SUPERSEDED
    assert record.end_reason == "superseded by run run-b"
    assert record.ended_at is not None
    rows = await _rows(
        registry_database_url,
        "SELECT target_id, status, drop_reason FROM registry.decisions ORDER BY id",
    )
    assert [(r["target_id"], r["status"]) for r in rows] == [("c1", "acked"), ("c2", "dropped")]
    assert rows[1]["drop_reason"] == "run run-a superseded by run run-b"


# --- lookups -------------------------------------------------------------------------------


async def test_lookups_return_none_for_unknown_and_finished_runs(
    run_registry: RunRegistry,
) -> None:
    assert await run_registry.handle_by_thread("nobody") is None
    assert await run_registry.handle_by_run_id("nobody") is None
    await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.remove_by_run_id("run-1")
    assert await run_registry.handle_by_thread("thread-1") is None
    assert await run_registry.handle_by_run_id("run-1") is None
    history = await run_registry.run("run-1")
    assert history is not None
    assert history.status is RunStatus.COMPLETED


async def test_active_run_id_for_thread_checks_ownership(run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    assert await run_registry.active_run_id_for_thread("agent-a", "thread-1") == "run-1"
    assert await run_registry.active_run_id_for_thread("agent-b", "thread-1") is None
    assert await run_registry.active_run_id_for_thread("agent-a", "thread-2") is None


# --- remove --------------------------------------------------------------------------------


async def test_remove_returns_false_when_not_active(run_registry: RunRegistry) -> None:
    assert not await run_registry.remove_by_run_id("never-registered")
    await run_registry.register("run-1", "agent-a", "thread-1")
    assert await run_registry.remove_by_run_id("run-1")
    assert not await run_registry.remove_by_run_id("run-1")


async def test_remove_after_cancel_finishes_as_cancelled_and_ends_inbox(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    inbox = handle.decisions()
    waiting = asyncio.create_task(anext(inbox))
    await run_registry.forward_decisions_by_run_id("run-1", [decision("c1")])
    delivered = await asyncio.wait_for(waiting, 5)
    assert delivered.decision.target_id == "c1"
    assert await handle.cancel()
    assert await handle.remove()

    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(inbox), 5)
    record = await run_registry.run("run-1")
    assert record is not None
    assert record.status is RunStatus.CANCELLED
    [row] = await _rows(registry_database_url, "SELECT status, drop_reason FROM registry.decisions")
    assert (row["status"], row["drop_reason"]) == ("dropped", "run run-1 ended")


async def test_remove_does_not_trip_the_token(run_registry: RunRegistry) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    token = handle.cancellation_token()
    await run_registry.remove_by_run_id("run-1")
    assert not await token.refresh(), "a completed run was not cancelled"


# --- forward -------------------------------------------------------------------------------


async def test_forward_by_thread_returns_where_it_landed(run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    forwarded = await run_registry.forward_decisions_by_thread(
        "agent-a", "thread-1", [decision("c1")]
    )
    assert forwarded == ForwardedDecision(thread_id="thread-1", run_id="run-1")


async def test_forward_by_thread_with_another_agent_returns_none_and_writes_nothing(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    assert (
        await run_registry.forward_decisions_by_thread("agent-b", "thread-1", [decision("c1")])
        is None
    )
    assert (
        await run_registry.forward_decisions_by_thread("agent-a", "thread-2", [decision("c1")])
        is None
    )
    assert await _rows(registry_database_url, "SELECT 1 FROM registry.decisions") == []


async def test_forward_by_run_id_returns_none_when_not_active(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    assert await run_registry.forward_decisions_by_run_id("nope", [decision("c1")]) is None
    await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.remove_by_run_id("run-1")
    assert await run_registry.forward_decisions_by_run_id("run-1", [decision("c1")]) is None
    assert await _rows(registry_database_url, "SELECT 1 FROM registry.decisions") == []


async def test_forward_stores_the_audit_fields(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    sent = ToolCallDecision.cancel(
        "call-7", {"nested": [1, 2.5, None, "x"]}, "too risky", 1_700_000_000_123, decision_id="d7"
    )
    await run_registry.forward_decisions_by_run_id("run-1", [sent])
    [row] = await _rows(registry_database_url, "SELECT * FROM registry.decisions")
    assert row["run_id"] == "run-1"
    assert row["thread_id"] == "thread-1"
    assert row["agent_id"] == "agent-a"
    assert row["decision_id"] == "d7"
    assert row["target_id"] == "call-7"
    assert row["action"] == "cancel"
    assert row["reason"] == "too risky"
    assert row["decision_updated_at"] == 1_700_000_000_123
    assert row["status"] == DecisionStatus.PENDING
    assert row["attempts"] == 0
    assert row["received_at"] is not None
    assert row["delivered_at"] is None


async def test_forward_is_idempotent_by_decision_id(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    batch = [decision("c1", "d1"), decision("c2", "d2"), decision("c3")]
    await run_registry.forward_decisions_by_run_id("run-1", batch)
    # a client retrying the same forward, plus a new decision and a duplicate within the batch
    retry = [decision("c1", "d1"), decision("c2", "d2"), decision("c4", "d4"), decision("c5", "d4")]
    assert await run_registry.forward_decisions_by_run_id("run-1", retry) is not None
    rows = await _rows(
        registry_database_url, "SELECT target_id FROM registry.decisions ORDER BY id"
    )
    assert [r["target_id"] for r in rows] == ["c1", "c2", "c3", "c4"]
    async with handle.decisions() as inbox:
        targets = [(await asyncio.wait_for(anext(inbox), 5)).decision.target_id for _ in rows]
    assert targets == ["c1", "c2", "c3", "c4"]


async def test_empty_forward_is_accepted_and_writes_nothing(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    forwarded = await run_registry.forward_decisions_by_run_id("run-1", [])
    assert forwarded == ForwardedDecision("thread-1", "run-1")
    assert await _rows(registry_database_url, "SELECT 1 FROM registry.decisions") == []


async def test_forward_accepts_mappings_in_the_seed_shape(run_registry: RunRegistry) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.forward_decisions_by_run_id(
        "run-1",
        [{"target_id": "c1", "decision_id": "d", "action": "resume", "updated_at": 3}],
    )
    async with handle.decisions() as inbox:
        delivery = await asyncio.wait_for(anext(inbox), 5)
    assert delivery.decision == ToolCallDecision.resume("c1", None, 3, decision_id="d")


# --- cancel --------------------------------------------------------------------------------


async def test_cancel_by_id_returns_false_when_not_active(run_registry: RunRegistry) -> None:
    assert not await run_registry.cancel_active_run_by_id("nope")
    await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.remove_by_run_id("run-1")
    assert not await run_registry.cancel_active_run_by_id("run-1")


async def test_cancel_by_thread_returns_the_run_id(run_registry: RunRegistry) -> None:
    assert await run_registry.cancel_active_run_by_thread("thread-1") is None
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    token = handle.cancellation_token()
    assert await run_registry.cancel_active_run_by_thread("thread-1") == "run-1"
    await asyncio.wait_for(token.wait(), 5)
    # the run stays active until removed; cancelling again is harmless
    assert await run_registry.cancel_active_run_by_thread("thread-1") == "run-1"
    assert await run_registry.handle_by_run_id("run-1") is not None


async def test_cancel_keeps_the_first_request_time(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.cancel_active_run_by_id("run-1")
    [first] = await _rows(registry_database_url, "SELECT cancel_requested_at FROM registry.runs")
    await run_registry.cancel_active_run_by_id("run-1")
    [second] = await _rows(registry_database_url, "SELECT cancel_requested_at FROM registry.runs")
    assert first["cancel_requested_at"] == second["cancel_requested_at"]


async def test_token_created_after_cancel_sees_it_at_once(run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    assert await run_registry.cancel_active_run_by_id("run-1")
    handle = await run_registry.handle_by_run_id("run-1")
    assert handle is not None
    assert handle.cancellation_token().is_cancelled()


async def test_tokens_of_one_run_share_state(run_registry: RunRegistry) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    first, second = handle.cancellation_token(), handle.cancellation_token()
    other = await run_registry.register("run-2", "agent-a", "thread-2")
    await run_registry.cancel_active_run_by_id("run-1")
    await asyncio.wait_for(asyncio.gather(first.wait(), second.wait()), 5)
    assert not other.cancellation_token().is_cancelled()


# --- inbox ---------------------------------------------------------------------------------


async def test_unacked_decision_is_redelivered_to_the_next_inbox(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.forward_decisions_by_run_id("run-1", [decision("c1"), decision("c2")])
    async with handle.decisions() as inbox:
        first = await asyncio.wait_for(anext(inbox), 5)
        assert first.attempts == 1
        assert await inbox.ack(first)
        assert not await inbox.ack(first), "acking twice reports False"
        unacked = await asyncio.wait_for(anext(inbox), 5)
        assert unacked.decision.target_id == "c2"
    async with handle.decisions() as reopened:
        again = await asyncio.wait_for(anext(reopened), 5)
        assert (again.delivery_id, again.attempts) == (unacked.delivery_id, 2)
        assert await reopened.ack(again)
    rows = await _rows(
        registry_database_url,
        "SELECT status, attempts, acked_at IS NOT NULL AS acked"
        " FROM registry.decisions ORDER BY id",
    )
    assert [(r["status"], r["attempts"], r["acked"]) for r in rows] == [
        ("acked", 1, True),
        ("acked", 2, True),
    ]


async def test_inbox_waits_for_new_decisions_in_order(run_registry: RunRegistry) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    received: list[str] = []

    async def consume() -> None:
        async with handle.decisions() as inbox:
            async for delivery in inbox:
                received.append(delivery.decision.target_id)
                await inbox.ack(delivery)
                if len(received) == 6:
                    return

    consumer = asyncio.create_task(consume())
    for batch in range(3):
        await run_registry.forward_decisions_by_run_id(
            "run-1", [decision(f"c{batch}a"), decision(f"c{batch}b")]
        )
    await asyncio.wait_for(consumer, 5)
    assert received == ["c0a", "c0b", "c1a", "c1b", "c2a", "c2b"]


async def test_ack_of_another_runs_delivery_is_refused(run_registry: RunRegistry) -> None:
    one = await run_registry.register("run-1", "agent-a", "thread-1")
    two = await run_registry.register("run-2", "agent-a", "thread-2")
    await run_registry.forward_decisions_by_run_id("run-1", [decision("c1")])
    async with one.decisions() as inbox, two.decisions() as other:
        delivery = await asyncio.wait_for(anext(inbox), 5)
        with pytest.raises(ValueError, match="delivery"):
            await other.ack(delivery)


async def test_closed_inbox_stops_iterating(run_registry: RunRegistry) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    inbox = handle.decisions()
    waiting = asyncio.create_task(anext(inbox))
    await asyncio.sleep(0)
    await inbox.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 5)


# --- lifecycle -----------------------------------------------------------------------------


async def test_closed_registry_refuses_calls(registry_database_url: str) -> None:
    run_registry = await RunRegistry.connect(registry_database_url)
    await run_registry.close()
    await run_registry.close()  # idempotent
    with pytest.raises(RegistryClosedError):
        await run_registry.handle_by_thread("thread-1")
    with pytest.raises(RegistryClosedError):
        await run_registry.register("run-1", "agent-a", "thread-1")


async def test_one_listener_connection_whatever_the_number_of_waiters(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handles = [await run_registry.register(f"run-{i}", "agent", f"thread-{i}") for i in range(50)]
    tokens = [handle.cancellation_token() for handle in handles]
    inboxes = [handle.decisions() for handle in handles]
    waiters: list[asyncio.Task[object]] = [asyncio.create_task(anext(inbox)) for inbox in inboxes]
    waiters += [asyncio.create_task(token.wait()) for token in tokens]
    for _ in range(5):
        await asyncio.sleep(0)  # let every waiter start waiting
    rows = await _rows(
        registry_database_url,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = $1",
        LISTENER_APPLICATION_NAME,
    )
    assert rows[0]["n"] == 1
    listener = run_registry.listener
    assert listener is not None
    assert listener.backend_pid is not None
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_another_agent_cannot_read_forward_to_or_cancel_through_by_thread_calls(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    assert await run_registry.handle_by_thread("thread-1", agent_id="agent-b") is None
    assert await run_registry.active_run_id_for_thread("agent-b", "thread-1") is None
    assert (
        await run_registry.forward_decisions_by_thread("agent-b", "thread-1", [decision("c")])
        is None
    )
    assert await run_registry.cancel_active_run_by_thread("thread-1", agent_id="agent-b") is None
    [row] = await _rows(registry_database_url, "SELECT cancel_requested_at FROM registry.runs")
    assert row["cancel_requested_at"] is None, "nothing was written"
    assert await _rows(registry_database_url, "SELECT 1 FROM registry.decisions") == []
    # the owner can do all of it
    owned = await run_registry.handle_by_thread("thread-1", agent_id="agent-a")
    assert owned is not None
    assert owned.run_id == "run-1"
    assert await run_registry.cancel_active_run_by_thread("thread-1", agent_id="agent-a") == "run-1"
