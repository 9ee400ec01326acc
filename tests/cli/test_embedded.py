"""The embedded database: ``registry db ...`` and commands without a URL, with data kept."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import RunRegistry
from registry.embedded import stop_embedded
from tests.cli.runner import assert_error, registry


@pytest.fixture
def data_home() -> Iterator[Path]:
    """A private REGISTRY_DATA_DIR (short: the server's socket may live in it)."""
    home = Path(tempfile.mkdtemp(prefix="regcli"))
    try:
        yield home
    finally:
        stop_embedded(home / "postgres")
        shutil.rmtree(home, ignore_errors=True)


async def test_the_embedded_database_is_started_on_demand_and_kept(data_home: Path) -> None:
    env = {"REGISTRY_DATA_DIR": str(data_home)}

    before = await registry("db", "status", env=env)
    assert before.code == 1, str(before)
    assert "not created yet" in before.stdout
    assert not (data_home / "postgres").exists(), "status must not create anything"

    started = await registry("db", "start", env=env, deadline=120)
    assert started.code == 0, str(started)
    url = started.stdout.strip()
    assert url.startswith("postgresql://"), str(started)
    assert "/registry?" in url, str(started)
    assert "started" in started.stderr

    printed, state, status = await asyncio.gather(
        registry("db", "url", env=env),
        registry("db", "status", "--json", env=env),
        registry("status", "--json", env=env),
    )
    assert printed.stdout.strip() == url, str(printed)
    details = state.json()
    assert state.code == 0, str(state)
    assert details["running"] is True
    assert details["url"] == url
    assert details["data_dir"] == str((data_home / "postgres").resolve())
    report = status.json()
    assert report["source"] == "embedded"
    assert report["schema_ready"] is True

    # something to find tomorrow
    async with await RunRegistry.connect(url, worker_id="yesterday", listen=False) as runs:
        await runs.register("run-yesterday", "agent-a", "thread-1")

    stopped = await registry("db", "stop", env=env)
    assert stopped.code == 0, str(stopped)
    assert stopped.stdout.startswith("stopped the embedded PostgreSQL"), str(stopped)

    # the next command without a URL starts the same server again, with its data; with the
    # variable set, the variable wins
    listed, elsewhere = await asyncio.gather(
        registry("runs", "--json", env=env, deadline=120),
        registry("runs", env=env | {"REGISTRY_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"}),
    )
    assert listed.code == 0, str(listed)
    assert [run["run_id"] for run in listed.json()] == ["run-yesterday"]
    assert "started the embedded PostgreSQL" in listed.stderr
    assert_error(elsewhere, 1, "cannot reach the database at postgresql://nobody@127.0.0.1:1/x")
