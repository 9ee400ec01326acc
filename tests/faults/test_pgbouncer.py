"""Behind pgbouncer in transaction pooling mode (2 server connections), nothing fails.

In transaction mode each transaction may run on another server connection, so nothing may
outlive a transaction: no session prepared statement (asyncpg's statement cache), no LISTEN.
LISTEN goes to the server directly (``listen_url``) or not at all (``listen=False``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from registry import RegistrySettings, RunRegistry, RunStatus, ToolCallDecision
from tests.helpers.pgbouncer import Pgbouncer

pytestmark = pytest.mark.timeout(120)

TASKS = 12
CALLS_PER_TASK = 40


async def _one_task(registry: RunRegistry, task: int, failures: list[str], prefix: str) -> None:
    """Register, find, forward to, read, cancel and remove runs on threads of its own."""
    for i in range(CALLS_PER_TASK):
        run_id, thread_id = f"{prefix}run-{task}-{i}", f"{prefix}thread-{task}-{i}"
        step = "register"
        try:
            await registry.register(run_id, "agent", thread_id)
            step = "handle_by_thread"
            handle = await registry.handle_by_thread(thread_id)
            assert handle is not None
            assert handle.run_id == run_id, handle
            step = "forward_decisions_by_run_id"
            decision = ToolCallDecision.resume(f"call-{i}", True, i, decision_id=f"d-{i}")
            forwarded = await registry.forward_decisions_by_run_id(run_id, [decision])
            assert forwarded is not None
            assert forwarded.run_id == run_id, forwarded
            step = "run"
            record = await registry.run(run_id)
            assert record is not None
            assert record.status is RunStatus.ACTIVE, record
            step = "cancel_active_run_by_id"
            assert await registry.cancel_active_run_by_id(run_id)
            step = "remove_by_run_id"
            assert await registry.remove_by_run_id(run_id)
            step = "run after remove"
            record = await registry.run(run_id)
            assert record is not None
            assert record.status is RunStatus.CANCELLED, record
        except Exception as exc:
            failures.append(f"task {task} call {i} {step}: {type(exc).__module__}.{exc!r}")
            if len(failures) > 20:
                return


async def _workload(registry: RunRegistry, prefix: str = "") -> list[str]:
    failures: list[str] = []
    tasks: list[Awaitable[None]] = [_one_task(registry, t, failures, prefix) for t in range(TASKS)]
    async with asyncio.timeout(90):
        await asyncio.gather(*tasks)
    return failures


async def test_twelve_tasks_through_pgbouncer_without_statement_cache_and_direct_listen_never_fail(
    pgbouncer: Pgbouncer, registry_database_url: str
) -> None:
    settings = RegistrySettings(statement_cache_size=0)
    async with await RunRegistry.connect(
        pgbouncer.url(registry_database_url),
        listen_url=registry_database_url,
        settings=settings,
    ) as registry:
        failures = await _workload(registry)
    assert not failures, f"{len(failures)} calls failed through pgbouncer:\n" + "\n".join(
        failures[:10]
    )


async def test_with_default_settings_the_lane_stops_caching_statements_after_the_first_miss(
    pgbouncer: Pgbouncer, registry_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncpg's default statement cache cannot work behind transaction pooling: the first calls
    # to miss a prepared statement fail as transient (nothing ran), the lane stops caching and
    # says so, and from then on nothing fails
    settings = RegistrySettings()
    async with await RunRegistry.connect(
        pgbouncer.url(registry_database_url), listen=False, settings=settings
    ) as registry:
        first = await _workload(registry)
        second = await _workload(registry, prefix="again-")
    assert len(first) <= settings.pool_size, first
    assert all("SQLSTATE 26000" in failure or "SQLSTATE 42P05" in failure for failure in first)
    assert not second, f"{len(second)} calls failed after the switch:\n" + "\n".join(second[:10])
    if first:
        assert any("statement_cache_size=0" in record.getMessage() for record in caplog.records)


async def test_a_cancel_through_pgbouncer_trips_the_token_of_a_registry_listening_directly(
    pgbouncer: Pgbouncer, registry_database_url: str
) -> None:
    through_bouncer = pgbouncer.url(registry_database_url)
    # a long safety interval: only the notification can trip the token in time
    holder_settings = RegistrySettings(safety_interval=60, statement_cache_size=0)
    steerer_settings = RegistrySettings(statement_cache_size=0)
    async with (
        await RunRegistry.connect(
            through_bouncer, listen_url=registry_database_url, settings=holder_settings
        ) as holder,
        await RunRegistry.connect(
            through_bouncer, listen=False, settings=steerer_settings
        ) as steerer,
    ):
        handle = await holder.register("run-1", "agent", "thread-1")
        token = handle.cancellation_token()
        assert await steerer.cancel_active_run_by_id("run-1")
        async with asyncio.timeout(5):
            await token.wait()
        assert token.is_cancelled()
