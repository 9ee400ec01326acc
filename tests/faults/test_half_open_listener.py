"""A frozen listener backend (a half-open connection) is detected by the health probe."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from registry import RegistrySettings, RunRegistry


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
        listener = holder.listener
        assert listener is not None
        pid = listener.backend_pid
        assert pid is not None
        if not _local_backend(pid):
            pytest.skip("the server's processes are not on this machine; cannot freeze one")
        os.kill(pid, signal.SIGSTOP)  # the socket stays open; the peer just stops answering
        try:
            assert await steerer.cancel_active_run_by_id("run-1")
            async with asyncio.timeout(10):
                await token.wait()
            assert listener.reconnects == 1
            assert listener.backend_pid not in (None, pid)
        finally:
            os.kill(pid, signal.SIGCONT)
