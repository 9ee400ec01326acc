"""Races: many registers on one thread, many forwards to one run, forwards against a supersede.

Contenders use several :class:`RunRegistry` instances (separate pools, separate LISTEN
connections) and, where it says so, separate processes. Every race starts from a barrier
(an ``asyncio.Event`` or a ``go`` line), and the outcome is checked in the tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from registry import (
    DecisionDelivery,
    ForwardedDecision,
    RegistrySettings,
    RunHandle,
    RunRegistry,
    ToolCallDecision,
)
from registry.database import asyncpg_dsn
from tests.helpers.database import decisions_of_run, fetch, runs_of_thread
from tests.helpers.processes import Worker, workers

#: bound on any one race finishing; they take well under a second
RACE_DEADLINE = 20.0


@pytest.fixture
def registry_settings() -> RegistrySettings:
    # small pools: three registries and a few processes share one server with other suites
    return RegistrySettings(pool_size=4)


@pytest.fixture
async def registries(
    run_registry: RunRegistry, registry_database_url: str, registry_settings: RegistrySettings
) -> AsyncIterator[list[RunRegistry]]:
    """Three connected registries on the test's database, as three processes would hold."""
    extra: list[RunRegistry] = []
    try:
        for worker_id in ("test-worker-2", "test-worker-3"):
            extra.append(
                await RunRegistry.connect(
                    registry_database_url, worker_id=worker_id, settings=registry_settings
                )
            )
        yield [run_registry, *extra]
    finally:
        for registry in extra:
            await registry.close()


def decision(target_id: str, decision_id: str, index: int = 0) -> ToolCallDecision:
    return ToolCallDecision.resume(
        target_id, {"index": index}, updated_at=1_700_000_000_000 + index, decision_id=decision_id
    )


async def assert_one_active_run_and_a_supersede_chain(url: str, thread_id: str, count: int) -> str:
    """Check the thread's runs: one active, every other superseded by exactly one successor.

    Registrations on a thread are serialised, so each one supersedes the one before it: the
    ``superseded_by`` links form a single chain through all ``count`` runs, ending at the
    active run. Returns the active run's id.
    """
    rows = await runs_of_thread(url, thread_id)
    assert len(rows) == count
    statuses = [row["status"] for row in rows]
    assert statuses.count("active") == 1, statuses
    assert statuses.count("superseded") == count - 1, statuses
    [active] = [str(row["run_id"]) for row in rows if row["status"] == "active"]

    successor = {row["run_id"]: row["superseded_by"] for row in rows if row["superseded_by"]}
    assert len(successor) == count - 1
    assert len(set(successor.values())) == count - 1, "a run superseded two runs"
    [first] = {row["run_id"] for row in rows} - set(successor.values())
    chain = [first]
    while chain[-1] in successor:
        chain.append(successor[chain[-1]])
    assert len(chain) == count, f"the supersede links do not form one chain: {chain}"
    assert chain[-1] == active
    for row in rows:
        if row["status"] == "superseded":
            assert row["end_reason"] == f"superseded by run {row['superseded_by']}"
    return active


async def test_concurrent_registers_on_one_thread_leave_one_active_run(
    registries: list[RunRegistry], registry_database_url: str
) -> None:
    count = 50
    go = asyncio.Event()

    async def register(index: int) -> RunHandle:
        registry = registries[index % len(registries)]
        await go.wait()
        return await registry.register(f"run-{index:02}", f"agent-{index % 3}", "thread-1")

    tasks = [asyncio.create_task(register(index)) for index in range(count)]
    go.set()
    handles = await asyncio.wait_for(asyncio.gather(*tasks), RACE_DEADLINE)

    active = await assert_one_active_run_and_a_supersede_chain(
        registry_database_url, "thread-1", count
    )
    for registry in registries:
        found = await registry.handle_by_thread("thread-1")
        assert found is not None
        assert found.run_id == active
    # every superseded run's token trips in the registry that registered it; the winner's not
    superseded = [handle for handle in handles if handle.run_id != active]
    await asyncio.wait_for(
        asyncio.gather(*(handle.cancellation_token().wait() for handle in superseded)),
        RACE_DEADLINE,
    )
    [winner] = [handle for handle in handles if handle.run_id == active]
    assert not await winner.cancellation_token().refresh()


async def test_concurrent_registers_from_many_processes_leave_one_active_run(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    processes, per_process = 8, 4
    first = await run_registry.register("run-first", "agent-a", "thread-1")
    token = first.cancellation_token()

    async with workers(registry_database_url) as pool:
        started = [
            await pool.start(
                "register-many",
                "thread-1",
                f"agent-{index}",
                f"p{index}",
                str(per_process),
                options=("--barrier", "--worker-id", f"process-{index}"),
            )
            for index in range(processes)
        ]
        await asyncio.gather(*(worker.expect("ready") for worker in started))
        for worker in started:
            await worker.send("go")

        async def registered(worker: Worker) -> list[str]:
            lines = [await worker.line() for _ in range(per_process + 1)]
            assert lines[-1] == "done", lines
            assert await worker.exit_code() == 0
            return sorted(line.removeprefix("registered ") for line in lines[:-1])

        reported = await asyncio.gather(*(registered(worker) for worker in started))

    for index, run_ids in enumerate(reported):
        assert run_ids == [f"p{index}-{number}" for number in range(per_process)]
    await assert_one_active_run_and_a_supersede_chain(
        registry_database_url, "thread-1", processes * per_process + 1
    )
    await asyncio.wait_for(token.wait(), RACE_DEADLINE)


async def test_concurrent_forwards_of_one_decision_id_store_it_once(
    registries: list[RunRegistry], registry_database_url: str
) -> None:
    handle = await registries[0].register("run-1", "agent-a", "thread-1")
    shared = decision("call-shared", "shared")
    go = asyncio.Event()

    async def forward(index: int) -> ForwardedDecision | None:
        registry = registries[index % len(registries)]
        await go.wait()
        batch = [shared, decision(f"call-{index}", f"own-{index}", index)]
        if index % 2:
            return await registry.forward_decisions_by_run_id("run-1", batch)
        return await registry.forward_decisions_by_thread("agent-a", "thread-1", batch)

    async with workers(registry_database_url) as pool:
        # three more contenders in other processes, released by the same barrier
        others = [
            await pool.start(
                "forward", "run-1", json.dumps([shared.to_dict()]), options=("--barrier",)
            )
            for _ in range(3)
        ]
        await asyncio.gather(*(worker.expect("ready") for worker in others))
        tasks = [asyncio.create_task(forward(index)) for index in range(30)]
        go.set()
        for worker in others:
            await worker.send("go")
        results = await asyncio.wait_for(asyncio.gather(*tasks), RACE_DEADLINE)
        for worker in others:
            await worker.expect("forwarded run-1")

    assert results == [ForwardedDecision("thread-1", "run-1")] * 30
    rows = await decisions_of_run(registry_database_url, "run-1")
    stored = [row["decision_id"] for row in rows]
    assert stored.count("shared") == 1
    assert sorted(stored) == sorted(["shared", *(f"own-{index}" for index in range(30))])

    async with handle.decisions() as inbox:
        delivered = [
            (await asyncio.wait_for(anext(inbox), RACE_DEADLINE)).decision.decision_id for _ in rows
        ]
    assert sorted(delivered) == sorted(stored)


async def race_forwards_to_one_run(
    registries: list[RunRegistry], url: str, run_id: str, forwards: int, per_forward: int
) -> None:
    """Forward ``forwards`` batches to one run at once while its inbox reads; check delivery."""
    total = forwards * per_forward
    thread_id = f"thread-of-{run_id}"
    handle = await registries[0].register(run_id, "agent-a", thread_id)
    go = asyncio.Event()
    delivered: list[DecisionDelivery] = []

    async def forward(number: int) -> ForwardedDecision | None:
        registry = registries[number % len(registries)]
        batch = [
            decision(f"call-{number}-{index}", f"f{number}-{index}", index)
            for index in range(per_forward)
        ]
        await go.wait()
        return await registry.forward_decisions_by_run_id(run_id, batch)

    async def consume() -> None:
        async with handle.decisions() as inbox:
            # acknowledged after the race, so the inbox claims as often as it can during it
            async for delivery in inbox:
                delivered.append(delivery)
                if len(delivered) == total:
                    break
            for delivery in delivered:
                assert await inbox.ack(delivery)

    # the inbox is open and reading while the forwards commit
    consumer = asyncio.create_task(consume())
    try:
        tasks = [asyncio.create_task(forward(number)) for number in range(forwards)]
        go.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), RACE_DEADLINE)
        assert results == [ForwardedDecision(thread_id, run_id)] * forwards
        # generous: even a lost wake-up is caught by the safety re-check every second
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(consumer), 5)
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer

    ids = [delivery.decision.decision_id for delivery in delivered]
    rows = await decisions_of_run(url, run_id)
    assert len(rows) == total
    missing = [
        (row["id"], row["decision_id"], row["status"])
        for row in rows
        if row["decision_id"] not in set(ids)
    ]
    assert not missing, (
        f"{run_id}: {len(missing)} of {total} decisions were never delivered to the open "
        f"inbox (it delivered {len(delivered)}); (id, decision_id, status): {missing[:10]}"
    )
    assert len(ids) == len(set(ids)) == total
    assert all(delivery.attempts == 1 for delivery in delivered)
    assert [row["status"] for row in rows] == ["acked"] * total
    for number in range(forwards):
        indices = [int(id_.split("-")[1]) for id_ in ids if id_.startswith(f"f{number}-")]
        assert indices == list(range(per_forward)), f"forward {number} out of order: {indices}"


async def test_concurrent_forwards_to_one_run_are_each_delivered_once_in_order(
    registries: list[RunRegistry], registry_database_url: str
) -> None:
    # a few rounds, each on a fresh run: the interleavings differ from one to the next
    for round_ in range(3):
        await race_forwards_to_one_run(
            registries, registry_database_url, f"run-{round_}", forwards=30, per_forward=10
        )


async def test_a_forward_that_commits_after_a_later_one_still_reaches_the_open_inbox(
    registries: list[RunRegistry], registry_database_url: str
) -> None:
    """Decision ids are drawn when a forward runs, not when it commits.

    A forward holding a lower id can commit after a forward with a higher one. Here a trigger
    in this test's database holds the first forward's transaction open (on an advisory lock
    the test owns) after its row got its id, while a second forward commits and the open
    inbox reads it. The first decision must still reach the inbox once it commits.
    """
    lock_key = 4242
    handle = await registries[0].register("run-1", "agent-a", "thread-1")
    admin = await asyncpg.connect(asyncpg_dsn(registry_database_url))
    try:
        await admin.execute(
            f"""
            CREATE FUNCTION hold_slow_forward() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_advisory_xact_lock_shared({lock_key});
                RETURN NULL;
            END $$;
            CREATE TRIGGER hold_slow_forward AFTER INSERT ON registry.decisions FOR EACH ROW
                WHEN (NEW.target_id = 'call-slow') EXECUTE FUNCTION hold_slow_forward();
            """
        )
        await admin.execute("SELECT pg_advisory_lock($1)", lock_key)

        async with handle.decisions() as inbox:
            slow = asyncio.create_task(
                registries[1].forward_decisions_by_run_id("run-1", [decision("call-slow", "slow")])
            )
            # the slow forward has drawn its id and waits on the lock, uncommitted
            deadline = time.monotonic() + RACE_DEADLINE
            while not await admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ):
                assert time.monotonic() < deadline, "the slow forward never reached the trigger"
                await asyncio.sleep(0.01)

            assert await registries[2].forward_decisions_by_run_id(
                "run-1", [decision("call-fast", "fast")]
            )
            fast = await asyncio.wait_for(anext(inbox), RACE_DEADLINE)
            assert fast.decision.decision_id == "fast"
            assert await inbox.ack(fast)

            await admin.execute("SELECT pg_advisory_unlock($1)", lock_key)
            assert await asyncio.wait_for(slow, RACE_DEADLINE) is not None
            # the safety re-check runs every second; three of them is plenty
            try:
                late = await asyncio.wait_for(anext(inbox), 3.5)
            except TimeoutError:
                rows = await decisions_of_run(registry_database_url, "run-1")
                pytest.fail(
                    "the decision of the forward that committed last was never delivered to "
                    f"the open inbox; rows: {rows}"
                )
            assert late.decision.decision_id == "slow"
    finally:
        await admin.close()


async def race_forwards_against_a_supersede(
    registries: list[RunRegistry], url: str, round_: int
) -> None:
    """Forward to a run from six tasks until a register supersedes it mid-stream; check rows."""
    here, forwarding, registering = registries
    thread_id, old_id, new_id = f"thread-{round_}", f"old-{round_}", f"new-{round_}"
    handle = await here.register(old_id, "agent-a", thread_id)
    token = handle.cancellation_token()
    acked: list[str] = []
    late: list[str] = []  # delivered, but dropped before its ack landed
    accepted: list[list[str]] = []
    refused: list[list[str]] = []
    enough = asyncio.Event()

    async def consume() -> None:
        async with handle.decisions() as inbox:
            async for delivery in inbox:
                if await inbox.ack(delivery):
                    acked.append(delivery.decision.decision_id)
                else:
                    late.append(delivery.decision.decision_id)
                if len(acked) >= 6:
                    enough.set()

    async def forward(forwarder: int) -> None:
        # keep forwarding until the run is gone; the supersede lands somewhere in between
        for number in range(500):
            ids = [f"{old_id}-{forwarder}-{number}-{index}" for index in range(3)]
            batch = [decision(f"call-{id_}", id_, index) for index, id_ in enumerate(ids)]
            if number % 2:
                result = await forwarding.forward_decisions_by_run_id(old_id, batch)
            else:
                result = await forwarding.forward_decisions_by_thread("agent-a", thread_id, batch)
            if result is None:
                refused.append(ids)
                return
            assert result == ForwardedDecision(thread_id, old_id)
            accepted.append(ids)
        raise AssertionError("the supersede never stopped the forwards")

    async def supersede() -> None:
        await enough.wait()
        # another agent, so that forwards by thread do not land on the new run
        await registering.register(new_id, "agent-b", thread_id)

    consumer = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(
            asyncio.gather(*(forward(forwarder) for forwarder in range(6)), supersede()),
            RACE_DEADLINE,
        )
        # the superseded run's inbox ends, and its token trips
        await asyncio.wait_for(asyncio.shield(consumer), RACE_DEADLINE)
        await asyncio.wait_for(token.wait(), RACE_DEADLINE)
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer

    rows = await decisions_of_run(url, old_id)
    status = {row["decision_id"]: row["status"] for row in rows}
    # all or none: an accepted forward stored every decision, a refused one none
    assert sorted(status) == sorted(id_ for ids in accepted for id_ in ids)
    assert not {id_ for ids in refused for id_ in ids} & set(status)
    assert len(refused) == 6
    assert acked, "the supersede should land after some decisions were applied"
    # each decision ended acknowledged by the inbox or dropped with the reason, none open
    assert {id_ for id_, state in status.items() if state == "acked"} == set(acked)
    dropped = [row for row in rows if row["status"] == "dropped"]
    assert {row["decision_id"] for row in dropped} >= set(late)
    assert len(acked) + len(dropped) == len(rows), status
    assert all(row["drop_reason"] == f"run {old_id} superseded by run {new_id}" for row in dropped)


async def test_forwards_racing_a_supersede_end_acked_or_dropped_never_pending(
    registries: list[RunRegistry], registry_database_url: str
) -> None:
    for round_ in range(3):
        await race_forwards_against_a_supersede(registries, registry_database_url, round_)

    leftover = await fetch(
        registry_database_url,
        "SELECT d.run_id, d.decision_id, d.status FROM registry.decisions d"
        " JOIN registry.runs r USING (run_id)"
        " WHERE r.status <> 'active' AND d.status IN ('pending', 'delivered')",
    )
    assert leftover == []
