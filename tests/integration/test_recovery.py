"""Ownership leases, resuming and adopting runs, dead letters and the cancelled-orphan sweep."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from registry import InvalidInputError, RegistrySettings, RunRegistry, RunStatus, ToolCallDecision
from registry.database import asyncpg_dsn

SHORT = RegistrySettings(lease_seconds=1.0, heartbeat_interval=0.2, safety_interval=0.2)


async def _sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


async def _expire_leases(url: str, worker_id: str, seconds_ago: float = 1) -> None:
    """What a dead worker leaves behind: leases nobody renews."""
    await _sql(
        url,
        "UPDATE registry.runs SET lease_expires_at = now() - make_interval(secs => $2)"
        " WHERE owner_id = $1",
        worker_id,
        seconds_ago,
    )


def _decision(target: str) -> ToolCallDecision:
    return ToolCallDecision.resume(target, {"ok": target}, 1, decision_id=target)


async def test_resume_owned_runs_continues_a_workers_runs(registry_database_url: str) -> None:
    async with await RunRegistry.connect(registry_database_url, worker_id="w1") as first:
        for i in range(3):
            await first.register(f"run-{i}", "agent", f"thread-{i}")
        await first.remove_by_run_id("run-1")
    async with await RunRegistry.connect(registry_database_url, worker_id="w2") as other:
        await other.register("run-other", "agent", "thread-other")
        assert [handle.run_id for handle in await other.resume_owned_runs()] == ["run-other"]
        async with await RunRegistry.connect(registry_database_url, worker_id="w1") as again:
            resumed = await again.resume_owned_runs()
            assert [handle.run_id for handle in resumed] == ["run-0", "run-2"]
    rows = await _sql(
        registry_database_url, "SELECT run_id FROM registry.runs WHERE lease_expires_at > now()"
    )
    assert rows == [], "closing released every lease"


async def test_heartbeat_renews_leases(registry_database_url: str) -> None:
    async with await RunRegistry.connect(registry_database_url, settings=SHORT) as runs:
        await runs.register("run-1", "agent", "thread-1")
        [before] = await _sql(registry_database_url, "SELECT lease_expires_at FROM registry.runs")
        async with asyncio.timeout(5):
            while True:
                [now] = await _sql(
                    registry_database_url, "SELECT lease_expires_at FROM registry.runs"
                )
                if now["lease_expires_at"] > before["lease_expires_at"]:
                    break
                await asyncio.sleep(0.05)
        assert await runs.adopt_orphaned_runs() == [], "a live worker's runs are not orphans"


async def test_adopt_takes_expired_runs_once(registry_database_url: str) -> None:
    async with await RunRegistry.connect(registry_database_url, worker_id="dead") as dead:
        for i in range(5):
            await dead.register(f"run-{i}", "agent", f"thread-{i}")
        await dead.register("run-done", "agent", "thread-done")
        await dead.remove_by_run_id("run-done")
    await _expire_leases(registry_database_url, "dead")
    async with await RunRegistry.connect(registry_database_url, worker_id="heir") as heir:
        first = await heir.adopt_orphaned_runs(limit=3)
        second = await heir.adopt_orphaned_runs(limit=3)
        assert len(first) == 3
        assert len(second) == 2
        assert await heir.adopt_orphaned_runs() == []
        adopted = sorted(handle.run_id for handle in first + second)
        assert adopted == [f"run-{i}" for i in range(5)]
        rows = await _sql(
            registry_database_url,
            "SELECT count(*) AS n FROM registry.runs WHERE owner_id = 'heir'"
            " AND lease_expires_at > now()",
        )
        assert rows[0]["n"] == 5
        with pytest.raises(InvalidInputError):
            await heir.adopt_orphaned_runs(limit=0)


async def test_racing_adopters_never_share_a_run(registry_database_url: str) -> None:
    async with await RunRegistry.connect(registry_database_url, worker_id="dead") as dead:
        for i in range(60):
            await dead.register(f"run-{i}", "agent", f"thread-{i}")
    await _expire_leases(registry_database_url, "dead")
    adopters = [
        await RunRegistry.connect(registry_database_url, worker_id=f"heir-{n}") for n in range(3)
    ]
    try:

        async def adopt_all(registry: RunRegistry) -> list[str]:
            taken: list[str] = []
            while batch := await registry.adopt_orphaned_runs(limit=7):
                taken += [handle.run_id for handle in batch]
            return taken

        results = await asyncio.gather(*(adopt_all(registry) for registry in adopters))
    finally:
        for registry in adopters:
            await registry.close()
    everything = [run_id for result in results for run_id in result]
    assert sorted(everything) == sorted(f"run-{i}" for i in range(60))
    assert len(set(everything)) == 60


async def test_adopted_inbox_redelivers_unacked_in_order(registry_database_url: str) -> None:
    async with await RunRegistry.connect(registry_database_url, worker_id="dead") as dead:
        handle = await dead.register("run-1", "agent", "thread-1")
        await dead.forward_decisions_by_run_id("run-1", [_decision(f"d{i}") for i in range(4)])
        async with handle.decisions() as inbox:
            first = await asyncio.wait_for(anext(inbox), 5)
            await inbox.ack(first)
            await asyncio.wait_for(anext(inbox), 5)  # d1 delivered, never acked (a crash)
    await _expire_leases(registry_database_url, "dead")
    async with await RunRegistry.connect(registry_database_url, worker_id="heir") as heir:
        [adopted] = await heir.adopt_orphaned_runs()
        async with adopted.decisions() as inbox:
            got = [await asyncio.wait_for(anext(inbox), 5) for _ in range(3)]
    # the dead worker's inbox claimed all four in one batch; d0 alone was acked
    assert [(d.decision.decision_id, d.attempts) for d in got] == [
        ("d1", 2),
        ("d2", 2),
        ("d3", 2),
    ]


async def test_decision_is_dead_lettered_after_max_attempts(registry_database_url: str) -> None:
    settings = RegistrySettings(max_delivery_attempts=2, inbox_batch=1)
    async with await RunRegistry.connect(registry_database_url, settings=settings) as runs:
        handle = await runs.register("run-1", "agent", "thread-1")
        await runs.forward_decisions_by_run_id("run-1", [_decision("poison"), _decision("ok")])
        for attempt in (1, 2):
            async with handle.decisions() as inbox:
                delivery = await asyncio.wait_for(anext(inbox), 5)
                assert (delivery.decision.decision_id, delivery.attempts) == ("poison", attempt)
        async with handle.decisions() as inbox:
            delivery = await asyncio.wait_for(anext(inbox), 5)
            assert delivery.decision.decision_id == "ok"
    rows = await _sql(
        registry_database_url,
        "SELECT decision_id, status, attempts, drop_reason FROM registry.decisions ORDER BY id",
    )
    assert (rows[0]["status"], rows[0]["attempts"]) == ("dropped", 2)
    assert rows[0]["drop_reason"] == "dead-lettered after 2 delivery attempts"


async def test_cancel_while_owner_was_down_trips_the_adopted_token(
    registry_database_url: str,
) -> None:
    async with await RunRegistry.connect(registry_database_url, worker_id="dead") as dead:
        await dead.register("run-1", "agent", "thread-1")
    await _expire_leases(registry_database_url, "dead")
    async with await RunRegistry.connect(registry_database_url, worker_id="heir") as heir:
        assert await heir.cancel_active_run_by_thread("thread-1") == "run-1"
        [adopted] = await heir.adopt_orphaned_runs()
        assert adopted.cancellation_token().is_cancelled()
    async with await RunRegistry.connect(registry_database_url, worker_id="dead") as back:
        # the same worker restarting would see it too
        assert await back.resume_owned_runs() == []


async def test_sweep_finishes_cancelled_orphans(registry_database_url: str) -> None:
    async with await RunRegistry.connect(registry_database_url, worker_id="dead") as dead:
        for i in range(3):
            await dead.register(f"run-{i}", "agent", f"thread-{i}")
        await dead.forward_decisions_by_run_id("run-0", [_decision("pending")])
        await dead.cancel_active_run_by_id("run-0")
        await dead.cancel_active_run_by_id("run-1")
    await _expire_leases(registry_database_url, "dead", seconds_ago=60)
    async with await RunRegistry.connect(registry_database_url, settings=SHORT) as sweeper:
        watched = await sweeper.handle_by_run_id("run-0")
        assert watched is not None
        inbox = watched.decisions()
        swept = await sweeper.sweep_cancelled_orphans()
        assert sorted(swept) == ["run-0", "run-1"]
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(inbox), 5)
        for run_id, status in (("run-0", "cancelled"), ("run-1", "cancelled"), ("run-2", "active")):
            record = await sweeper.run(run_id)
            assert record is not None
            assert record.status is RunStatus(status)
    rows = await _sql(registry_database_url, "SELECT status, drop_reason FROM registry.decisions")
    assert rows[0]["status"] == "dropped"
    assert rows[0]["drop_reason"] == "run run-0 cancelled while its owner was gone"
