"""Several processes register on one thread at the same moment, under each conflict policy.

The registrars are ``tests.helpers.worker`` processes released together by a barrier line.
Whatever the interleaving, the thread never has two active runs: ``supersede`` leaves the last
one active, ``reject`` exactly one (the others get ``ThreadBusyError``), ``enqueue`` one active
and the others queued, promoted one at a time in order of arrival as each one finishes. A
queued run whose process died is promoted all the same, and then adopted like any orphan.
"""

from __future__ import annotations

import asyncio

import pytest

from registry import RegistrySettings, RunRegistry, RunStatus
from tests.helpers.database import fetch
from tests.helpers.processes import Worker, workers

#: processes racing on the thread
RACERS = 4
#: how long a cross-process wake-up may take here; it should take milliseconds
WAKE_DEADLINE = 5.0
#: longer than any test: only LISTEN/NOTIFY can wake a queued run in time
SAFETY_INTERVAL = 60.0
OPTIONS = ("--barrier", "--safety-interval", str(SAFETY_INTERVAL))


@pytest.fixture
def registry_settings() -> RegistrySettings:
    return RegistrySettings(safety_interval=SAFETY_INTERVAL)


async def race(racers: list[Worker]) -> list[str]:
    """Release every racer at once; return each one's first line, in the racers' order."""
    await asyncio.gather(*(racer.send("go") for racer in racers))
    return list(await asyncio.gather(*(racer.line() for racer in racers)))


async def statuses(registry: RunRegistry) -> dict[str, RunStatus]:
    return {
        record.run_id: record.status for record in await registry.list_runs(thread_id="thread-1")
    }


async def test_racing_supersedes_leave_one_active(
    registry_database_url: str, run_registry: RunRegistry
) -> None:
    async with workers(registry_database_url) as pool:
        racers = [
            await pool.start_ready("register", f"run-{i}", "agent-a", "thread-1", options=OPTIONS)
            for i in range(RACERS)
        ]
        assert await race(racers) == ["registered"] * RACERS
    now = await statuses(run_registry)
    assert sorted(now.values()) == sorted([RunStatus.ACTIVE] + [RunStatus.SUPERSEDED] * 3)


async def test_racing_rejects_leave_exactly_one_registered(
    registry_database_url: str, run_registry: RunRegistry
) -> None:
    async with workers(registry_database_url) as pool:
        racers = [
            await pool.start_ready(
                "register",
                f"run-{i}",
                "agent-a",
                "thread-1",
                "--on-conflict",
                "reject",
                options=OPTIONS,
            )
            for i in range(RACERS)
        ]
        lines = await race(racers)
    winners = [f"run-{i}" for i, line in enumerate(lines) if line == "registered"]
    assert len(winners) == 1, lines
    busy = [line for line in lines if line.startswith("error ThreadBusyError")]
    assert len(busy) == RACERS - 1, lines
    assert all(f"busy with the active run '{winners[0]}'" in line for line in busy), lines
    # nothing of the losers was written
    assert await statuses(run_registry) == {winners[0]: RunStatus.ACTIVE}


async def test_racing_enqueues_run_one_at_a_time_in_order_of_arrival(
    registry_database_url: str, run_registry: RunRegistry
) -> None:
    async with workers(registry_database_url) as pool:
        racers = {
            f"run-{i}": await pool.start_ready(
                "enqueue", f"run-{i}", "agent-a", "thread-1", options=OPTIONS
            )
            for i in range(RACERS)
        }
        lines = await race(list(racers.values()))
        assert sorted(lines) == ["registered active"] + ["registered queued"] * (RACERS - 1)
        records = await run_registry.list_runs(thread_id="thread-1")
        [first] = [record.run_id for record in records if record.status is RunStatus.ACTIVE]
        queue = sorted(
            (record for record in records if record.status is RunStatus.QUEUED),
            key=lambda record: (record.queued_at, record.run_id),
        )
        expected = [first] + [record.run_id for record in queue]

        promoted: list[str] = []
        for position, run_id in enumerate(expected):
            worker = racers[run_id]
            await worker.expect("active", WAKE_DEADLINE)
            promoted.append(run_id)
            now = await statuses(run_registry)
            assert [run for run, status in now.items() if status is RunStatus.ACTIVE] == [run_id]
            assert sum(status is RunStatus.QUEUED for status in now.values()) == (
                RACERS - 1 - position
            )
            await worker.send("finish")
            await worker.expect("finished true")
            assert await worker.exit_code() == 0
    assert promoted == expected
    assert set((await statuses(run_registry)).values()) == {RunStatus.COMPLETED}


async def test_a_queued_run_whose_process_died_is_promoted_then_adopted(
    registry_database_url: str, run_registry: RunRegistry
) -> None:
    first = await run_registry.register("run-1", "agent-a", "thread-1")
    async with workers(registry_database_url) as pool:
        queued = await pool.start("enqueue", "run-2", "agent-a", "thread-1")
        await queued.expect("registered queued")
        queued.kill()
        assert await queued.exit_code() == -9
    assert await first.finish("completed")
    record = await run_registry.run("run-2")
    assert record is not None
    assert record.status is RunStatus.ACTIVE  # promoted, with a lease its owner never renews
    await fetch(
        registry_database_url,
        "UPDATE registry.runs SET lease_expires_at = now() - interval '1 second' WHERE run_id = $1",
        "run-2",
    )
    [adopted] = await run_registry.adopt_orphaned_runs()
    assert (adopted.run_id, adopted.record.owner_epoch) == ("run-2", 2)
    async with run_registry.continue_run(adopted):
        pass
    assert (await statuses(run_registry))["run-2"] is RunStatus.COMPLETED
