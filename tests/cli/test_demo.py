"""``registry demo`` against this test's database: it exits 0 and shows what it checked."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path

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


#: a ``sitecustomize`` that sets every Python clock read of the process an hour ahead
_AHEAD = """
import datetime as _datetime
import time as _time

_HOUR = 3600.0
_wall = _time.time
_time.time = lambda: _wall() + _HOUR


class _Ahead(_datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return super().now(tz) + _datetime.timedelta(seconds=_HOUR)


_datetime.datetime = _Ahead
"""


async def test_demo_holds_with_the_local_clock_an_hour_ahead(
    registry_database_url: str, tmp_path: Path
) -> None:
    # lease times are the database's: nothing may compare them with this machine's clock
    (tmp_path / "sitecustomize.py").write_text(_AHEAD)
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import time, datetime; print(time.time(), datetime.datetime.now().timestamp())",
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await probe.communicate()
    assert all(float(value) > time.time() + 3000 for value in out.split()), out  # it is ahead
    result = await registry(
        "demo",
        "--database-url",
        registry_database_url,
        env={"PYTHONPATH": str(tmp_path)},
        deadline=90,
    )
    assert result.code == 0, str(result)
    assert "✔ all 14 checks held" in result.stdout
