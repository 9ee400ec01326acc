"""The migrations are the only source of the schema, and they agree with registry.tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection

import registry
from registry import RunRegistry, SchemaNotReadyError
from registry.database import asyncpg_dsn, create_engine
from registry.schema import head_revision
from registry.tables import metadata

ROOT = Path(__file__).resolve().parents[2]


def _diff(connection: Connection, schema: str = "registry") -> list[Any]:
    # the tables as the migrations see them: their schema alone on the search path
    connection.execute(text("SELECT set_config('search_path', :path, true)"), {"path": schema})
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, metadata))


async def _schema_diff(url: str, schema: str = "registry") -> list[Any]:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_diff, schema)
    finally:
        await engine.dispose()


async def _tables(url: str, schema: str = "registry") -> set[str]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema
        )
    finally:
        await connection.close()
    return {row["tablename"] for row in rows}


async def test_head_matches_tables_module(registry_database_url: str) -> None:
    assert await _schema_diff(registry_database_url) == []


async def test_downgrade_then_upgrade_round_trips(registry_database_url: str) -> None:
    await registry.downgrade(registry_database_url, "base")
    assert await _tables(registry_database_url) == {"alembic_version"}
    await registry.migrate(registry_database_url)
    assert {"runs", "decisions"} <= await _tables(registry_database_url)
    assert await _schema_diff(registry_database_url) == []
    # and the upgraded schema works
    async with await RunRegistry.connect(registry_database_url) as run_registry:
        handle = await run_registry.register("run-1", "agent-a", "thread-1")
        assert handle.run_id == "run-1"


async def test_migrate_is_idempotent(registry_database_url: str) -> None:
    await registry.migrate(registry_database_url)
    await registry.migrate(registry_database_url)
    assert await _schema_diff(registry_database_url) == []


async def test_connect_refuses_an_unmigrated_database(registry_database_url: str) -> None:
    await registry.downgrade(registry_database_url, "base")
    with pytest.raises(SchemaNotReadyError, match=head_revision()):
        await RunRegistry.connect(registry_database_url)


def test_alembic_command_line_upgrades_with_alembic_ini(registry_database_url: str) -> None:
    # the same migrations through `alembic -x url=... upgrade head`, as an operator runs them
    def alembic(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "alembic", "-x", f"url={registry_database_url}", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    down = alembic("downgrade", "base")
    assert down.returncode == 0, down.stderr
    up = alembic("upgrade", "head")
    assert up.returncode == 0, up.stderr
    current = alembic("current")
    assert head_revision() in current.stdout


def test_offline_sql_contains_the_schema() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head", "--sql"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "CREATE TABLE runs" in result.stdout
    assert "CREATE UNIQUE INDEX uq_runs_active_thread" in result.stdout


async def test_downgrading_outcomes_keeps_every_run_readable(registry_database_url: str) -> None:
    # 0006 knows neither queued runs nor the outcomes failed and interrupted
    async with RunRegistry.connect(registry_database_url) as runs:
        await runs.register("run-1", "agent-a", "thread-1")
        await runs.register("run-2", "agent-a", "thread-1", on_conflict="enqueue")
        failed = await runs.register("run-3", "agent-a", "thread-2")
        assert await failed.finish("failed", reason="model refused")
    await registry.downgrade(registry_database_url, "0006")
    connection = await asyncpg.connect(asyncpg_dsn(registry_database_url))
    try:
        rows = await connection.fetch(
            "SELECT run_id, status, end_reason FROM registry.runs ORDER BY 1"
        )
    finally:
        await connection.close()
    assert [tuple(row) for row in rows] == [
        ("run-1", "active", None),
        ("run-2", "cancelled", "still queued when the schema was downgraded"),
        ("run-3", "completed", "model refused"),
    ]
    await registry.migrate(registry_database_url)
    assert await _schema_diff(registry_database_url) == []
