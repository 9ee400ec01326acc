"""``registry demo`` against this test's database: it exits 0 and shows what it checked."""

from __future__ import annotations

import asyncio
import re

from registry import RunRegistry, RunStatus
from tests.cli.runner import registry


async def test_demo_runs_and_checks_its_claims(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    # two at once on one database: each picks its own ids, so neither disturbs the other
    result, other = await asyncio.gather(
        registry("demo", "--database-url", registry_database_url, deadline=90),
        registry("demo", "--database-url", registry_database_url, deadline=90),
    )
    assert result.code == 0, str(result)
    assert other.code == 0, str(other)
    out = result.stdout
    checks = re.findall(r"^\s+[\d.]+s\s+✔ (.+)$", out, flags=re.MULTILINE)
    assert len(checks) == 14, out
    assert any("killed with SIGKILL (exit -9)" in check for check in checks), out
    assert any("delivered the approval (resume call-1), attempt 1" in c for c in checks), out
    assert any("delivered nothing" in check for check in checks), out
    assert any("chunks 1-5 once each, in order" in check for check in checks), out
    assert "✔ all 14 checks held" in out
    assert "✘" not in out

    # what it claims is in the database: the run finished, the decision acked once
    [run_id] = re.findall(r"^run\s+(demo-run-[0-9a-f]{8}) ", out, flags=re.MULTILINE)
    record = await run_registry.run(run_id)
    assert record is not None
    assert record.status is RunStatus.COMPLETED
    subscription = await run_registry.subscribe_thread_run_stream(run_id, after_seq=0)
    assert subscription is not None
    chunks = [chunk async for chunk in subscription]
    assert [chunk.seq for chunk in chunks] == [1, 2, 3, 4, 5]
    assert run_id not in other.stdout
