"""The command line shows how runs ended: the outcome, and the reason of a failed one."""

from __future__ import annotations

import pytest

from registry import RunRegistry
from tests.cli.runner import registry


async def test_runs_shows_outcomes_and_the_reason_of_a_failure(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    url = ("--database-url", registry_database_url)
    with pytest.raises(RuntimeError):
        async with run_registry.run("run-1", "agent-a", "thread-1"):
            raise RuntimeError("tool crashed")
    await run_registry.register("run-2", "agent-a", "thread-2")
    await run_registry.register("run-3", "agent-a", "thread-2", on_conflict="enqueue")

    table = await registry("runs", *url)
    assert table.code == 0, str(table)
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[2:] if line.strip()}
    assert "failed: 'RuntimeError: tool crashed'" in rows["run-1"], str(table)
    assert rows["run-3"].split()[3] == "queued", str(table)

    failed = await registry("runs", "--json", "--status", "failed", *url)
    assert [(run["run_id"], run["end_reason"]) for run in failed.json()] == [
        ("run-1", "RuntimeError: tool crashed")
    ]
    queued = await registry("runs", "--json", "--status", "queued", *url)
    assert [run["run_id"] for run in queued.json()] == ["run-3"]
