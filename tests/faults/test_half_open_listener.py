"""A frozen listener backend (a half-open connection) is detected by the health probe."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from registry import RegistrySettings, RunRegistry, ToolCallDecision


def _local_backend(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def test_frozen_listener_is_replaced_and_nothing_is_lost(
    registry_database_url: str,
) -> None:
    # a long safety interval: only the reconnect's re-read can deliver what the frozen
    # connection would have received
    settings = RegistrySettings(safety_interval=60, health_interval=0.3)
    async with (
        await RunRegistry.connect(registry_database_url, settings=settings) as holder,
        await RunRegistry.connect(registry_database_url) as steerer,
    ):
        handle = await holder.register("run-1", "agent-a", "thread-1")
        token = handle.cancellation_token()
        assert await handle.bind_stream_fanout()
        subscription = await holder.subscribe_thread_run_stream("run-1")
        assert subscription is not None
        inbox = handle.decisions()
        # every kind of waiter parked before the freeze: a chunk, a decision, a cancel
        chunk = asyncio.ensure_future(anext(subscription))
        decision = asyncio.ensure_future(anext(inbox))
        # parked: each read the table once, found nothing, and now waits to be woken
        done, _ = await asyncio.wait({chunk, decision}, timeout=0.2)
        assert not done, "a waiter did not park"
        listener = holder.listener
        assert listener is not None
        pid = listener.backend_pid
        assert pid is not None
        if not _local_backend(pid):
            pytest.skip("the server's processes are not on this machine; cannot freeze one")
        os.kill(pid, signal.SIGSTOP)  # the socket stays open; the peer just stops answering
        try:
            sent = ToolCallDecision.resume("call-1", {"ok": True}, 1, decision_id="d1")
            assert await steerer.forward_decisions_by_run_id("run-1", [sent])
            assert await handle.publish(b"while frozen") == 1
            assert await steerer.cancel_active_run_by_id("run-1")
            # all three notifications went to the frozen connection, none to a new one
            assert listener.reconnects == 0
            async with asyncio.timeout(10):
                await token.wait()
                assert (await decision).decision == sent
                assert (await chunk).data == b"while frozen"
            assert listener.reconnects == 1
            assert listener.backend_pid not in (None, pid)
        finally:
            os.kill(pid, signal.SIGCONT)
            chunk.cancel()
            decision.cancel()
