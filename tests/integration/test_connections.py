"""The connection lane: connections kept across statements, dropped when they break.

Server process ids tell connections apart: the same pid is the same connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from registry import RunRegistry
from registry.connections import ConnectionLane
from registry.database import APPLICATION_NAME, UNREACHABLE, asyncpg_dsn, create_engine
from registry.repository import driver
from tests.helpers.database import session_pids


@pytest.fixture
async def engine(registry_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(registry_database_url, pool_size=3)
    try:
        yield engine
    finally:
        await engine.dispose()


async def pid_of(lane: ConnectionLane) -> int:
    async with lane.connection() as connection:
        pid: int = await driver(connection).fetchval("SELECT pg_backend_pid()")
        return pid


async def sessions(url: str) -> list[int]:
    """Server pids of the registry's query connections on this database."""
    return await session_pids(url, APPLICATION_NAME)


async def test_a_connection_serves_statement_after_statement(engine: AsyncEngine) -> None:
    lane = ConnectionLane(engine, 3)
    try:
        first = await pid_of(lane)
        assert [await pid_of(lane) for _ in range(5)] == [first] * 5
        # a statement error is the statement's, not the connection's
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with lane.connection() as connection:
                await driver(connection).fetchval("SELECT 1 / 0")
        assert await pid_of(lane) == first
    finally:
        await lane.close()


async def test_concurrent_callers_get_distinct_connections_up_to_the_size(
    engine: AsyncEngine, registry_database_url: str
) -> None:
    lane = ConnectionLane(engine, 2)
    inside = 0
    most = 0
    pids: set[int] = set()

    async def hold() -> None:
        nonlocal inside, most
        async with lane.connection() as connection:
            inside += 1
            most = max(most, inside)
            pids.add(await driver(connection).fetchval("SELECT pg_backend_pid()"))
            await driver(connection).execute("SELECT pg_sleep(0.05)")
            inside -= 1

    try:
        await asyncio.gather(*(hold() for _ in range(6)))
        assert most == 2
        assert len(pids) == 2
        assert await sessions(registry_database_url) == sorted(pids)
    finally:
        await lane.close()
    await engine.dispose()
    assert await sessions(registry_database_url) == []


async def test_a_transaction_commits_or_rolls_back_whole(engine: AsyncEngine) -> None:
    lane = ConnectionLane(engine, 1)
    try:
        async with lane.connection() as connection:
            await driver(connection).execute("CREATE TEMP TABLE t (n int)")
        async with lane.connection(transaction=True) as connection:
            await driver(connection).execute("INSERT INTO t VALUES (1)")

        async def fail_half_way() -> None:
            async with lane.connection(transaction=True) as connection:
                await driver(connection).execute("INSERT INTO t VALUES (2)")
                raise RuntimeError("half way")

        with pytest.raises(RuntimeError, match="half way"):
            await fail_half_way()
        async with lane.connection() as connection:
            rows = await driver(connection).fetch("SELECT n FROM t ORDER BY n")
            assert [row["n"] for row in rows] == [1]
            # autocommit again after the transaction: nothing is left open
            assert not driver(connection).is_in_transaction()
    finally:
        await lane.close()


async def test_a_terminated_connection_and_its_idle_siblings_are_replaced(
    engine: AsyncEngine, registry_database_url: str
) -> None:
    lane = ConnectionLane(engine, 3)
    try:
        # two connections in the lane, both idle now
        async def hold() -> int:
            async with lane.connection() as connection:
                pid: int = await driver(connection).fetchval("SELECT pg_backend_pid()")
                await asyncio.sleep(0.05)
                return pid

        before = set(await asyncio.gather(hold(), hold()))
        assert len(before) == 2
        admin = await asyncpg.connect(asyncpg_dsn(registry_database_url))
        try:
            for pid in before:
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        # the first caller may still find a dead connection (its socket's EOF not yet seen)
        try:
            first = await pid_of(lane)
        except UNREACHABLE:
            first = await pid_of(lane)
        assert first not in before
        assert await pid_of(lane) == first
    finally:
        await lane.close()


async def test_a_cancelled_statement_does_not_leave_its_connection_in_use(
    engine: AsyncEngine,
) -> None:
    lane = ConnectionLane(engine, 1)
    try:
        first = await pid_of(lane)

        async def sleep_long() -> None:
            async with lane.connection() as connection:
                await driver(connection).execute("SELECT pg_sleep(30)")

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sleep_long(), 0.1)
        # the lane's only slot is free again, on a connection that answers at once
        async with asyncio.timeout(10):
            assert await pid_of(lane) != first
    finally:
        await lane.close()


async def test_closing_a_registry_leaves_no_session(
    registry_database_url: str, run_registry: RunRegistry
) -> None:
    registry = await RunRegistry.connect(registry_database_url, listen=False)
    await registry.register("run-1", "agent", "thread-1")
    await asyncio.gather(*(registry.handle_by_run_id("run-1") for _ in range(20)))
    assert len(await sessions(registry_database_url)) >= 1
    await registry.close()
    await run_registry.close()
    assert await sessions(registry_database_url) == []
