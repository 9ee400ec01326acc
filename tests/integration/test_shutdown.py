"""Shutdown: ``close()`` ends every waiter, honours cancellation, stays quiet and bounded.

Also the "full batch, read again at once" paths: a replay or an inbox backlog longer than one
batch is delivered without waiting for a wake-up (the safety net is set far away so that only
the batch logic can explain a quick delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import asyncpg
import pytest

from registry import (
    RegistryClosedError,
    RegistrySettings,
    RunHandle,
    RunRegistry,
    StreamSubscription,
    ToolCallDecision,
)
from registry.database import asyncpg_dsn
from tests.helpers.database import fetch

_T = TypeVar("_T")

#: heartbeat and safety net both busy: what a worker looks like when it is told to stop
BUSY = RegistrySettings(safety_interval=0.05, heartbeat_interval=0.05, lease_seconds=1)
#: only a notification or the batch logic can wake a waiter within a test's deadline
QUIET = RegistrySettings(safety_interval=60)


def decision(target: str) -> ToolCallDecision:
    return ToolCallDecision.resume(target, {"target": target}, 1, decision_id=target)


async def still_waiting(waiter: asyncio.Future[_T], seconds: float = 0.2) -> None:
    """Assert that ``waiter`` is parked: it does not finish within ``seconds``."""
    done, _ = await asyncio.wait({waiter}, timeout=seconds)
    if done:
        pytest.fail(f"the waiter did not park: {waiter.exception() or waiter.result()!r}")


async def closed_within(waiter: Awaitable[object], seconds: float = 1.0) -> None:
    """Assert that ``waiter`` raises :class:`RegistryClosedError` within ``seconds``."""
    with pytest.raises(RegistryClosedError):
        await asyncio.wait_for(waiter, seconds)


async def backends(url: str) -> int:
    """Sessions on the test's database other than the one asking."""
    [row] = await fetch(
        url,
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    return int(row["n"])


async def no_backends_within(url: str, seconds: float = 5.0) -> None:
    """Wait (polling under a deadline) until no session but ours is on the database."""
    async with asyncio.timeout(seconds):
        while (count := await backends(url)) != 0:
            await asyncio.sleep(0.02)
    assert count == 0


@pytest.fixture
async def registry(registry_database_url: str) -> AsyncIterator[RunRegistry]:
    """A registry whose tests close it themselves (closed again afterwards: idempotent)."""
    opened = await RunRegistry.connect(registry_database_url, settings=QUIET)
    try:
        yield opened
    finally:
        await opened.close()


async def streaming_run(registry: RunRegistry, chunks: int) -> RunHandle:
    handle = await registry.register("run-1", "agent-a", "thread-1")
    assert await handle.bind_stream_fanout()
    if chunks:
        await handle.publish_many([f"chunk-{i}".encode() for i in range(1, chunks + 1)])
    return handle


async def subscribe(registry: RunRegistry, after_seq: int | None = 0) -> StreamSubscription:
    subscription = await registry.subscribe_thread_run_stream("run-1", after_seq=after_seq)
    assert subscription is not None
    return subscription


# --- close() ends every waiter -----------------------------------------------------------------


async def test_close_ends_a_subscriber_parked_after_the_replay(registry: RunRegistry) -> None:
    await streaming_run(registry, 3)
    subscription = await subscribe(registry)
    async with asyncio.timeout(5):
        assert [(await anext(subscription)).seq for _ in range(3)] == [1, 2, 3]
    waiting = asyncio.ensure_future(anext(subscription))
    try:
        await still_waiting(waiting)
        await asyncio.wait_for(registry.close(), 5)
        await closed_within(waiting)
    finally:
        waiting.cancel()
    # and a step taken after the close fails at once, rather than waiting
    await closed_within(anext(subscription), 0.1)


async def test_close_ends_a_parked_token_wait(registry: RunRegistry) -> None:
    handle = await registry.register("run-1", "agent-a", "thread-1")
    token = handle.cancellation_token()
    waiting = asyncio.ensure_future(token.wait())
    try:
        await still_waiting(waiting)
        await asyncio.wait_for(registry.close(), 5)
        await closed_within(waiting)
    finally:
        waiting.cancel()
    await closed_within(token.wait(), 0.1)
    assert not token.is_cancelled()  # local state still answers, without raising
    other = handle.cancellation_token()
    await closed_within(other.wait(), 0.1)


async def test_a_tripped_token_still_answers_after_close(registry: RunRegistry) -> None:
    handle = await registry.register("run-1", "agent-a", "thread-1")
    token = handle.cancellation_token()
    assert await handle.cancel()
    await asyncio.wait_for(token.wait(), 5)
    await asyncio.wait_for(registry.close(), 5)
    assert token.is_cancelled()
    await asyncio.wait_for(token.wait(), 0.1)  # what it knows, it still says


async def test_close_ends_a_parked_inbox(registry: RunRegistry) -> None:
    handle = await registry.register("run-1", "agent-a", "thread-1")
    await registry.forward_decisions_by_run_id("run-1", [decision("d1"), decision("d2")])
    inbox = handle.decisions()
    async with asyncio.timeout(5):
        # the first claim takes both: the second is buffered when the close comes
        assert (await anext(inbox)).decision.target_id == "d1"
    await asyncio.wait_for(registry.close(), 5)
    # a claimed decision cannot be acknowledged any more: it is redelivered, not yielded
    await closed_within(anext(inbox), 0.1)
    await closed_within(anext(handle.decisions()), 0.1)


async def test_close_ends_an_inbox_parked_on_an_empty_queue(registry: RunRegistry) -> None:
    handle = await registry.register("run-1", "agent-a", "thread-1")
    inbox = handle.decisions()
    waiting = asyncio.ensure_future(anext(inbox))
    try:
        await still_waiting(waiting)
        await asyncio.wait_for(registry.close(), 5)
        await closed_within(waiting)
    finally:
        waiting.cancel()
    await closed_within(anext(inbox), 0.1)


# --- a cancelled close() is cancelled, and still closes -------------------------------------------


async def _busy_registry(url: str, run_id: str) -> tuple[RunRegistry, list[asyncio.Future[object]]]:
    registry = await RunRegistry.connect(url, settings=BUSY)
    handle = await registry.register(run_id, "agent-a", run_id)  # starts the heartbeat
    await handle.bind_stream_fanout()
    await handle.publish_many([b"a", b"b"])
    subscription = await registry.subscribe_thread_run_stream(run_id, after_seq=0)
    assert subscription is not None
    waiters: list[asyncio.Future[object]] = [
        asyncio.ensure_future(subscription.__anext__()),
        asyncio.ensure_future(handle.cancellation_token().wait()),
        asyncio.ensure_future(handle.decisions().__anext__()),
    ]
    return registry, waiters


async def test_cancelling_close_cancels_it_and_still_closes(registry_database_url: str) -> None:
    for attempt in range(20):
        registry, waiters = await _busy_registry(registry_database_url, f"run-{attempt}")
        try:
            closing = asyncio.ensure_future(registry.close())
            # let close() start and reach its first await (then, in later attempts, a later one)
            for _ in range(1 + attempt % 4):
                await asyncio.sleep(0)
            assert closing.cancel(), f"attempt {attempt}: close() ended before the cancel"
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(closing, 5)
            assert closing.cancelled(), f"attempt {attempt}: the cancel was swallowed"
            with pytest.raises(RegistryClosedError):
                await registry.register("another-run", "agent-a", "another-thread")
            # the waiters end too; the stream had two chunks to give before its end
            results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 1)
            assert all(
                isinstance(result, RegistryClosedError) or not isinstance(result, BaseException)
                for result in results
            ), results
            await no_backends_within(registry_database_url)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            await asyncio.wait_for(registry.close(), 10)


async def no_registry_tasks_within(seconds: float = 5.0) -> None:
    """Wait (polling under a deadline) until no background task of a registry runs."""

    def left() -> list[str]:
        return sorted(
            task.get_name()
            for task in asyncio.all_tasks()
            if task.get_name().startswith("registry-")
        )

    async with asyncio.timeout(seconds):
        while left():
            await asyncio.sleep(0.01)


async def test_close_while_background_work_runs_is_quiet(
    registry_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="registry")
    for attempt in range(20):
        registry = await RunRegistry.connect(registry_database_url, settings=BUSY)
        handle = await registry.register(f"run-{attempt}", "agent-a", f"thread-{attempt}")
        await handle.bind_stream_fanout()

        async def stream(handle: RunHandle = handle) -> None:
            # a run still streaming its output when the worker is told to stop
            with contextlib.suppress(RegistryClosedError):
                while True:
                    await handle.publish(b"x")

        streaming = asyncio.ensure_future(stream())
        # close at a different moment of the heartbeat, the re-check and the flush each time
        await asyncio.sleep(0.005 * attempt)
        await asyncio.wait_for(registry.close(), 10)
        await asyncio.wait_for(streaming, 5)
        await no_registry_tasks_within()  # nothing is left that could still log
    noisy = [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.levelno >= logging.WARNING or record.exc_info
    ]
    assert noisy == []


async def test_close_gives_up_on_a_lease_release_the_server_does_not_answer(
    registry_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RegistrySettings(close_timeout=0.3, safety_interval=60)
    registry = await RunRegistry.connect(registry_database_url, settings=settings)
    await registry.register("run-1", "agent-a", "thread-1")
    # a row lock makes the release wait, as a server that stopped answering would
    locker = await asyncpg.connect(asyncpg_dsn(registry_database_url))
    try:
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM registry.runs WHERE run_id = 'run-1' FOR UPDATE")
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.wait_for(registry.close(), 5)
            elapsed = loop.time() - started
    finally:
        await locker.close()
    assert elapsed < 0.3 + 1.0, f"close took {elapsed:.2f} s"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, "leases" in r.getMessage(), r.exc_info) for r in warnings] == [
        ("registry.upkeep", True, None)
    ]
    with pytest.raises(RegistryClosedError):
        await registry.run("run-1")


# --- a full batch reads on at once --------------------------------------------------------------


async def test_a_replay_longer_than_one_read_batch_arrives_at_once(
    registry_database_url: str,
) -> None:
    settings = RegistrySettings(safety_interval=60, stream_read_batch=10)
    async with await RunRegistry.connect(registry_database_url, settings=settings) as registry:
        await streaming_run(registry, 25)
        subscription = await subscribe(registry)
        async with asyncio.timeout(0.5):
            seqs = [(await anext(subscription)).seq for _ in range(25)]
        assert seqs == list(range(1, 26))


async def test_an_inbox_backlog_longer_than_one_batch_arrives_at_once(
    registry_database_url: str,
) -> None:
    settings = RegistrySettings(safety_interval=60, inbox_batch=10)
    async with await RunRegistry.connect(registry_database_url, settings=settings) as registry:
        handle = await registry.register("run-1", "agent-a", "thread-1")
        targets = [f"d{i:02}" for i in range(25)]
        await registry.forward_decisions_by_run_id("run-1", [decision(t) for t in targets])
        async with handle.decisions() as inbox, asyncio.timeout(0.5):
            delivered = [(await anext(inbox)).decision.target_id for _ in range(25)]
        assert delivered == targets
