"""Notifications are hints, never facts: a role that may only connect can neither steer runs
nor feed subscribers nor read chunk content by listening.

PostgreSQL gives PUBLIC ``CONNECT`` on a database by default, and LISTEN/NOTIFY have no
privileges of their own, so these tests use a role with no grant on any of our tables. Each
forged payload is followed by a real notification of the registry (a barrier): one listener
receives notifications in commit order, so once the real one has arrived the forged one has
been handled, and a test can assert that nothing happened, with the safety re-check set far
out (60 s) so that the table cannot have repaired anything meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from registry import RegistrySettings, RunRegistry, ToolCallDecision
from registry.database import asyncpg_dsn
from registry.notifications import CHANNEL

FAR = RegistrySettings(safety_interval=60)
SECRET_CHUNK = b"only readers of stream_chunks may see this"


@pytest.fixture
async def outsider(registry_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as a role with no privilege on any table of ours (PUBLIC's CONNECT only)."""
    role = f"outsider_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn(registry_database_url))
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'outsider'")
    url = (
        make_url(registry_database_url)
        .set(username=role, password="outsider")
        .render_as_string(hide_password=False)
    )
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.fetch("SELECT * FROM registry.runs")  # it really has no grant
        yield connection
    finally:
        await connection.close()
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def forge(outsider: asyncpg.Connection, fields: dict[str, object]) -> None:
    await outsider.execute("SELECT pg_notify($1, $2)", CHANNEL, json.dumps(fields))


async def test_a_forged_cancel_does_not_trip_a_token_even_after_refresh(
    registry_database_url: str, outsider: asyncpg.Connection
) -> None:
    async with (
        await RunRegistry.connect(registry_database_url, settings=FAR) as holder,
        await RunRegistry.connect(registry_database_url, listen=False) as steerer,
    ):
        forged = (await holder.register("f-1", "agent", "thread-1")).cancellation_token()
        barrier = (await holder.register("b-1", "agent", "thread-2")).cancellation_token()
        await forge(outsider, {"kind": "cancel", "id": "f-1"})
        await forge(outsider, {"kind": "superseded", "id": "f-1"})
        assert await steerer.cancel_active_run_by_id("b-1")
        async with asyncio.timeout(5):
            await barrier.wait()
        assert not forged.is_cancelled()
        assert not await forged.refresh()


async def test_a_forged_end_does_not_end_an_open_inbox(
    registry_database_url: str, outsider: asyncpg.Connection
) -> None:
    async with (
        await RunRegistry.connect(registry_database_url, settings=FAR) as holder,
        await RunRegistry.connect(registry_database_url, listen=False) as steerer,
    ):
        handle = await holder.register("f-2", "agent", "thread-1")
        barrier = (await holder.register("b-2", "agent", "thread-2")).cancellation_token()
        inbox = handle.decisions()
        waiting = asyncio.ensure_future(anext(inbox))
        await forge(outsider, {"kind": "ended", "id": "f-2"})
        assert await steerer.cancel_active_run_by_id("b-2")
        async with asyncio.timeout(5):
            await barrier.wait()
        assert not waiting.done()  # still open, parked for decisions
        decision = ToolCallDecision.resume("call-1", True, 1, decision_id="d-1")
        assert await steerer.forward_decisions_by_run_id("f-2", [decision]) is not None
        async with asyncio.timeout(5):
            delivery = await waiting
        assert delivery.decision.decision_id == "d-1"
        await inbox.aclose()


async def test_a_forged_chunk_never_reaches_a_subscriber(
    registry_database_url: str, outsider: asyncpg.Connection
) -> None:
    async with (
        await RunRegistry.connect(registry_database_url, settings=FAR) as holder,
        await RunRegistry.connect(registry_database_url, settings=FAR) as reader,
    ):
        handle = await holder.register("f-3", "agent", "thread-1")
        assert await handle.bind_stream_fanout()
        assert await handle.publish(b"one") == 1
        subscription = await reader.subscribe_thread_run_stream("f-3", after_seq=0)
        assert subscription is not None
        async with asyncio.timeout(5):
            assert (await anext(subscription)).data == b"one"
        # a forged seq 2 with data of the forger's choosing, in the old plain format too
        await forge(outsider, {"kind": "chunk", "id": "f-3", "seq": 2, "data": "Zm9yZ2Vk"})
        assert await handle.publish(b"two") == 2
        async with asyncio.timeout(5):
            chunk = await anext(subscription)
        assert (chunk.seq, chunk.data) == (2, b"two")
        await subscription.aclose()


async def test_a_listener_without_grants_learns_no_chunk_content(
    registry_database_url: str, outsider: asyncpg.Connection
) -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()
    await outsider.add_listener(CHANNEL, lambda *args: heard.put_nowait(str(args[-1])))
    async with await RunRegistry.connect(registry_database_url, listen=False) as holder:
        handle = await holder.register("f-4", "agent", "thread-1")
        assert await handle.bind_stream_fanout()
        assert await handle.publish(SECRET_CHUNK) == 1  # small and alone: it travels inline
    async with asyncio.timeout(5):
        payload = await heard.get()
    assert '"f-4"' in payload  # the run id and seq are visible; the content is not
    assert SECRET_CHUNK.decode() not in payload
    assert base64.b64encode(SECRET_CHUNK).decode() not in payload
