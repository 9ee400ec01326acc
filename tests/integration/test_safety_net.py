"""Notifications are only wake-ups: a lost one costs latency, never correctness."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from registry import RegistrySettings, RunRegistry, repository
from registry.database import DriverConnection, asyncpg_dsn

FAST = RegistrySettings(safety_interval=0.2, health_interval=0.5)
# long enough that only a reconnect-triggered re-check can explain a quick trip
SLOW = RegistrySettings(safety_interval=60, health_interval=0.5)


async def _execute(url: str, query: str, *args: object) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.execute(query, *args)
    finally:
        await connection.close()


async def _insert_decision_without_notify(url: str, run_id: str, target: str) -> None:
    await _execute(
        url,
        "INSERT INTO registry.decisions (run_id, thread_id, agent_id, target_id, action,"
        " decision_updated_at) SELECT run_id, thread_id, agent_id, $2, 'resume', 0"
        " FROM registry.runs WHERE run_id = $1",
        run_id,
        target,
    )


async def test_lost_decision_notification_is_caught_by_the_recheck(
    registry_database_url: str,
) -> None:
    async with await RunRegistry.connect(registry_database_url, settings=FAST) as run_registry:
        handle = await run_registry.register("run-1", "agent-a", "thread-1")
        async with handle.decisions() as inbox:
            waiting = asyncio.create_task(anext(inbox))
            await _insert_decision_without_notify(registry_database_url, "run-1", "silent")
            delivery = await asyncio.wait_for(waiting, 5)
    assert delivery.decision.target_id == "silent"


async def test_lost_cancel_notification_is_caught_by_the_recheck(
    registry_database_url: str,
) -> None:
    async with await RunRegistry.connect(registry_database_url, settings=FAST) as run_registry:
        handle = await run_registry.register("run-1", "agent-a", "thread-1")
        token = handle.cancellation_token()
        await _execute(
            registry_database_url,
            "UPDATE registry.runs SET cancel_requested_at = now() WHERE run_id = $1",
            "run-1",
        )
        await asyncio.wait_for(token.wait(), 5)
        assert token.is_cancelled()


async def test_lost_supersede_notification_still_ends_the_inbox(
    registry_database_url: str,
) -> None:
    async with await RunRegistry.connect(registry_database_url, settings=FAST) as run_registry:
        handle = await run_registry.register("run-1", "agent-a", "thread-1")
        async with handle.decisions() as inbox:
            waiting = asyncio.create_task(anext(inbox))
            await _execute(
                registry_database_url,
                "UPDATE registry.runs SET status = 'superseded', ended_at = now()"
                " WHERE run_id = $1",
                "run-1",
            )
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(waiting, 5)
        assert handle.cancellation_token().is_cancelled()


async def _terminate_listener(url: str, run_registry: RunRegistry) -> int:
    listener = run_registry.listener
    assert listener is not None
    pid = listener.backend_pid
    assert pid is not None
    await _execute(url, "SELECT pg_terminate_backend($1)", pid)
    return pid


async def _wait_reconnected(run_registry: RunRegistry, old_pid: int) -> None:
    listener = run_registry.listener
    assert listener is not None
    async with asyncio.timeout(10):
        while not (listener.connected and listener.backend_pid not in (None, old_pid)):
            await asyncio.sleep(0.01)


async def test_cancel_while_listener_is_down_trips_after_reconnect(
    registry_database_url: str,
) -> None:
    async with await RunRegistry.connect(registry_database_url, settings=SLOW) as run_registry:
        handle = await run_registry.register("run-1", "agent-a", "thread-1")
        token = handle.cancellation_token()
        # a cancel whose notification never arrived (as if sent while the listener was down):
        # with a 60 s safety interval only the re-read after reconnecting can see it
        await _execute(
            registry_database_url,
            "UPDATE registry.runs SET cancel_requested_at = now() WHERE run_id = $1",
            "run-1",
        )
        assert not token.is_cancelled()
        pid = await _terminate_listener(registry_database_url, run_registry)
        await asyncio.wait_for(token.wait(), 10)
        await _wait_reconnected(run_registry, pid)
        assert run_registry.listener is not None
        assert run_registry.listener.reconnects == 1


async def test_decisions_forwarded_while_listener_is_down_are_delivered(
    registry_database_url: str,
) -> None:
    async with await RunRegistry.connect(registry_database_url, settings=SLOW) as run_registry:
        handle = await run_registry.register("run-1", "agent-a", "thread-1")
        async with handle.decisions() as inbox:
            waiting = asyncio.create_task(anext(inbox))
            await _insert_decision_without_notify(registry_database_url, "run-1", "meanwhile")
            await asyncio.sleep(0.1)  # not for synchronisation: shows nothing arrives unaided
            assert not waiting.done()
            pid = await _terminate_listener(registry_database_url, run_registry)
            delivery = await asyncio.wait_for(waiting, 10)
            assert delivery.decision.target_id == "meanwhile"
            await _wait_reconnected(run_registry, pid)
            # and live notifications work again on the new connection
            nxt = asyncio.create_task(anext(inbox))
            await run_registry.forward_decisions_by_run_id(
                "run-1",
                [{"target_id": "live", "action": "resume", "updated_at": 1}],
            )
            assert (await asyncio.wait_for(nxt, 5)).decision.target_id == "live"


async def test_without_a_listener_waiters_still_see_changes(registry_database_url: str) -> None:
    settings = RegistrySettings(safety_interval=0.2)
    async with (
        await RunRegistry.connect(registry_database_url, settings=settings, listen=False) as quiet,
        await RunRegistry.connect(registry_database_url) as other,
    ):
        assert quiet.listener is None
        handle = await quiet.register("run-1", "agent-a", "thread-1")
        token = handle.cancellation_token()
        async with handle.decisions() as inbox:
            waiting = asyncio.create_task(anext(inbox))
            await other.forward_decisions_by_run_id(
                "run-1", [{"target_id": "t", "action": "resume", "updated_at": 1}]
            )
            assert (await asyncio.wait_for(waiting, 5)).decision.target_id == "t"
        await other.cancel_active_run_by_id("run-1")
        await asyncio.wait_for(token.wait(), 5)


async def test_the_recheck_answers_only_for_what_changed(
    registry_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered: list[int] = []
    settled = asyncio.Event()
    changed_run_states = repository.changed_run_states

    async def counted(
        connection: DriverConnection, known: repository.KnownRuns
    ) -> tuple[list[repository.RunState], list[str]]:
        states, gone = await changed_run_states(connection, known)
        answered.append(len(states) + len(gone))
        if len(answered) >= 2:
            settled.set()  # the re-check has run and seen them all
        return states, gone

    monkeypatch.setattr(repository, "changed_run_states", counted)
    async with await RunRegistry.connect(registry_database_url, settings=FAST) as run_registry:
        handles = [
            await run_registry.register(f"run-{n}", "agent-a", f"thread-{n}") for n in range(40)
        ]
        tokens = [handle.cancellation_token() for handle in handles]
        await asyncio.wait_for(settled.wait(), 5)
        quiet = len(answered)
        await _execute(
            registry_database_url,
            "UPDATE registry.runs SET cancel_requested_at = now() WHERE run_id = $1",
            "run-7",
        )
        await asyncio.wait_for(tokens[7].wait(), 5)
        assert not any(token.is_cancelled() for n, token in enumerate(tokens) if n != 7)
    assert answered[quiet - 1] == 0, "with nothing changed, nothing came back"
    assert 1 in answered[quiet:], "the one run that changed, and only it"
    assert max(answered[quiet:]) == 1
