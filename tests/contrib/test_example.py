"""The example agent server (examples/agent_server/app.py), in this process: a run streams,
suspends on its tool call, goes on after the approval and completes; a busy thread is 409.

(httpx's ASGITransport returns a response once complete: the stream is read once the run ends.)
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from httpx_sse import aconnect_sse

APP = Path(__file__).resolve().parents[2] / "examples" / "agent_server" / "app.py"
DEADLINE = 10.0


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_agent_server", APP)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def example(
    registry_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[ModuleType, httpx.AsyncClient]]:
    monkeypatch.setenv("REGISTRY_DATABASE_URL", registry_database_url)
    monkeypatch.setenv("AGENT_CHUNK_DELAY", "0")
    module = load_example()
    async with module.app.router.lifespan_context(module.app):
        transport = httpx.ASGITransport(app=module.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            yield module, client


async def test_a_run_waits_for_its_approval_then_completes(
    example: tuple[ModuleType, httpx.AsyncClient],
) -> None:
    module, client = example
    started = await client.post("/threads/t-1/runs")
    assert started.status_code == 201
    run_id = started.json()["run_id"]
    busy = await client.post("/threads/t-1/runs")
    assert busy.status_code == 409
    page = await client.get("/")
    assert "EventSource" in page.text
    # the run suspends on its tool call: its stream stops there until a decision
    before = [*module.BEFORE, module.TOOL_CALL]
    async with asyncio.timeout(DEADLINE):
        while (await client.get(f"/registry/runs/{run_id}")).json()["stream_seq"] != len(before):
            await asyncio.sleep(0.01)
    decision = {"target_id": "call-1", "action": "resume", "updated_at": 1}
    forwarded = await client.post(
        "/registry/threads/t-1/decisions",
        params={"agent_id": module.AGENT_ID},
        json={"decisions": [decision]},
    )
    assert forwarded.json()["run_id"] == run_id
    async with aconnect_sse(client, "GET", f"/registry/runs/{run_id}/events") as source:
        events = [event async for event in source.aiter_sse() if event.data]
    assert [event.data for event in events[:-1]] == [*before, *module.APPROVED]
    assert json.loads(events[-1].data)["status"] == "completed"
