"""The commands operators and deployments use: version, health, Alembic set-up, logging."""

from __future__ import annotations

import asyncio
import sys
from importlib import metadata
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from registry import RunRegistry, ToolCallDecision, downgrade
from registry.database import admin_connection
from registry.distribution import DISTRIBUTION
from registry.schema import current_revision, head_revision, migrations_directory
from tests.cli.runner import registry

#: the alembic command installed next to the interpreter running the tests
ALEMBIC = Path(sys.executable).with_name("alembic")
#: where no server answers
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/absent"


async def test_version_names_the_distribution() -> None:
    result = await registry("--version")
    assert result.code == 0, str(result)
    assert result.stdout == f"{DISTRIBUTION} {metadata.version(DISTRIBUTION)}\n"


async def test_check_is_healthy_on_a_migrated_database(registry_database_url: str) -> None:
    result = await registry("check", "--database-url", registry_database_url)
    assert result.code == 0, str(result)
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "server"],
        ["ok", "schema"],
        ["ok", "listener"],
    ], str(result)
    assert f"at head ({head_revision()})" in lines[1]
    report = (await registry("check", "--json", "--database-url", registry_database_url)).json()
    assert report["healthy"] is True
    assert [check["name"] for check in report["checks"]] == ["server", "schema", "listener"]


async def test_check_fails_on_a_schema_behind_or_no_server(registry_database_url: str) -> None:
    await downgrade(registry_database_url, "0002")
    behind, absent = await asyncio.gather(
        registry("check", "--database-url", registry_database_url),
        registry("check", "--timeout", "2", "--database-url", UNREACHABLE),
    )
    assert behind.code == 1, str(behind)
    schema = behind.stdout.splitlines()[1]
    assert schema.startswith("FAIL  schema"), str(behind)
    assert f"at 0002, head is {head_revision()}: run `registry migrate`" in schema
    assert behind.stdout.splitlines()[2].startswith("ok    listener"), str(behind)
    assert absent.code == 1, str(absent)
    assert [line.split()[:2] for line in absent.stdout.splitlines()] == [
        ["FAIL", "server"],
        ["FAIL", "schema"],
        ["FAIL", "listener"],
    ], str(absent)
    assert "Traceback" not in absent.stderr


async def test_status_exits_1_while_the_schema_is_behind(registry_database_url: str) -> None:
    url = ("--database-url", registry_database_url)
    assert (await registry("status", *url)).code == 0
    await downgrade(registry_database_url, "0002")
    behind = await registry("status", "--json", *url)
    assert behind.code == 1, str(behind)
    assert behind.json()["schema_ready"] is False


async def test_verbose_logs_the_registry_and_not_alembic(registry_database_url: str) -> None:
    await downgrade(registry_database_url, "0002")
    migrated = await registry("-v", "migrate", "--database-url", registry_database_url)
    assert migrated.code == 0, str(migrated)
    assert "alembic" not in migrated.stderr, str(migrated)
    assert "sqlalchemy" not in migrated.stderr, str(migrated)


async def test_alembic_ini_runs_the_packaged_migrations(
    registry_database_url: str, tmp_path: Path
) -> None:
    printed = await registry("alembic-ini")
    assert printed.code == 0, str(printed)
    ini = tmp_path / "alembic.ini"
    ini.write_text(printed.stdout)
    config = Config(str(ini))
    assert Path(config.get_main_option("script_location") or "") == migrations_directory()
    assert ScriptDirectory.from_config(config).get_current_head() == head_revision()

    # the alembic command, from another directory, with nothing but that file
    async def alembic(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            str(ALEMBIC),
            "-c",
            str(ini),
            "-x",
            f"url={registry_database_url}",
            *args,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, output.decode()
        return output.decode()

    assert head_revision() in await alembic("heads")
    await alembic("downgrade", "0002")
    assert await current_revision(registry_database_url) == "0002"
    await alembic("upgrade", "head")
    assert await current_revision(registry_database_url) == head_revision()


#: what ages each stranded state past the doctor's default thresholds
AGED = [
    "UPDATE registry.runs SET lease_expires_at = now() - interval '1 hour'"
    " WHERE run_id = 'run-lease'",
    "UPDATE registry.runs SET cancel_requested_at = now() - interval '1 hour'"
    " WHERE run_id = 'run-cancel'",
    "UPDATE registry.decisions SET delivered_at = now() - interval '1 day'"
    " WHERE run_id = 'run-unacked'",
    "UPDATE registry.runs SET ended_at = now() - interval '30 days' WHERE run_id = 'run-stream'",
]


async def test_doctor_names_each_stranded_state(registry_database_url: str) -> None:
    url = ("--database-url", registry_database_url)
    # a worker that leaves one of each behind, then goes away
    async with await RunRegistry.connect(registry_database_url, worker_id="gone") as gone:
        await gone.register("run-lease", "agent", "thread-1")
        await gone.register("run-cancel", "agent", "thread-2")
        assert await gone.cancel_active_run_by_id("run-cancel")
        unacked = await gone.register("run-unacked", "agent", "thread-3")
        approval = ToolCallDecision.resume("call-1", {"approved": True}, updated_at=1732400000000)
        assert await gone.forward_decisions_by_run_id("run-unacked", [approval]) is not None
        async with unacked.decisions() as inbox, asyncio.timeout(10):
            async for _delivery in inbox:
                break  # delivered, never acknowledged
        streamed = await gone.register("run-stream", "agent", "thread-4")
        await streamed.bind_stream_fanout()
        await streamed.publish(b"chunk")
        assert await streamed.remove()

    fresh = await registry("doctor", *url)
    assert fresh.code == 0, str(fresh)
    assert [line.split()[:2] for line in fresh.stdout.splitlines()] == [
        ["ok", "expired_leases:"],
        ["ok", "stale_cancels:"],
        ["ok", "unacknowledged_decisions:"],
        ["ok", "unpruned_streams:"],
    ], str(fresh)

    async with admin_connection(registry_database_url) as connection:
        for statement in AGED:
            await connection.execute(statement)
    stranded, tolerant = await asyncio.gather(
        registry("doctor", *url), registry("doctor", "--retention", "60d", "--json", *url)
    )
    assert stranded.code == 1, str(stranded)
    lines = stranded.stdout.splitlines()
    expected = [
        ("expired_leases", "run-lease", "adopt_orphaned_runs()"),
        ("stale_cancels", "run-cancel", "handle.remove()"),
        ("unacknowledged_decisions", "run-unacked/call-1", "inbox.ack(delivery)"),
        ("unpruned_streams", "run-stream", "registry prune --older-than"),
    ]
    assert len(lines) == len(expected), str(stranded)
    for line, (name, example, fix) in zip(lines, expected, strict=True):
        assert line.startswith(f"FAIL  {name}: 1 "), line
        assert f"(e.g. {example}); fix: " in line, line
        assert fix in line, line

    # a longer retention lets the ended run's stream be; the rest still fail
    assert tolerant.code == 1, str(tolerant)
    report = {item["name"]: item for item in tolerant.json()["invariants"]}
    assert report["unpruned_streams"] == {
        "name": "unpruned_streams",
        "ok": True,
        "count": 0,
        "examples": [],
        "fix": None,
    }
    assert report["expired_leases"]["examples"] == ["run-lease"]
