"""Every database call has a deadline: a silent server (half-open sockets) cannot hang a caller.

A :class:`~tests.helpers.proxy.TcpProxy` sits between the registry and PostgreSQL; freezing it
keeps every socket open while no byte passes, which is what a peer that vanished without a FIN
or RST (a dead host, a dropped route, a paused VM) looks like.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import asyncpg
import pytest

from registry import (
    DatabaseUnavailableError,
    DecisionDelivery,
    ForwardedDecision,
    RegistryClosedError,
    RegistrySettings,
    RunRegistry,
    ToolCallDecision,
)
from registry.database import asyncpg_dsn
from tests.helpers.proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")

CALL_TIMEOUT = 1.0
CLOSE_BOUND = 8.0
#: how long a test waits for a call that should fail fast before calling it hung
GUARD = 15.0


@pytest.fixture
async def proxy(registry_database_url: str) -> AsyncIterator[TcpProxy]:
    async with TcpProxy.in_front_of(registry_database_url) as proxy:
        yield proxy


def _decision(n: int) -> ToolCallDecision:
    return ToolCallDecision.resume(f"call-{n}", True, n, decision_id=f"d-{n}")


async def _timed(call: Awaitable[T], what: str) -> tuple[T | BaseException, float]:
    """Await ``call`` under :data:`GUARD`; its result or exception, and how long it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    guard = asyncio.timeout(GUARD)
    try:
        async with guard:
            outcome: T | BaseException = await call
    except Exception as exc:
        if isinstance(exc, TimeoutError) and guard.expired():
            pytest.fail(f"{what} did not return within {GUARD:g} s of a frozen connection")
        outcome = exc
    return outcome, loop.time() - started


def _unexpected_records(records: list[logging.LogRecord]) -> list[str]:
    """Records that are neither quiet nor an expected outage: anything at ERROR or above, and
    any traceback of an exception other than :class:`DatabaseUnavailableError`."""
    unexpected = []
    for record in records:
        error = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR or (
            error is not None and not isinstance(error, DatabaseUnavailableError)
        ):
            unexpected.append(f"{record.name} {record.levelname}: {record.getMessage()} {error!r}")
    return unexpected


async def test_frozen_forward_fails_unavailable_within_call_timeout_and_close_is_bounded(
    proxy: TcpProxy, registry_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    registry = await RunRegistry.connect(
        proxy.url(registry_database_url),
        listen_url=registry_database_url,
        settings=RegistrySettings(call_timeout=CALL_TIMEOUT),
    )
    try:
        await registry.register("run-1", "agent", "thread-1")
        proxy.freeze()
        outcome, elapsed = await _timed(
            registry.forward_decisions_by_run_id("run-1", [_decision(1)]), "forward"
        )
        assert isinstance(outcome, DatabaseUnavailableError), outcome
        assert outcome.is_transient
        assert elapsed <= CALL_TIMEOUT + 1.0, f"forward failed after {elapsed:.2f} s"
        outcome, elapsed = await _timed(registry.close(), "close")
        assert outcome is None, outcome
        assert elapsed <= CLOSE_BOUND, f"close took {elapsed:.2f} s while frozen"
    finally:
        proxy.thaw()
        await registry.close()
    unexpected = _unexpected_records(caplog.records)
    assert not unexpected, unexpected


async def test_close_returns_within_eight_seconds_while_every_connection_is_frozen(
    proxy: TcpProxy, registry_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # the LISTEN connection goes through the proxy too: it freezes with the rest
    registry = await RunRegistry.connect(
        proxy.url(registry_database_url), settings=RegistrySettings(call_timeout=CALL_TIMEOUT)
    )
    waiting: asyncio.Task[DecisionDelivery] | None = None
    try:
        handle = await registry.register("run-1", "agent", "thread-1")
        await handle.bind_stream_fanout()
        # several idle query connections, a waiting inbox, an owned run's lease
        await asyncio.gather(*(registry.run("run-1") for _ in range(4)))
        inbox = handle.decisions()
        waiting = asyncio.create_task(anext(inbox))
        assert proxy.open_connections >= 3
        proxy.freeze()
        outcome, elapsed = await _timed(registry.close(), "close")
        assert outcome is None, outcome
        assert elapsed <= CLOSE_BOUND, f"close took {elapsed:.2f} s while frozen"
        # close ends every open inbox: at its next wait, or in a claim it was retrying
        async with asyncio.timeout(GUARD):
            with pytest.raises((StopAsyncIteration, RegistryClosedError)):
                await waiting
    finally:
        if waiting is not None and not waiting.done():
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        proxy.thaw()
        await registry.close()
    unexpected = _unexpected_records(caplog.records)
    assert not unexpected, unexpected


async def test_a_reset_connection_costs_at_most_one_failed_call_and_the_next_reconnects(
    proxy: TcpProxy, registry_database_url: str
) -> None:
    registry = await RunRegistry.connect(
        proxy.url(registry_database_url), listen_url=registry_database_url
    )
    try:
        await registry.register("run-1", "agent", "thread-1")
        accepted = proxy.accepted
        proxy.reset()
        outcome, _ = await _timed(
            registry.forward_decisions_by_run_id("run-1", [_decision(1)]), "forward"
        )
        # a forward whose connection was reset is retried on a new one (it is idempotent):
        # it either succeeds or says the server is unavailable, never anything else
        assert isinstance(outcome, ForwardedDecision | DatabaseUnavailableError), outcome
        forwarded = await registry.forward_decisions_by_run_id("run-1", [_decision(2)])
        assert forwarded is not None
        assert forwarded.run_id == "run-1"
        assert proxy.accepted > accepted
    finally:
        await registry.close()


async def test_the_proxy_holds_bytes_while_frozen_and_a_new_registry_works_after_thaw(
    proxy: TcpProxy, registry_database_url: str
) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(proxy.url(registry_database_url)))
    try:
        proxy.freeze()
        query = asyncio.create_task(connection.fetchval("SELECT 1"))
        done, _ = await asyncio.wait([query], timeout=0.5)
        assert not done, "a query answered through a frozen proxy"
        proxy.thaw()
        async with asyncio.timeout(5):
            assert await query == 1  # nothing was lost, only held
    finally:
        await connection.close()
    # everything goes through the proxy: queries, LISTEN, the cross-registry wake-ups
    url = proxy.url(registry_database_url)
    async with (
        await RunRegistry.connect(url) as holder,
        await RunRegistry.connect(url, listen=False) as steerer,
    ):
        handle = await holder.register("run-1", "agent", "thread-1")
        token = handle.cancellation_token()
        async with handle.decisions() as inbox:
            assert await steerer.forward_decisions_by_run_id("run-1", [_decision(1)]) is not None
            async with asyncio.timeout(5):
                delivery = await anext(inbox)
            assert delivery.decision == _decision(1)
            assert await inbox.ack(delivery)
        assert await steerer.cancel_active_run_by_id("run-1")
        async with asyncio.timeout(5):
            await token.wait()
    assert proxy.accepted >= 4
