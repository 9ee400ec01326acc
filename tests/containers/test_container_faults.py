"""Fault injection through a PostgreSQL container: pause (half-open) and restart."""

from __future__ import annotations

import asyncio
import uuid

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
from registry.testing import PostgresContainerHandle

pytestmark = [pytest.mark.containers, pytest.mark.slow]

SETTINGS = RegistrySettings(health_interval=0.5, safety_interval=0.5)


def _decision(decision_id: str) -> ToolCallDecision:
    return ToolCallDecision.resume(decision_id, {"id": decision_id}, 1, decision_id=decision_id)


async def _rows(url: str, query: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return list(await connection.fetch(query))
    finally:
        await connection.close()


async def test_paused_database_is_noticed_and_nothing_is_lost(
    postgres_container: PostgresContainerHandle,
) -> None:
    url = postgres_container.url
    await registry.migrate(url)
    async with await RunRegistry.connect(url, settings=SETTINGS) as runs:
        handle = await runs.register("run-1", "agent", "thread-1")
        token = handle.cancellation_token()
        await handle.bind_stream_fanout()
        subscription = await runs.subscribe_thread_run_stream("run-1", after_seq=0)
        assert subscription is not None
        inbox = handle.decisions()
        await runs.forward_decisions_by_run_id("run-1", [_decision("before")])
        await handle.publish(b"before")
        assert (await asyncio.wait_for(anext(inbox), 5)).decision.decision_id == "before"
        assert (await asyncio.wait_for(anext(subscription), 5)).data == b"before"
        listener = runs.listener
        assert listener is not None

        postgres_container.pause()
        try:
            # longer than the health interval: the frozen listener must be noticed
            async with asyncio.timeout(15):
                while listener.connected:
                    await asyncio.sleep(0.05)
            # calls made now wait for the frozen server; they complete after it thaws
            pending = [
                asyncio.create_task(runs.forward_decisions_by_run_id("run-1", [_decision("d1")])),
                asyncio.create_task(handle.publish_many([b"p1", b"p2"])),
            ]
        finally:
            postgres_container.unpause()
        await asyncio.wait_for(asyncio.gather(*pending), 30)
        async with asyncio.timeout(30):
            while not listener.connected:
                await asyncio.sleep(0.05)
        assert listener.reconnects >= 1

        after = await asyncio.wait_for(anext(inbox), 10)
        assert (after.decision.decision_id, after.attempts) == ("d1", 1)
        assert await inbox.ack(after)
        chunks: list[StreamChunk] = [await asyncio.wait_for(anext(subscription), 10)]
        chunks.append(await asyncio.wait_for(anext(subscription), 10))
        assert [(chunk.seq, chunk.data) for chunk in chunks] == [(2, b"p1"), (3, b"p2")]
        assert await runs.cancel_active_run_by_id("run-1")
        await asyncio.wait_for(token.wait(), 10)
        await inbox.aclose()


async def test_restart_while_forwarding_loses_and_duplicates_nothing(
    postgres_container: PostgresContainerHandle,
) -> None:
    url = postgres_container.url
    await registry.migrate(url)
    stored: list[str] = []
    failed: list[str] = []
    async with await RunRegistry.connect(url, settings=SETTINGS) as runs:
        handle = await runs.register("run-1", "agent", "thread-1")
        stop = asyncio.Event()

        async def forward_in_a_loop() -> None:
            while not stop.is_set():
                decision_id = uuid.uuid4().hex
                try:
                    await runs.forward_decisions_by_run_id("run-1", [_decision(decision_id)])
                except DatabaseUnavailableError:
                    failed.append(decision_id)  # a clear error: the caller knows
                    await asyncio.sleep(0.02)
                else:
                    stored.append(decision_id)

        forwarder = asyncio.create_task(forward_in_a_loop())
        async with asyncio.timeout(10):
            while len(stored) < 20:
                await asyncio.sleep(0.01)
        await asyncio.to_thread(postgres_container.restart)
        count_at_restart = len(stored)
        async with asyncio.timeout(30):
            while len(stored) < count_at_restart + 20:
                await asyncio.sleep(0.05)
        stop.set()
        await forwarder
        assert failed, "the restart was visible to the caller as errors"

        rows = await _rows(url, "SELECT decision_id FROM registry.decisions ORDER BY id")
        in_table = [row["decision_id"] for row in rows]
        assert len(in_table) == len(set(in_table)), "no decision stored twice"
        assert set(stored) <= set(in_table), "every forward that returned is stored"
        assert set(in_table) <= set(stored) | set(failed)
        # a forward that raised may have committed before the connection died: at most once
        async with handle.decisions() as inbox:
            delivered = [
                (await asyncio.wait_for(anext(inbox), 10)).decision.decision_id for _ in in_table
            ]
        assert delivered == in_table, "the inbox delivers all of them, in order"
