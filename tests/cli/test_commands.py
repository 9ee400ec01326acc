"""Each command as a subprocess against this test's database, checked against the registry."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path
from typing import Any

from registry import RunRegistry, RunStatus, ToolCallDecision, downgrade, repository
from registry.database import admin_connection
from registry.schema import head_revision
from tests.cli.runner import assert_error, killed_unless_done, registry, start

WAKE_DEADLINE = 10.0


async def decisions_of(url: str, run_id: str) -> list[dict[str, Any]]:
    """The run's decision rows, read directly."""
    async with admin_connection(url) as connection:
        return await repository.decisions_of_run(connection, run_id)


def decision(target_id: str, decision_id: str = "", action: str = "resume") -> dict[str, object]:
    return {
        "target_id": target_id,
        "decision_id": decision_id,
        "action": action,
        "result": {"approved": action == "resume"},
        "updated_at": 1732400000000,
    }


async def test_status_and_migrate(run_registry: RunRegistry, registry_database_url: str) -> None:
    url = ("--database-url", registry_database_url)
    await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.register("run-2", "agent-a", "thread-2")
    await run_registry.remove_by_run_id("run-2")
    await run_registry.forward_decisions_by_run_id("run-1", [decision("call-1")])

    # the environment variable chooses the database when no option does
    status = await registry(
        "status", "--json", env={"REGISTRY_DATABASE_URL": registry_database_url}
    )
    assert status.code == 0, str(status)
    report = status.json()
    assert report["source"] == "environment"
    assert report["schema_revision"] == report["head_revision"] == head_revision()
    assert report["schema_ready"] is True
    assert int(report["server_version"].split(".")[0]) >= 14
    assert report["runs"] == {
        "active": 1,
        "queued": 0,
        "completed": 1,
        "cancelled": 0,
        "superseded": 0,
        "failed": 0,
        "interrupted": 0,
    }
    assert report["decisions"] == {"pending": 1, "delivered": 0, "acked": 0, "dropped": 0}

    await downgrade(registry_database_url, "0002")
    behind, refused = await asyncio.gather(
        registry("status", *url), registry("audit", "--format", "json", *url)
    )
    assert behind.code == 1, str(behind)
    assert "0002" in behind.stdout
    assert "behind: run `registry migrate`" in behind.stdout
    assert_error(refused, 1, "schema is at 0002", "run `registry migrate`")

    migrated = await registry("migrate", *url)
    assert migrated.code == 0, str(migrated)
    assert f"schema migrated from 0002 to {head_revision()}" in migrated.stdout
    again, audit = await asyncio.gather(
        registry("migrate", *url), registry("audit", "--format", "json", *url)
    )
    assert f"schema already at {head_revision()}" in again.stdout, str(again)
    assert [row["target_id"] for row in audit.json()] == ["call-1"], str(audit)


async def test_migrate_sql_prints_the_ddl_without_a_database() -> None:
    result = await registry(
        "migrate", "--sql", "--database-url", "postgresql://nobody@127.0.0.1:1/x"
    )
    assert result.code == 0, str(result)
    assert "CREATE TABLE runs" in result.stdout
    assert "CREATE VIEW decision_audit" in result.stdout
    assert result.stdout.rstrip().endswith("COMMIT;")


async def test_runs_and_run_show(run_registry: RunRegistry, registry_database_url: str) -> None:
    url = ("--database-url", registry_database_url)
    await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.register("run-2", "agent-b", "thread-2")
    handle = await run_registry.register("run-3", "agent-a", "thread-1")  # supersedes run-1
    await run_registry.remove_by_run_id("run-2")
    await handle.bind_stream_fanout()
    await handle.publish_many([b"a", b"b", b"c"])
    await run_registry.forward_decisions_by_run_id("run-3", [decision("call-1", "d-1")])

    thread, completed, show, table, show_table = await asyncio.gather(
        registry("runs", "--json", "--thread", "thread-1", "--limit", "1", *url),
        registry("runs", "--json", "--agent", "agent-b", "--status", "completed", *url),
        registry("run", "show", "run-3", "--json", *url),
        registry("runs", *url),
        registry("run", "show", "run-3", *url),
    )
    assert [(run["run_id"], run["status"]) for run in thread.json()] == [("run-3", "active")]
    assert [run["run_id"] for run in completed.json()] == ["run-2"]

    shown = show.json()
    assert shown["run"]["run_id"] == "run-3"
    assert shown["run"]["owner_id"] == "test-worker"
    assert shown["stream"] == {"chunks": 3, "last_seq": 3}
    assert [(d["decision_id"], d["status"], d["attempts"]) for d in shown["decisions"]] == [
        ("d-1", "pending", 0)
    ]
    assert table.code == 0, str(table)
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["RUN", "THREAD", "AGENT", "STATUS", "OWNER", "CREATED", "ENDED"]
    assert [line.split()[:4] for line in lines[2:5]] == [
        ["run-3", "thread-1", "agent-a", "active"],
        ["run-2", "thread-2", "agent-b", "completed"],
        ["run-1", "thread-1", "agent-a", "superseded"],
    ]
    assert "3 chunks stored, last seq 3" in show_table.stdout, str(show_table)
    assert "d-1" in show_table.stdout


async def test_forward_and_cancel_reach_the_run(
    run_registry: RunRegistry, registry_database_url: str, tmp_path: Path
) -> None:
    url = ("--database-url", registry_database_url)
    first = await run_registry.register("run-1", "agent-a", "thread-1")
    second = await run_registry.register("run-2", "agent-b", "thread-2")
    inbox = first.decisions()
    batch = tmp_path / "decisions.json"
    batch.write_text(json.dumps([decision("call-1", "d-1"), decision("call-2", "d-2", "cancel")]))

    # all at once: forwards by run (from a file), by thread (from stdin), a retry, another
    # agent's attempt, and cancels, which do not end the runs
    by_run, by_thread, retried, not_owner, cancel_by_id, cancel_by_thread = await asyncio.gather(
        registry("forward", "run-1", "--decision", f"@{batch}", *url),
        registry(
            "forward", "--thread", "thread-1", "--agent", "agent-a", "--decision", "@-", "--json",
            *url,
            stdin=json.dumps(decision("call-3", "d-3")),
        ),
        registry("forward", "run-1", "--decision", json.dumps(decision("call-1", "d-1")), *url),
        registry(
            "forward", "--thread", "thread-1", "--agent", "agent-b", "--decision",
            json.dumps(decision("call-4")), *url,
        ),
        registry("cancel", "run-1", *url),
        registry("cancel", "--thread", "thread-2", *url),
    )  # fmt: skip
    assert by_run.stdout.strip() == "forwarded 2 decisions to run run-1 (thread thread-1)"
    assert by_thread.json() == {"run_id": "run-1", "thread_id": "thread-1", "decisions": 1}
    assert retried.code == 0, str(retried)
    assert_error(not_owner, 1, "no active run owned by agent 'agent-b'")
    assert cancel_by_id.stdout.strip() == "cancel requested for run run-1", str(cancel_by_id)
    assert cancel_by_thread.stdout.strip() == "cancel requested for run run-2"

    # a cancel from the command line trips the tokens here, in another process
    await asyncio.wait_for(first.cancellation_token().wait(), WAKE_DEADLINE)
    await asyncio.wait_for(second.cancellation_token().wait(), WAKE_DEADLINE)

    received = {}
    for _ in range(3):
        delivery = await asyncio.wait_for(anext(inbox), WAKE_DEADLINE)
        received[delivery.decision.target_id] = delivery.decision
        await inbox.ack(delivery)
    await inbox.aclose()
    assert set(received) == {"call-1", "call-2", "call-3"}
    assert received["call-2"] == ToolCallDecision.model_validate(
        decision("call-2", "d-2", "cancel")
    )
    stored = await decisions_of(registry_database_url, "run-1")
    assert sorted(row["decision_id"] for row in stored) == ["d-1", "d-2", "d-3"], (
        "retry stored once"
    )
    assert await run_registry.remove_by_run_id("run-1"), "the cancel did not end the run"
    record = await run_registry.run("run-1")
    assert record is not None
    assert record.status is RunStatus.CANCELLED


async def test_tail_prints_the_stream(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    url = ("--database-url", registry_database_url)
    text = await run_registry.register("run-1", "agent-a", "thread-1")
    await text.bind_stream_fanout()
    chunks = [b"Hello", b", ", "wörld".encode(), b"\xff\xfe"]
    for chunk in chunks:
        await text.publish(chunk)
    empty = await run_registry.register("run-2", "agent-a", "thread-2")
    await empty.bind_stream_fanout()
    await run_registry.register("run-3", "agent-a", "thread-3")

    whole, framed, separated, tail_json, nothing_yet, no_stream = await asyncio.gather(
        registry("tail", "run-1", "--separator", "", *url),
        registry("tail", "run-1", *url),
        registry("tail", "run-1", "--separator", "\n--\n", *url),
        registry("tail", "run-1", "--from", "3", "--json", *url),
        registry("tail", "run-2", *url),
        registry("tail", "run-3", *url),
    )
    assert whole.code == 0, str(whole)
    assert whole.output == b"".join(chunks)
    assert framed.output == b"".join(chunk + b"\n" for chunk in chunks), str(framed)
    assert separated.output == b"".join(chunk + b"\n--\n" for chunk in chunks), str(separated)
    assert tail_json.json_lines() == [
        {"seq": 3, "data": "wörld"},
        {"seq": 4, "data_base64": "//4="},
    ]
    assert nothing_yet.code == 0, str(nothing_yet)
    assert nothing_yet.output == b""
    assert_error(no_stream, 1, "run 'run-3' has no stream")


async def test_tail_follow_prints_live_chunks_until_the_run_ends(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await handle.bind_stream_fanout()
    await handle.publish_many([b"one", b"two"])
    process = await start(
        "tail",
        "run-1",
        "--follow",
        "--from",
        "2",
        "--json",
        "--database-url",
        registry_database_url,
    )
    assert process.stdout is not None
    async with killed_unless_done(process):
        # the replayed chunk shows the follower is subscribed; what follows arrives live
        first = await asyncio.wait_for(process.stdout.readline(), 30)
        assert json.loads(first) == {"seq": 2, "data": "two"}
        await handle.publish_many([b"three", b"four"])
        await handle.publish(b"five")
        await handle.remove()
        rest, err = await asyncio.wait_for(process.communicate(), WAKE_DEADLINE)
    assert process.returncode == 0, err
    lines = [json.loads(line) for line in rest.decode().splitlines()]
    assert lines == [
        {"seq": 3, "data": "three"},
        {"seq": 4, "data": "four"},
        {"seq": 5, "data": "five"},
    ]


async def test_tail_follow_without_json_ends_each_chunk_with_a_newline(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await handle.bind_stream_fanout()
    await handle.publish(b"one")
    process = await start("tail", "run-1", "--follow", "--database-url", registry_database_url)
    assert process.stdout is not None
    async with killed_unless_done(process):
        assert await asyncio.wait_for(process.stdout.readline(), 30) == b"one\n"
        await handle.publish_many([b"two", b"three"])
        await handle.remove()
        rest, err = await asyncio.wait_for(process.communicate(), WAKE_DEADLINE)
    assert process.returncode == 0, err
    assert rest == b"two\nthree\n"


async def test_audit_reads_the_view(run_registry: RunRegistry, registry_database_url: str) -> None:
    url = ("--database-url", registry_database_url)
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.register("run-2", "agent-b", "thread-2")
    await run_registry.forward_decisions_by_run_id(
        "run-1", [decision("call-1", "d-1"), decision("call-2", "d-2")]
    )
    await run_registry.forward_decisions_by_run_id("run-2", [decision("call-3", "d-3")])
    inbox = handle.decisions()
    acked = await asyncio.wait_for(anext(inbox), WAKE_DEADLINE)
    await inbox.ack(acked)
    await asyncio.wait_for(anext(inbox), WAKE_DEADLINE)  # delivered, never acknowledged
    await inbox.aclose()
    await handle.remove()  # drops the unacknowledged one

    everything, as_csv, table, future, newest = await asyncio.gather(
        registry("audit", "--format", "json", *url),
        registry("audit", "--agent", "agent-b", "--since", "1h", "--format", "csv", *url),
        registry("audit", "--run", "run-1", *url),
        registry("audit", "--since", "2999-01-01", *url),
        registry("audit", "--thread", "thread-1", "--limit", "1", "--format", "json", *url),
    )
    rows = everything.json()
    assert [(r["decision_id"], r["status"], r["attempts"]) for r in rows] == [
        ("d-1", "acked", 1),
        ("d-2", "dropped", 1),
        ("d-3", "pending", 0),
    ]
    first, second, third = rows
    assert 0 <= first["delivery_latency"] <= first["ack_latency"] < 60
    assert first["run_status"] == "completed"
    assert second["drop_reason"] == "run run-1 ended"
    assert second["ack_latency"] is None
    assert third["delivery_latency"] is None
    assert third["run_status"] == "active"
    assert third["result"] == {"approved": True}

    [row] = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert row["decision_id"] == "d-3"
    assert row["agent_id"] == "agent-b"
    assert json.loads(row["result"]) == {"approved": True}
    assert row["delivery_latency"] == ""

    assert table.code == 0, str(table)
    assert "acked" in table.stdout
    assert "dropped (run run-1 ended)" in table.stdout
    assert "d-3" not in table.stdout
    assert future.stdout.strip() == "no decisions match"
    assert [r["decision_id"] for r in newest.json()] == ["d-2"]


async def test_prune_deletes_ended_streams_only(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    url = ("--database-url", registry_database_url)
    ended = await run_registry.register("run-1", "agent-a", "thread-1")
    active = await run_registry.register("run-2", "agent-a", "thread-2")
    for handle in (ended, active):
        await handle.bind_stream_fanout()
        await handle.publish_many([b"x", b"y"])
    await ended.remove()

    kept = await registry("prune", "--older-than", "7d", *url)
    assert kept.stdout.strip() == "deleted 0 stream chunks of runs that ended more than 7d ago"
    assert await run_registry.subscribe_thread_run_stream("run-1", after_seq=0) is not None
    pruned = await registry("prune", "--older-than", "0s", *url)
    assert pruned.code == 0, str(pruned)
    assert pruned.stdout.startswith("deleted 2 stream chunks"), str(pruned)
    assert await run_registry.subscribe_thread_run_stream("run-1", after_seq=0) is None
    subscription = await run_registry.subscribe_thread_run_stream("run-2", after_seq=0)
    assert subscription is not None
    assert [chunk.data for chunk in [await anext(subscription), await anext(subscription)]] == [
        b"x",
        b"y",
    ]
    await subscription.aclose()
