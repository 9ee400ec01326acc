"""The listener's supervisor outlives every way the server drops the LISTEN connection.

When the server ends a session it sends a FATAL error and only then closes the socket. A health
probe that starts between the two finds asyncpg's protocol still consuming that error and fails
with ``InternalClientError`` ("another operation is in progress"), not with a connection error;
the supervisor must take that, like any failure, as "connection dead", and reconnect.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from registry import RegistrySettings, RunRegistry
from registry.database import asyncpg_dsn
from registry.listener import Listener
from registry.notifications import NotificationKey
from registry.repository import application_grants, health_probe

#: The server's ``idle_session_timeout`` for the idling role, in seconds.
IDLE_TIMEOUT = 2.0


async def _until(condition: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll ``check()`` until it is true; fail the test with ``condition`` after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"not within {timeout}s: {condition}")


def _listener(runs: RunRegistry) -> Listener:
    listener = runs.listener
    assert listener is not None
    return listener


def _replaced(listener: Listener, pid: int) -> Callable[[], bool]:
    """Whether ``listener`` is connected again, on another backend than ``pid``."""
    return lambda: listener.connected and listener.backend_pid not in (None, pid)


@pytest.fixture
async def idling_role_url(registry_database_url: str) -> AsyncIterator[str]:
    """URL of ``registry_database_url`` as a fresh application role whose sessions the server
    ends after ``IDLE_TIMEOUT`` seconds idle (the LISTEN session included)."""
    url = make_url(registry_database_url)
    assert url.database is not None
    role = f"registry_idle_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn(registry_database_url))
    try:
        if int(await admin.fetchval("SHOW server_version_num")) < 140000:
            pytest.skip("idle_session_timeout needs PostgreSQL 14 or later")
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'idle-password'")
        try:
            for statement in application_grants(role, url.database):
                await admin.execute(statement)
            await admin.execute(
                f"ALTER ROLE {role} SET idle_session_timeout = '{int(IDLE_TIMEOUT * 1000)}ms'"
            )
            yield url.set(username=role, password="idle-password").render_as_string(
                hide_password=False
            )
        finally:
            # the role's sessions must be gone before it can be dropped
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )
            await admin.execute(f"DROP OWNED BY {role}")
            await admin.execute(f"DROP ROLE {role}")
    finally:
        await admin.close()


async def test_listener_survives_idle_session_timeouts(
    registry_database_url: str, idling_role_url: str
) -> None:
    # the default health interval equals the idle timeout, so the probe keeps meeting the
    # server's goodbye: the race of the issue, on every timeout. A long safety interval: only
    # the listener (or its reconnect's re-read) can deliver the cancel in time.
    settings = RegistrySettings(safety_interval=60, health_interval=IDLE_TIMEOUT)
    holder = await RunRegistry.connect(idling_role_url, settings=settings)
    try:
        async with await RunRegistry.connect(registry_database_url, listen=False) as steerer:
            handle = await holder.register("run-1", "agent-a", "thread-1")
            token = handle.cancellation_token()
            listener = _listener(holder)
            first_pid = listener.backend_pid
            assert first_pid is not None
            # several timeouts: each one is a chance for the probe to meet the goodbye
            await _until(
                "the listener reconnected after six idle timeouts",
                lambda: listener.reconnects >= 6 and listener.connected,
                timeout=15 * IDLE_TIMEOUT,
            )
            assert listener.supervising
            assert listener.backend_pid not in (None, first_pid)
            assert not token.is_cancelled()
            assert await steerer.cancel_active_run_by_id("run-1")
            async with asyncio.timeout(1):
                await token.wait()
    finally:
        await holder.close()
    assert not listener.supervising


async def test_listener_survives_repeated_backend_terminations(
    registry_database_url: str,
) -> None:
    # probes back to back, so that most kills' FATAL lands between two probes and the next
    # probe meets the half-consumed goodbye; a long safety interval, as above
    settings = RegistrySettings(safety_interval=60, health_interval=0.001)
    admin = await asyncpg.connect(asyncpg_dsn(registry_database_url))
    try:
        holder = await RunRegistry.connect(registry_database_url, settings=settings)
        try:
            async with await RunRegistry.connect(registry_database_url, listen=False) as steerer:
                handle = await holder.register("run-1", "agent-a", "thread-1")
                token = handle.cancellation_token()
                listener = _listener(holder)
                for kill in range(10):
                    pid = listener.backend_pid
                    assert pid is not None
                    assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                    await _until(
                        f"a new LISTEN backend after kill {kill + 1}",
                        _replaced(listener, pid),
                        timeout=10,
                    )
                assert listener.reconnects >= 10
                assert listener.supervising
                assert not token.is_cancelled()
                assert await steerer.cancel_active_run_by_id("run-1")
                async with asyncio.timeout(1):
                    await token.wait()
        finally:
            await holder.close()
        assert not listener.supervising
    finally:
        await admin.close()


def _local_backend(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def _started_listener(url: str) -> Listener:
    # a long health interval: no probe runs during these tests
    listener = Listener(
        asyncpg_dsn(url),
        lambda _notification: None,
        lambda: None,
        key=NotificationKey(bytes(32)),
        probe=health_probe,
        health_interval=60,
    )
    await listener.start()
    return listener


async def test_stop_keeps_the_callers_cancellation(registry_database_url: str) -> None:
    listener = await _started_listener(registry_database_url)
    stopping = asyncio.create_task(listener.stop())
    await asyncio.sleep(0)  # one step: stop() has cancelled the supervisor and waits for it
    stopping.cancel()
    async with asyncio.timeout(1):
        with pytest.raises(asyncio.CancelledError):
            await stopping
    assert not listener.connected
    assert not listener.supervising


@pytest.mark.parametrize("cancel", [False, True], ids=["wait", "cancel-during-goodbye"])
async def test_stop_is_bounded_when_the_server_does_not_answer(
    registry_database_url: str, cancel: bool
) -> None:
    listener = await _started_listener(registry_database_url)
    pid = listener.backend_pid
    assert pid is not None
    if not _local_backend(pid):
        await listener.stop()
        pytest.skip("the server's processes are not on this machine; cannot freeze one")
    os.kill(pid, signal.SIGSTOP)  # the goodbye will never be answered
    try:
        stopping = asyncio.create_task(listener.stop())
        if cancel:
            # once the connection is let go, stop() waits for the frozen server's answer
            await _until("stop() is saying goodbye", lambda: not listener.connected, 1)
            stopping.cancel()
            async with asyncio.timeout(1):
                with pytest.raises(asyncio.CancelledError):
                    await stopping
        else:
            async with asyncio.timeout(4):
                await stopping
        assert not listener.connected
        assert not listener.supervising
    finally:
        os.kill(pid, signal.SIGCONT)
    # the connection was terminated: the backend, running again, sees its socket closed
    await _until(
        "the frozen backend exited",
        lambda: not _local_backend(pid),
        10,
    )
