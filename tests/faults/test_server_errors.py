"""Errors the server sends surface as :class:`registry.errors.DatabaseError`, never a driver type.

Each carries the SQLSTATE and whether a retry may succeed: a statement timeout (57014) and too
many connections (53300) are transient, a missing privilege (42501) is not. A transient error
does not end an inbox, which keeps claiming once the cause is gone.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from registry import RunRegistry, ToolCallDecision
from registry.database import asyncpg_dsn
from registry.errors import DatabaseError, DatabaseUnavailableError
from registry.models import DecisionDelivery
from registry.repository import application_grants

pytestmark = pytest.mark.timeout(60)

STATEMENT_TIMEOUT = "300ms"
PASSWORD = "app-password"


def _decision(n: int) -> ToolCallDecision:
    return ToolCallDecision.resume(f"call-{n}", True, n, decision_id=f"d-{n}")


def _database(url: str) -> str:
    name = make_url(url).database
    assert name is not None
    return name


async def _admin(url: str, *statements: str) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@asynccontextmanager
async def rows_locked(url: str, run_id: str) -> AsyncIterator[None]:
    """Another session holds the run's row and its decision rows ``FOR UPDATE`` meanwhile."""
    connection = await asyncpg.connect(asyncpg_dsn(url), server_settings={"statement_timeout": "0"})
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute("SELECT 1 FROM registry.runs WHERE run_id = $1 FOR UPDATE", run_id)
        await connection.execute(
            "SELECT 1 FROM registry.decisions WHERE run_id = $1 FOR UPDATE", run_id
        )
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await connection.close()


def _check_database_error(
    error: BaseException | None, *, sqlstate: str, transient: bool, what: str
) -> None:
    assert isinstance(error, DatabaseError), (
        f"{what} raised {type(error).__module__}.{error!r}, not a registry DatabaseError"
    )
    assert type(error).__module__.startswith("registry."), f"{what}: {type(error)}"
    assert error.sqlstate == sqlstate, f"{what}: sqlstate {error.sqlstate!r} ({error})"
    assert error.is_transient is transient, f"{what}: is_transient {error.is_transient}"


async def _error_of(call: Awaitable[object]) -> BaseException | None:
    try:
        async with asyncio.timeout(10):
            await call
    except Exception as exc:
        return exc
    return None


@pytest.fixture
async def statement_timeout_url(registry_database_url: str) -> str:
    """The test database, with every new session's ``statement_timeout`` at 300 ms."""
    database = _database(registry_database_url)
    await _admin(
        registry_database_url,
        f"ALTER DATABASE {database} SET statement_timeout = '{STATEMENT_TIMEOUT}'",
    )
    return registry_database_url


async def test_calls_blocked_on_locked_rows_raise_transient_database_error_57014(
    statement_timeout_url: str,
) -> None:
    async with await RunRegistry.connect(statement_timeout_url) as registry:
        handle = await registry.register("run-1", "agent", "thread-1")
        await handle.bind_stream_fanout()
        assert await registry.forward_decisions_by_run_id("run-1", [_decision(1)]) is not None
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "forward_decisions_by_run_id": lambda: registry.forward_decisions_by_run_id(
                "run-1", [_decision(2)]
            ),
            "cancel_active_run_by_id": lambda: registry.cancel_active_run_by_id("run-1"),
            "remove_by_run_id": lambda: registry.remove_by_run_id("run-1"),
            "register on the thread": lambda: registry.register("run-2", "agent", "thread-1"),
            "publish": lambda: handle.publish(b"chunk"),
        }
        async with rows_locked(statement_timeout_url, "run-1"):
            errors = {name: await _error_of(call()) for name, call in calls.items()}
        for name, error in errors.items():
            _check_database_error(error, sqlstate="57014", transient=True, what=name)
        # none of them happened: the run is active, uncancelled, with its one decision
        record = await registry.run("run-1")
        assert record is not None
        assert record.cancel_requested_at is None
        found = await registry.handle_by_thread("thread-1")
        assert found is not None
        assert found.run_id == "run-1"
        assert await handle.publish(b"after") == 1


async def test_an_open_inbox_outlives_statement_timeouts_and_delivers_after_the_lock(
    statement_timeout_url: str,
) -> None:
    async with await RunRegistry.connect(statement_timeout_url) as registry:
        handle = await registry.register("run-1", "agent", "thread-1")
        received: asyncio.Queue[DecisionDelivery] = asyncio.Queue()
        go_on = asyncio.Event()

        async def consume() -> None:
            async with handle.decisions() as inbox:
                async for delivery in inbox:
                    assert await inbox.ack(delivery)
                    received.put_nowait(delivery)
                    await go_on.wait()  # the next claim waits until the rows are locked

        consumer = asyncio.create_task(consume())
        try:
            await registry.forward_decisions_by_run_id("run-1", [_decision(1)])
            async with asyncio.timeout(5):
                assert (await received.get()).decision == _decision(1)
            # queued while the consumer is busy: its next claim must lock this row
            await registry.forward_decisions_by_run_id("run-1", [_decision(2)])
            async with rows_locked(statement_timeout_url, "run-1"):
                go_on.set()
                await asyncio.sleep(2)  # the fault: the rows stay locked for 2 s
                assert not consumer.done(), consumer
            async with asyncio.timeout(5):
                assert (await received.get()).decision == _decision(2)
            await registry.forward_decisions_by_run_id("run-1", [_decision(3)])
            async with asyncio.timeout(5):
                assert (await received.get()).decision == _decision(3)
            assert not consumer.done(), consumer
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)


@asynccontextmanager
async def role(url: str, *options: str, grants: list[str] | None = None) -> AsyncIterator[str]:
    """A login role for the block, with ``options`` and ``grants`` (``{role}`` and
    ``{database}`` filled in; ``None``: the registry's documented grants); yields its URL."""
    name = f"registry_app_{uuid.uuid4().hex[:12]}"
    database = _database(url)
    if grants is None:
        statements = application_grants(name, database)
    else:
        statements = [grant.format(role=name, database=database) for grant in grants]
    await _admin(url, f"CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}' {' '.join(options)}")
    await _admin(url, *statements)
    try:
        yield (
            make_url(url)
            .set(username=name, password=PASSWORD)
            .render_as_string(hide_password=False)
        )
    finally:
        await _admin(url, f"DROP OWNED BY {name}", f"DROP ROLE {name}")


def _check_too_many_connections(error: BaseException | None, what: str) -> None:
    # DatabaseUnavailableError (a subclass, always transient) is acceptable too
    _check_database_error(error, sqlstate="53300", transient=True, what=what)


async def test_connect_as_a_role_at_its_connection_limit_raises_transient_database_error_53300(
    registry_database_url: str,
) -> None:
    async with role(registry_database_url, "CONNECTION LIMIT 1") as url:
        held = await asyncpg.connect(asyncpg_dsn(url))
        try:
            error = await _error_of(RunRegistry.connect(url, listen=False))
        finally:
            await held.close()
        _check_too_many_connections(error, "RunRegistry.connect")


async def test_a_call_past_the_role_connection_limit_raises_transient_database_error_53300(
    registry_database_url: str,
) -> None:
    async with role(registry_database_url, "CONNECTION LIMIT 2") as url:
        held = await asyncpg.connect(asyncpg_dsn(url))
        try:
            async with await RunRegistry.connect(url, listen=False) as registry:
                await registry.register("run-1", "agent", "thread-1")  # its one connection
                # concurrent calls need more connections than the role has left
                outcomes = await asyncio.gather(
                    *(registry.run("run-1") for _ in range(5)), return_exceptions=True
                )
                errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
                assert errors, "no call needed a connection past the limit"
                for error in errors:
                    _check_too_many_connections(error, "run")
                # the connection that the role has keeps serving
                assert await registry.run("run-1") is not None
        finally:
            await held.close()


async def test_connect_as_a_role_without_grants_raises_permanent_database_error_42501(
    registry_database_url: str,
) -> None:
    async with role(registry_database_url, grants=[]) as url:
        error = await _error_of(RunRegistry.connect(url, listen=False))
    _check_database_error(error, sqlstate="42501", transient=False, what="RunRegistry.connect")
    assert not isinstance(error, DatabaseUnavailableError)


async def test_calls_of_a_role_without_table_grants_raise_permanent_database_error_42501(
    registry_database_url: str,
) -> None:
    # enough for the schema check, nothing on the registry's tables
    grants = [
        "GRANT CONNECT ON DATABASE {database} TO {role}",
        "GRANT USAGE ON SCHEMA registry TO {role}",
        "GRANT SELECT ON registry.alembic_version TO {role}",
    ]
    async with role(registry_database_url, grants=grants) as url:
        registry = await RunRegistry.connect(url, listen=False)
        try:
            register_error = await _error_of(registry.register("run-1", "agent", "thread-1"))
            forward_error = await _error_of(
                registry.forward_decisions_by_run_id("run-1", [_decision(1)])
            )
            read_error = await _error_of(registry.run("run-1"))
        finally:
            await registry.close()
    for what, error in [
        ("register", register_error),
        ("forward_decisions_by_run_id", forward_error),
        ("run", read_error),
    ]:
        _check_database_error(error, sqlstate="42501", transient=False, what=what)
        assert not isinstance(error, DatabaseUnavailableError), what
