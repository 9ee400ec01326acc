"""The registry runs under a role with the documented minimal privileges and no DDL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from registry import RegistrySettings, RunRegistry, ToolCallDecision
from registry.database import asyncpg_dsn
from registry.repository import application_grants


async def test_registry_works_under_the_minimal_role(registry_database_url: str) -> None:
    role = f"registry_app_{uuid.uuid4().hex[:12]}"
    database = make_url(registry_database_url).database
    assert database is not None
    admin = await asyncpg.connect(asyncpg_dsn(registry_database_url))
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'app-password'")
    try:
        for statement in application_grants(role, database):
            await admin.execute(statement)
        app_url = (
            make_url(registry_database_url)
            .set(username=role, password="app-password")
            .render_as_string(hide_password=False)
        )
        await _exercise_everything(app_url)
        app = await asyncpg.connect(asyncpg_dsn(app_url))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute("CREATE TABLE intruder (id int)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute("ALTER TABLE registry.runs ADD COLUMN intruder int")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute("DELETE FROM registry.decisions")
        finally:
            await app.close()
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.close()
        cleanup = await asyncpg.connect(asyncpg_dsn(registry_database_url))
        try:
            await cleanup.execute(f"DROP ROLE {role}")
        finally:
            await cleanup.close()


async def _exercise_everything(url: str) -> None:
    settings = RegistrySettings(lease_seconds=1, heartbeat_interval=0.1)
    async with await RunRegistry.connect(url, worker_id="app", settings=settings) as runs:
        handle = await runs.register("run-1", "agent", "thread-1")
        await runs.register("run-2", "agent", "thread-1")  # supersede
        handle = await runs.register("run-3", "agent", "thread-3")
        token = handle.cancellation_token()
        await runs.forward_decisions_by_thread(
            "agent", "thread-3", [ToolCallDecision.resume("c", 1, 1, decision_id="d")]
        )
        async with handle.decisions() as inbox:
            delivery = await asyncio.wait_for(anext(inbox), 5)
            assert await inbox.ack(delivery)
        await handle.bind_stream_fanout()
        subscription = await runs.subscribe_thread_run_stream("run-3", after_seq=0)
        assert subscription is not None
        await handle.publish_many([b"a", b"b"])
        assert (await asyncio.wait_for(anext(subscription), 5)).data == b"a"
        assert await runs.cancel_active_run_by_id("run-3")
        await asyncio.wait_for(token.wait(), 5)
        assert await runs.remove_by_run_id("run-3")
        assert await runs.prune(older_than=timedelta(0)) == 2
        assert [h.run_id for h in await runs.resume_owned_runs()] == ["run-2"]
        assert await runs.adopt_orphaned_runs() == []
        assert await runs.sweep_cancelled_orphans() == []
        assert await runs.active_run_id_for_thread("agent", "thread-1") == "run-2"
