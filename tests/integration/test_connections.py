"""The connection lane: connections kept across statements, dropped when they break.

Server process ids tell connections apart: the same pid is the same connection.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from registry import DatabaseError, DatabaseUnavailableError, RegistryClosedError, RunRegistry
from registry.connections import ConnectionLane
from registry.database import APPLICATION_NAME, asyncpg_dsn
from tests.helpers.database import session_pids


@pytest.fixture
def dsn(registry_database_url: str) -> str:
    return asyncpg_dsn(registry_database_url)


async def pid_of(lane: ConnectionLane) -> int:
    async with lane.autocommit() as connection:
        pid: int = await connection.fetchval("SELECT pg_backend_pid()")
        return pid


async def sessions(url: str) -> list[int]:
    """Server pids of the registry's query connections on this database."""
    return await session_pids(url, APPLICATION_NAME)


async def test_a_connection_serves_statement_after_statement(dsn: str) -> None:
    lane = ConnectionLane(dsn, 3)
    try:
        first = await pid_of(lane)
        assert [await pid_of(lane) for _ in range(5)] == [first] * 5
        # a statement error is the statement's, not the connection's
        # it leaves as the library's type, chosen by SQLSTATE: 22012, not worth a retry
        with pytest.raises(DatabaseError) as caught:
            async with lane.autocommit() as connection:
                await connection.fetchval("SELECT 1 / 0")
        assert (caught.value.sqlstate, caught.value.is_transient) == ("22012", False)
        assert isinstance(caught.value.__cause__, asyncpg.DivisionByZeroError)
        assert await pid_of(lane) == first
    finally:
        await lane.close()


async def test_concurrent_callers_get_distinct_connections_up_to_the_size(
    dsn: str, registry_database_url: str
) -> None:
    lane = ConnectionLane(dsn, 2)
    inside = 0
    most = 0
    pids: set[int] = set()

    async def hold() -> None:
        nonlocal inside, most
        async with lane.autocommit() as connection:
            inside += 1
            most = max(most, inside)
            pids.add(await connection.fetchval("SELECT pg_backend_pid()"))
            await connection.execute("SELECT pg_sleep(0.05)")
            inside -= 1

    try:
        await asyncio.gather(*(hold() for _ in range(6)))
        assert most == 2
        assert len(pids) == 2
        assert await sessions(registry_database_url) == sorted(pids)
    finally:
        await lane.close()
    assert await sessions(registry_database_url) == []


async def test_a_transaction_commits_or_rolls_back_whole(dsn: str) -> None:
    lane = ConnectionLane(dsn, 1)
    try:
        async with lane.autocommit() as connection:
            await connection.execute("CREATE TEMP TABLE t (n int)")
        async with lane.transaction() as connection:
            await connection.execute("INSERT INTO t VALUES (1)")

        async def fail_half_way() -> None:
            async with lane.transaction() as connection:
                await connection.execute("INSERT INTO t VALUES (2)")
                raise RuntimeError("half way")

        with pytest.raises(RuntimeError, match="half way"):
            await fail_half_way()
        async with lane.autocommit() as connection:
            rows = await connection.fetch("SELECT n FROM t ORDER BY n")
            assert [row["n"] for row in rows] == [1]
            # autocommit again after the transaction: nothing is left open
            assert not connection.is_in_transaction()
    finally:
        await lane.close()


# (that one broken connection condemns its idle siblings, whose end the client has not seen
# yet, is tests/integration/test_mutations.py's restart without a goodbye)
async def test_connections_the_server_terminated_are_replaced_after_at_most_one_failure(
    dsn: str, registry_database_url: str
) -> None:
    lane = ConnectionLane(dsn, 3)
    try:
        # two connections held at once, so two distinct ones, both idle afterwards
        together = asyncio.Barrier(2)

        async def hold() -> int:
            async with lane.autocommit() as connection:
                pid: int = await connection.fetchval("SELECT pg_backend_pid()")
                await together.wait()
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
        except DatabaseUnavailableError:
            first = await pid_of(lane)
        assert first not in before
        assert await pid_of(lane) == first
    finally:
        await lane.close()


async def test_a_cancelled_statement_does_not_leave_its_connection_in_use(
    dsn: str,
) -> None:
    lane = ConnectionLane(dsn, 1)
    try:
        first = await pid_of(lane)

        async def sleep_long() -> None:
            async with lane.autocommit() as connection:
                await connection.execute("SELECT pg_sleep(30)")

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


async def test_a_closed_lane_refuses_and_closes_what_comes_back(
    dsn: str, registry_database_url: str
) -> None:
    lane = ConnectionLane(dsn, 2)
    async with lane.autocommit() as connection:
        await lane.close()
        # a statement already under way finishes; its connection is not kept
        assert await connection.fetchval("SELECT 1") == 1
    assert connection.is_closed()
    with pytest.raises(RegistryClosedError):
        await pid_of(lane)
    assert await sessions(registry_database_url) == []


async def test_an_unreachable_server_is_one_typed_error() -> None:
    # nothing listens on port 1: the driver's refusal leaves as DatabaseUnavailableError
    lane = ConnectionLane("postgresql://nobody@127.0.0.1:1/none", 1, connect_timeout=5)
    try:
        with pytest.raises(DatabaseUnavailableError, match="cannot reach the database"):
            await pid_of(lane)
    finally:
        await lane.close()


async def test_a_database_that_does_not_exist_is_said_so(registry_database_url: str) -> None:
    missing = registry_database_url.rpartition("/")[0] + "/no_such_database_here"
    with pytest.raises(DatabaseError) as caught:
        await RunRegistry.connect(missing)
    assert caught.value.sqlstate == "3D000"
    assert "does not exist" in str(caught.value)
    assert "refused the statement" not in str(caught.value)
