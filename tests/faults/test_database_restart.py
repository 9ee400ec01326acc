"""Restart a PostgreSQL that the test owns while runs, an inbox, a token and a stream are open."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest

import registry
from registry import (
    DatabaseUnavailableError,
    RegistrySettings,
    RunRegistry,
    StreamChunk,
    ToolCallDecision,
)
from registry.database import asyncpg_dsn
from registry.embedded import EmbeddedPostgres, start_embedded

pytestmark = pytest.mark.slow

T = TypeVar("T")


@pytest.fixture
def own_server() -> Iterator[EmbeddedPostgres]:
    server = start_embedded(Path(tempfile.mkdtemp(prefix="regrs")) / "data", temporary=True)
    try:
        yield server
    finally:
        server.shutdown()


async def _retrying(call: Callable[[], Awaitable[T]], timeout: float = 20) -> T:
    """What a client does during an outage: retry with a deadline (these calls are idempotent)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await call()
            except DatabaseUnavailableError:
                await asyncio.sleep(0.05)


async def test_everything_survives_a_database_restart(own_server: EmbeddedPostgres) -> None:
    url = own_server.url
    await registry.migrate(url)
    settings = RegistrySettings(safety_interval=0.5, health_interval=0.5)
    async with await RunRegistry.connect(url, settings=settings) as runs:
        handle = await runs.register("run-1", "agent-a", "thread-1")
        token = handle.cancellation_token()
        await handle.bind_stream_fanout()
        subscription = await runs.subscribe_thread_run_stream("run-1", after_seq=0)
        assert subscription is not None
        inbox = handle.decisions()
        await handle.publish_many([b"a", b"b", b"c"])
        first = ToolCallDecision.resume("call-1", True, 1, decision_id="d1")
        await runs.forward_decisions_by_run_id("run-1", [first])
        delivered = await asyncio.wait_for(anext(inbox), 5)
        assert await inbox.ack(delivered)
        received: list[StreamChunk] = [await asyncio.wait_for(anext(subscription), 5)]

        # the consumers keep waiting through the outage
        next_decision = asyncio.create_task(anext(inbox))
        rest_of_stream = asyncio.create_task(
            asyncio.wait_for(_collect(subscription, received, until_seq=6), 30)
        )

        own_server.stop()
        with pytest.raises(DatabaseUnavailableError):
            await runs.handle_by_run_id("run-1")
        own_server.start()

        second = ToolCallDecision.cancel("call-2", None, "no", 2, decision_id="d2")
        await _retrying(lambda: runs.forward_decisions_by_run_id("run-1", [second]))
        await _retrying(lambda: runs.forward_decisions_by_run_id("run-1", [second]))  # a retry
        await _retrying(lambda: handle.publish_many([b"d", b"e", b"f"]))
        assert await _retrying(lambda: runs.cancel_active_run_by_id("run-1"))

        after = await asyncio.wait_for(next_decision, 20)
        assert after.decision == second, "the acked decision is never delivered again"
        assert after.attempts == 1
        assert await inbox.ack(after)
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            rows = await connection.fetch(
                "SELECT decision_id, status FROM registry.decisions ORDER BY id"
            )
        finally:
            await connection.close()
        assert [(row["decision_id"], row["status"]) for row in rows] == [
            ("d1", "acked"),
            ("d2", "acked"),
        ], "the retried forward stored its decision once"
        await asyncio.wait_for(token.wait(), 20)
        await rest_of_stream
        assert [chunk.seq for chunk in received] == [1, 2, 3, 4, 5, 6]
        assert b"".join(chunk.data for chunk in received) == b"abcdef"
        listener = runs.listener
        assert listener is not None
        assert listener.reconnects >= 1
        await inbox.aclose()


async def _collect(
    subscription: registry.StreamSubscription, into: list[StreamChunk], until_seq: int
) -> None:
    async for chunk in subscription:
        into.append(chunk)
        if chunk.seq == until_seq:
            return
