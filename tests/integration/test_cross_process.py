"""Two processes, one database: tokens, inboxes and supersedes reach across the boundary.

The other process is ``tests.helpers.worker``. Both sides run with a safety re-check interval
far longer than the deadlines here, so only LISTEN/NOTIFY can wake them in time: a passing
test means the wake-up crossed processes, not that a periodic re-read happened to run.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from registry import (
    DecisionDelivery,
    DecisionInbox,
    RegistrySettings,
    RunRegistry,
    RunStatus,
    ToolCallDecision,
)
from tests.helpers.database import decisions_of_run
from tests.helpers.processes import workers

#: how long a cross-process wake-up may take here; it should take milliseconds
WAKE_DEADLINE = 5.0
#: longer than any test: the safety net must not be what wakes a waiter
SAFETY_INTERVAL = 60.0


@pytest.fixture
def registry_settings() -> RegistrySettings:
    return RegistrySettings(safety_interval=SAFETY_INTERVAL)


def worker_options() -> tuple[str, ...]:
    return ("--safety-interval", str(SAFETY_INTERVAL))


def make_decisions(prefix: str, count: int) -> list[dict[str, Any]]:
    """``count`` distinct decisions in the seed's JSON shape, with non-trivial results."""
    decisions = []
    for index in range(count):
        if index % 3 == 2:
            decision = ToolCallDecision.cancel(
                f"{prefix}-call-{index}",
                reason=f"denied «{index}»",
                updated_at=1_700_000_000_000 + index,
                decision_id=f"{prefix}-{index}",
            )
        else:
            decision = ToolCallDecision.resume(
                f"{prefix}-call-{index}",
                {"approved": True, "index": index, "note": "ünïcode ✓", "nested": [index, None]},
                updated_at=1_700_000_000_000 + index,
                decision_id=f"{prefix}-{index}",
            )
        decisions.append(decision.to_dict())
    return decisions


async def take(inbox: DecisionInbox, count: int, *, ack: bool = True) -> list[DecisionDelivery]:
    """The inbox's next ``count`` deliveries, each within the wake-up deadline."""
    deliveries = []
    for _ in range(count):
        delivery = await asyncio.wait_for(anext(inbox), WAKE_DEADLINE)
        if ack:
            assert await inbox.ack(delivery)
        deliveries.append(delivery)
    return deliveries


async def test_cancel_here_trips_the_token_in_another_process(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    async with workers(registry_database_url) as pool:
        watcher = await pool.start_ready("watch-cancel", "run-1", options=worker_options())

        assert await run_registry.cancel_active_run_by_id("run-1")
        # the watcher's safety re-check is a minute away: only the notification is this quick
        await watcher.expect("cancelled", timeout=WAKE_DEADLINE)

        assert await watcher.exit_code() == 0


async def test_cancel_in_another_process_trips_the_token_here(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    token = handle.cancellation_token()
    other = await run_registry.register("run-2", "agent-a", "thread-2")
    untouched = other.cancellation_token()

    async with workers(registry_database_url) as pool:
        canceller = await pool.start("cancel", "run-1", options=worker_options())
        await canceller.expect("cancelled true")
        await asyncio.wait_for(token.wait(), WAKE_DEADLINE)

    assert token.is_cancelled()
    assert not untouched.is_cancelled()
    record = await run_registry.run("run-1")
    assert record is not None
    # a cancel is a request: the run stays active until its owner removes it
    assert record.status is RunStatus.ACTIVE
    assert record.cancel_requested_at is not None


async def test_forward_in_another_process_reaches_the_inbox_here_in_order(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    first, second = make_decisions("a", 4), make_decisions("b", 3)

    async with handle.decisions() as inbox, workers(registry_database_url) as pool:
        # already waiting when the forwards land, so the notification is what wakes it
        reading = asyncio.create_task(take(inbox, len(first) + len(second)))
        forwarder = await pool.start("forward", "run-1", json.dumps(first))
        await forwarder.expect("forwarded run-1")
        forwarder = await pool.start("forward", "run-1", json.dumps(second))
        await forwarder.expect("forwarded run-1")
        deliveries = await asyncio.wait_for(reading, WAKE_DEADLINE)

    assert [delivery.decision.to_dict() for delivery in deliveries] == first + second
    assert [delivery.attempts for delivery in deliveries] == [1] * 7
    ids = [delivery.delivery_id for delivery in deliveries]
    assert ids == sorted(ids)
    rows = await decisions_of_run(registry_database_url, "run-1")
    assert [row["status"] for row in rows] == ["acked"] * 7


async def test_forward_here_reaches_the_inbox_in_another_process_exactly(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    first, second = make_decisions("a", 5), make_decisions("b", 5)
    expected = first + second

    async with workers(registry_database_url) as pool:
        reader = await pool.start_ready(
            "inbox", "run-1", str(len(expected)), options=worker_options()
        )
        assert await run_registry.forward_decisions_by_run_id("run-1", first) is not None
        # a retried forward: its decision ids are stored already, so nothing is delivered twice
        assert await run_registry.forward_decisions_by_run_id("run-1", first) is not None
        assert await run_registry.forward_decisions_by_thread("agent-a", "thread-1", second)

        lines = [await reader.delivery(timeout=WAKE_DEADLINE) for _ in expected]
        await reader.expect("done")
        assert await reader.exit_code() == 0

    assert [line["decision"] for line in lines] == expected
    assert all(line["acked"] and line["attempts"] == 1 for line in lines)
    assert all(line["run_id"] == "run-1" for line in lines)
    rows = await decisions_of_run(registry_database_url, "run-1")
    assert [row["decision_id"] for row in rows] == [d["decision_id"] for d in expected]
    assert [row["status"] for row in rows] == ["acked"] * len(expected)


async def test_register_in_another_process_supersedes_the_run_here(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handle = await run_registry.register("run-old", "agent-a", "thread-1")
    token = handle.cancellation_token()
    await run_registry.forward_decisions_by_run_id("run-old", make_decisions("a", 1))

    async with handle.decisions() as inbox, workers(registry_database_url) as pool:
        # claimed but not acknowledged when the supersede lands
        [unacked] = await take(inbox, 1, ack=False)
        rest = asyncio.create_task(take(inbox, 1))

        registrar = await pool.start(
            "register", "run-new", "agent-b", "thread-1", options=("--worker-id", "other")
        )
        await registrar.expect("registered")
        await asyncio.wait_for(token.wait(), WAKE_DEADLINE)
        # the inbox ends instead of yielding again
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(rest, WAKE_DEADLINE)
        assert not await inbox.ack(unacked)

    assert token.is_cancelled()
    old = await run_registry.run("run-old")
    assert old is not None
    assert old.status is RunStatus.SUPERSEDED
    assert old.end_reason is not None
    assert "run-new" in old.end_reason
    current = await run_registry.handle_by_thread("thread-1")
    assert current is not None
    assert (current.run_id, current.agent_id, current.record.owner_id) == (
        "run-new",
        "agent-b",
        "other",
    )
    [row] = await decisions_of_run(registry_database_url, "run-old")
    assert row["status"] == "dropped"
    assert "superseded by run run-new" in row["drop_reason"]


async def test_unacked_decision_is_redelivered_after_its_inbox_process_is_killed(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    decisions = make_decisions("a", 3)
    await run_registry.forward_decisions_by_run_id("run-1", decisions)

    async with workers(registry_database_url) as pool:
        # acks the first, then holds the rest unacknowledged until it dies
        reader = await pool.start_ready(
            "inbox", "run-1", "3", "--ack-first", "1", "--hold", options=worker_options()
        )
        lines = [await reader.delivery() for _ in decisions]
        assert [line["acked"] for line in lines] == [True, False, False]
        assert [line["attempts"] for line in lines] == [1, 1, 1]
        reader.kill()
        assert await reader.exit_code() == -9

    handle = await run_registry.handle_by_run_id("run-1")
    assert handle is not None
    async with handle.decisions() as inbox:
        redelivered = await take(inbox, 2)
        # nothing else is owed: the acknowledged one stays delivered once
        extra = asyncio.create_task(take(inbox, 1))
        await run_registry.remove_by_run_id("run-1")
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(extra, WAKE_DEADLINE)

    assert [delivery.decision.to_dict() for delivery in redelivered] == decisions[1:]
    assert [delivery.attempts for delivery in redelivered] == [2, 2]
    assert [delivery.delivery_id for delivery in redelivered] == [
        line["delivery_id"] for line in lines[1:]
    ]
    rows = await decisions_of_run(registry_database_url, "run-1")
    assert [(row["status"], row["attempts"]) for row in rows] == [
        ("acked", 1),
        ("acked", 2),
        ("acked", 2),
    ]
