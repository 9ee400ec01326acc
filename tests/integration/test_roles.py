"""The roles the README documents do what it says they can, and fail at what it says they
cannot: the application role cannot rewrite the audit trail, nobody can change what a
decision received or reopen a final one, and the auditor reads the audit view only."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from registry import RegistrySettings, RunRegistry, ToolCallDecision
from registry.database import asyncpg_dsn
from registry.repository import application_grants
from tests.cli.runner import registry


async def _role_url(admin: asyncpg.Connection, url: str, role: str) -> str:
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'secret'")
    return make_url(url).set(username=role, password="secret").render_as_string(hide_password=False)


@pytest.fixture
async def roles(registry_database_url: str) -> AsyncIterator[dict[str, str]]:
    """URLs of an application role (the documented grants) and an auditor role (CONNECT,
    USAGE, SELECT on decision_audit), on a database with one acked and one delivered decision."""
    database = make_url(registry_database_url).database
    assert database is not None
    suffix = uuid.uuid4().hex[:10]
    app, auditor = f"app_{suffix}", f"auditor_{suffix}"
    admin = await asyncpg.connect(asyncpg_dsn(registry_database_url))
    try:
        urls = {
            "owner": registry_database_url,
            "app": await _role_url(admin, registry_database_url, app),
            "auditor": await _role_url(admin, registry_database_url, auditor),
        }
        for statement in application_grants(app, database):
            await admin.execute(statement)
        await admin.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {auditor}')
        await admin.execute(f"GRANT USAGE ON SCHEMA registry TO {auditor}")
        await admin.execute(f"GRANT SELECT ON registry.decision_audit TO {auditor}")
        settings = RegistrySettings(safety_interval=60)
        async with await RunRegistry.connect(urls["app"], settings=settings) as runs:
            handle = await runs.register("run-1", "agent", "thread-1")
            decisions = [
                ToolCallDecision.resume(f"call-{i}", {"ok": True}, i, decision_id=f"d{i}")
                for i in (1, 2)
            ]
            assert await runs.forward_decisions_by_run_id("run-1", decisions) is not None
            async with handle.decisions() as inbox:
                delivery = await anext(inbox)
                assert await inbox.ack(delivery)
        yield urls
    finally:
        for role in (app, auditor):
            await admin.execute(f"DROP OWNED BY {role}")
            await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def _execute(url: str, statement: str) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE registry.decisions SET result = '{\"approved\": false}' WHERE decision_id = 'd1'",
        "UPDATE registry.decisions SET reason = 'rewritten' WHERE decision_id = 'd1'",
        "UPDATE registry.decisions SET received_at = now() - interval '1 day'"
        " WHERE decision_id = 'd1'",
        "UPDATE registry.decisions SET target_id = 'other' WHERE decision_id = 'd1'",
        "UPDATE registry.runs SET agent_id = 'intruder' WHERE run_id = 'run-1'",
        "DELETE FROM registry.decisions",
        "DELETE FROM registry.runs",
    ],
)
async def test_the_application_role_cannot_rewrite_what_was_received(
    roles: dict[str, str], statement: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _execute(roles["app"], statement)


@pytest.mark.parametrize("role", ["app", "owner"])
@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("UPDATE registry.decisions SET status = 'pending' WHERE decision_id = 'd1'", "final"),
        ("UPDATE registry.decisions SET status = 'dropped' WHERE decision_id = 'd1'", "final"),
        ("UPDATE registry.decisions SET acked_at = now() WHERE decision_id = 'd1'", "final"),
        ("UPDATE registry.decisions SET status = 'pending' WHERE decision_id = 'd2'", "pending"),
    ],
)
async def test_no_role_reopens_or_alters_a_decision_once_decided(
    roles: dict[str, str], role: str, statement: str, message: str
) -> None:
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match=message):
        await _execute(roles[role], statement)


async def test_even_the_owner_cannot_change_what_a_decision_received(
    roles: dict[str, str],
) -> None:
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="immutable"):
        await _execute(roles["owner"], "UPDATE registry.decisions SET result = 'null' WHERE true")


async def test_the_auditor_reads_the_audit_view_and_nothing_else(roles: dict[str, str]) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(roles["auditor"]))
    try:
        rows = await connection.fetch(
            "SELECT decision_id, status FROM registry.decision_audit ORDER BY id"
        )
        # the inbox claimed both and acknowledged one
        assert [(row["decision_id"], row["status"]) for row in rows] == [
            ("d1", "acked"),
            ("d2", "delivered"),
        ]
        for table in ("runs", "decisions", "stream_chunks", "notification_secrets"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.fetch(f"SELECT 1 FROM registry.{table} LIMIT 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute("UPDATE registry.decisions SET status = 'acked'")
    finally:
        await connection.close()


async def test_the_auditor_runs_registry_audit_and_status(roles: dict[str, str]) -> None:
    url = ("--database-url", roles["auditor"])
    audit = await registry("audit", "--format", "json", *url)
    assert audit.code == 0, str(audit)
    assert [(row["decision_id"], row["status"]) for row in audit.json()] == [
        ("d1", "acked"),
        ("d2", "delivered"),
    ]
    status = await registry("status", "--json", *url)
    assert status.code == 0, str(status)
    report = status.json()
    # what the auditor may read: the server, and decisions through the view; not the tables
    assert report["schema_ready"] is None
    assert report["runs"] is None
    assert report["decisions"] == {"pending": 0, "delivered": 1, "acked": 1, "dropped": 0}
    human = await registry("status", *url)
    assert human.code == 0, str(human)
    assert "not visible to this role" in human.stdout
