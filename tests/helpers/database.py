"""Read the registry's tables directly, to check what a test's calls left behind."""

from __future__ import annotations

from typing import Any

import asyncpg

from registry.database import asyncpg_dsn


async def fetch(url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    """Run one query on a fresh connection to ``url`` and return its rows as dicts."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return [dict(row) for row in await connection.fetch(query, *args)]
    finally:
        await connection.close()


async def runs_of_thread(url: str, thread_id: str) -> list[dict[str, Any]]:
    """Every run row of ``thread_id``, oldest first."""
    return await fetch(
        url,
        "SELECT run_id, status, superseded_by, end_reason, owner_id, created_at FROM registry.runs"
        " WHERE thread_id = $1 ORDER BY created_at, run_id",
        thread_id,
    )


async def decisions_of_run(url: str, run_id: str) -> list[dict[str, Any]]:
    """Every decision row of ``run_id`` in forward (id) order."""
    return await fetch(
        url,
        "SELECT id, decision_id, target_id, status, attempts, drop_reason FROM registry.decisions"
        " WHERE run_id = $1 ORDER BY id",
        run_id,
    )


async def session_pids(url: str, application_name: str) -> list[int]:
    """Server pids of the sessions with ``application_name`` on ``url``'s database, sorted."""
    rows = await fetch(
        url,
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
        " AND datname = current_database() ORDER BY pid",
        application_name,
    )
    return [int(row["pid"]) for row in rows]
