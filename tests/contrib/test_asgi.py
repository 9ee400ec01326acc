"""registry.contrib.asgi against a real registry: each route, each error mapping, the three
stream framings, resume with no gap and no duplicate, the lifespan, and what a disconnect and
a shutdown do to a stream (under a real uvicorn server in this process).

httpx's ASGITransport collects a whole response before returning it, so its stream tests use
runs that end; the disconnect and shutdown tests stream through a socket.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse
from sse_starlette.sse import AppStatus
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount, Route

from registry import (
    DatabaseUnavailableError,
    RunHandle,
    RunRegistry,
    RunStatus,
)
from registry.contrib.asgi import (
    EXCEPTION_HANDLERS,
    SHUTDOWN_GRACE,
    RegistryLifespan,
    get_run_registry,
    named_agent,
    open_streams,
    registry_routes,
)
from tests.helpers.network import free_port

#: a wake-up within one process takes milliseconds
DEADLINE = 5.0
AGENT = "agent-a"


async def refuse_agent_b(request: Request, agent_id: str | None) -> str | None:
    """An authorize hook: the ``x-agent`` header names the caller; agent-b is refused."""
    caller = request.headers.get("x-agent", agent_id)
    return None if caller == "agent-b" else await named_agent(request, caller)


async def register_reject(request: Request) -> None:
    runs = get_run_registry(request)
    thread_id = request.path_params["thread_id"]
    await runs.register(request.query_params["run_id"], AGENT, thread_id, on_conflict="reject")


async def unavailable(request: Request) -> None:
    raise DatabaseUnavailableError()


def make_app(runs: RunRegistry | None, **options: Any) -> Starlette:
    app = Starlette(
        routes=[
            Mount("/registry", registry_routes(ping=0.2, **options)),
            Route("/test/threads/{thread_id}/register", register_reject, methods=["POST"]),
            Route("/test/unavailable", unavailable),
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),
    )
    if runs is not None:
        app.state.run_registry = runs
    return app


@pytest.fixture
async def client(run_registry: RunRegistry) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(run_registry, authorize=refuse_agent_b))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def streaming_run(runs: RunRegistry, run_id: str, chunks: list[str]) -> RunHandle:
    handle = await runs.register(run_id, AGENT, f"thread-{run_id}")
    await handle.bind_stream_fanout()
    for chunk in chunks:
        await handle.publish(chunk.encode())
    return handle


def decision(decision_id: str) -> dict[str, object]:
    return {
        "target_id": "call-1",
        "decision_id": decision_id,
        "action": "resume",
        "result": {"ok": True},
        "updated_at": 1,
    }


async def chunk_events(source: EventSource) -> AsyncIterator[ServerSentEvent]:
    """The events of ``source`` less pings: httpx_sse gives a ping (a comment) as an event
    without data, where a browser dispatches nothing."""
    async for event in source.aiter_sse():
        if event.data:
            yield event


async def events(client: httpx.AsyncClient, url: str, **headers: str) -> list[ServerSentEvent]:
    async with aconnect_sse(client, "GET", url, headers=headers) as source:
        source.response.raise_for_status()
        return [event async for event in chunk_events(source)]


# --- decisions, cancels, state -----------------------------------------------------------------


async def test_forward_by_thread_reaches_the_run(
    client: httpx.AsyncClient, run_registry: RunRegistry
) -> None:
    handle = await run_registry.register("run-1", AGENT, "thread-1")
    response = await client.post(
        "/registry/threads/thread-1/decisions",
        params={"agent_id": AGENT},
        json={"decisions": [decision("d-1")]},
    )
    assert response.status_code == 200
    assert response.json() == {"thread_id": "thread-1", "run_id": "run-1"}
    async with handle.decisions() as inbox:
        delivery = await inbox.get(timeout=DEADLINE)
    assert delivery.decision.decision_id == "d-1"


async def test_forward_by_thread_checks_the_agent(
    client: httpx.AsyncClient, run_registry: RunRegistry
) -> None:
    await run_registry.register("run-1", AGENT, "thread-1")
    url = "/registry/threads/thread-1/decisions"
    body = {"decisions": [decision("d-1")]}
    other = await client.post(url, params={"agent_id": "agent-c"}, json=body)
    assert other.status_code == 404
    refused = await client.post(url, params={"agent_id": "agent-b"}, json=body)
    assert refused.status_code == 403
    assert refused.json()["error"] == "forbidden"


async def test_forward_by_run_id(client: httpx.AsyncClient, run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", AGENT, "thread-1")
    response = await client.post("/registry/runs/run-1/decisions", json=[decision("d-1")])
    assert response.json() == {"thread_id": "thread-1", "run_id": "run-1"}
    refused = await client.post(
        "/registry/runs/run-1/decisions", json=[decision("d-2")], headers={"x-agent": "agent-b"}
    )
    assert refused.status_code == 403
    missing = await client.post("/registry/runs/nope/decisions", json=[decision("d-3")])
    assert missing.status_code == 404


async def test_bad_decisions_are_422_with_the_field(
    client: httpx.AsyncClient, run_registry: RunRegistry
) -> None:
    await run_registry.register("run-1", AGENT, "thread-1")
    bad = await client.post("/registry/runs/run-1/decisions", json=[{"action": "resume"}])
    assert bad.status_code == 422
    assert bad.json()["field"].startswith("decisions[0]")
    not_json = await client.post("/registry/runs/run-1/decisions", content=b"{")
    assert (not_json.status_code, not_json.json()["field"]) == (422, "body")
    no_agent = await client.post("/registry/threads/thread-1/decisions", json=[])
    assert (no_agent.status_code, no_agent.json()["field"]) == (422, "agent_id")


async def test_cancel_by_run_and_by_thread(
    client: httpx.AsyncClient, run_registry: RunRegistry
) -> None:
    first = await run_registry.register("run-1", AGENT, "thread-1")
    second = await run_registry.register("run-2", AGENT, "thread-2")
    by_run = await client.post("/registry/runs/run-1/cancel")
    assert (by_run.status_code, by_run.json()) == (202, {"run_id": "run-1"})
    other_agent = await client.post("/registry/threads/thread-2/cancel?agent_id=agent-c")
    assert other_agent.status_code == 404
    by_thread = await client.post("/registry/threads/thread-2/cancel?agent_id=agent-a")
    assert (by_thread.status_code, by_thread.json()) == (202, {"run_id": "run-2"})
    for handle in (first, second):
        await asyncio.wait_for(handle.cancellation_token().wait(), DEADLINE)
    ended = await client.post("/registry/runs/nope/cancel")
    assert ended.status_code == 404


async def test_run_state_is_the_record(
    client: httpx.AsyncClient, run_registry: RunRegistry
) -> None:
    await streaming_run(run_registry, "run-1", ["a", "b"])
    state = (await client.get("/registry/runs/run-1")).json()
    assert state["run_id"] == "run-1"
    assert state["status"] == "active"
    assert state["stream_seq"] == 2
    assert state["agent_id"] == AGENT
    assert (await client.get("/registry/runs/nope")).status_code == 404


async def test_error_mappings(client: httpx.AsyncClient, run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", AGENT, "thread-1")
    busy = await client.post("/test/threads/thread-1/register?run_id=run-2")
    assert busy.status_code == 409
    assert busy.json()["active_run_id"] == "run-1"
    unavailable = await client.get("/test/unavailable")
    assert unavailable.status_code == 503
    assert unavailable.headers["retry-after"] == "1"
    await run_registry.close()
    closed = await client.get("/registry/runs/run-1")
    assert (closed.status_code, closed.headers["retry-after"]) == (503, "1")


# --- streams -----------------------------------------------------------------------------------


async def test_plain_sse_ids_are_seqs_and_end_comes_last(
    client: httpx.AsyncClient, run_registry: RunRegistry
) -> None:
    handle = await streaming_run(run_registry, "run-1", ["one", "two\nlines", "three"])
    await handle.remove()
    received = await events(client, "/registry/runs/run-1/events")
    assert [(event.id, event.data) for event in received[:3]] == [
        ("1", "one"),
        ("2", "two\nlines"),
        ("3", "three"),
    ]
    assert received[3].event == "end"
    assert json.loads(received[3].data)["status"] == "completed"
    assert len(received) == 4


async def test_resume_with_last_event_id_has_no_gap_and_no_duplicate(
    client: httpx.AsyncClient, run_registry: RunRegistry
) -> None:
    handle = await streaming_run(run_registry, "run-1", [f"c{n}" for n in range(1, 6)])

    async def publish_on_and_end() -> None:
        for n in range(6, 41):
            await handle.publish(f"c{n}".encode())
        await handle.remove()

    publisher = asyncio.create_task(publish_on_and_end())
    resumed = await events(client, "/registry/runs/run-1/events", **{"Last-Event-ID": "3"})
    await publisher
    chunks = [event for event in resumed if event.event == "message"]
    assert [event.id for event in chunks] == [str(n) for n in range(4, 41)]
    assert [event.data for event in chunks] == [f"c{n}" for n in range(4, 41)]
    after = await events(client, "/registry/runs/run-1/events?after=38")
    assert [(event.event, event.data) for event in after[:2]] == [
        ("message", "c39"),
        ("message", "c40"),
    ]
    assert [event.event for event in after[2:]] == ["end"]


async def test_stream_errors(client: httpx.AsyncClient, run_registry: RunRegistry) -> None:
    await run_registry.register("run-1", AGENT, "thread-1")
    no_stream = await client.get("/registry/runs/run-1/events")
    assert no_stream.status_code == 404
    await streaming_run(run_registry, "run-2", ["x"])
    bad = await client.get("/registry/runs/run-2/events", headers={"Last-Event-ID": "x1"})
    assert (bad.status_code, bad.json()["field"]) == (422, "Last-Event-ID")
    assert (await client.get("/registry/runs/nope/events")).status_code == 404


async def test_ui_message_resume_is_204_without_an_active_run(
    client: httpx.AsyncClient, run_registry: RunRegistry
) -> None:
    response = await client.get("/registry/threads/thread-1/stream?agent_id=agent-a")
    assert response.status_code == 204
    handle = await streaming_run(run_registry, "run-1", ["x"])
    await handle.remove()
    ended = await client.get(f"/registry/threads/{handle.thread_id}/stream?agent_id=agent-a")
    assert ended.status_code == 204


async def test_ui_message_resume_replays_from_the_start_and_goes_on(
    client: httpx.AsyncClient, run_registry: RunRegistry
) -> None:
    start = [{"type": "start", "messageId": "m-1"}, {"type": "text-start", "id": "t-1"}]
    handle = await streaming_run(run_registry, "run-1", [json.dumps(part) for part in start])
    request = asyncio.create_task(
        client.get(f"/registry/threads/{handle.thread_id}/stream?agent_id=agent-a")
    )
    await asyncio.sleep(0)  # the request is under way while the run goes on
    await handle.publish(b"plain text")
    await handle.publish(json.dumps({"type": "finish"}).encode())
    await handle.remove()
    response = await request
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [
        line.removeprefix("data: ")
        for line in response.text.splitlines()
        if line.startswith("data: ")
    ]
    assert frames[-1] == "[DONE]"
    assert [json.loads(frame) for frame in frames[:-1]] == [
        *start,
        {"type": "text-delta", "id": "run-1", "delta": "plain text"},
        {"type": "finish"},
    ]


async def test_agui_frames_events_as_they_are(
    client: httpx.AsyncClient, run_registry: RunRegistry
) -> None:
    started = {"type": "RUN_STARTED", "threadId": "thread-run-1", "runId": "run-1"}
    handle = await streaming_run(run_registry, "run-1", [json.dumps(started), "hello"])
    await handle.remove()
    received = await events(client, "/registry/runs/run-1/agui")
    assert [json.loads(event.data) for event in received] == [
        started,
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "run-1", "delta": "hello"},
    ]


# --- the lifespan ------------------------------------------------------------------------------


async def test_the_lifespan_resumes_and_adopts(registry_database_url: str) -> None:
    async with RunRegistry.connect(registry_database_url, worker_id="server-1") as earlier:
        await earlier.register("run-own", AGENT, "thread-1")
    async with RunRegistry.connect(registry_database_url, worker_id="server-2") as other:
        await other.register("run-orphan", AGENT, "thread-2")
    carried: asyncio.Queue[str] = asyncio.Queue()

    async def carry_on(runs: RunRegistry, handle: RunHandle) -> None:
        await carried.put(handle.run_id)
        await asyncio.Event().wait()  # a body that runs until shutdown

    lifespan = RegistryLifespan(
        registry_database_url, carry_on=carry_on, adopt_interval=0.05, worker_id="server-1"
    )
    app = make_app(None)
    async with lifespan(app):
        first = await asyncio.wait_for(carried.get(), DEADLINE)
        second = await asyncio.wait_for(carried.get(), DEADLINE)
        runs = app.state.run_registry
    assert (first, second) == ("run-own", "run-orphan")
    assert runs.closed
    async with RunRegistry.connect(registry_database_url, listen=False) as check:
        for run_id in ("run-own", "run-orphan"):
            record = await check.run(run_id)
            assert record is not None
            assert record.status is RunStatus.ACTIVE  # left for the next server to adopt


# --- through a socket: disconnect and shutdown -------------------------------------------------


@pytest.fixture
async def served(registry_database_url: str) -> AsyncIterator[tuple[Starlette, uvicorn.Server]]:
    lifespan = RegistryLifespan(registry_database_url, worker_id="server-1")
    app = Starlette(
        routes=[Mount("/registry", registry_routes(ping=0.2))],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(DEADLINE):
            while not server.started:
                await asyncio.sleep(0.01)
        yield app, server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, DEADLINE)
        AppStatus.should_exit = False  # sse-starlette's process-wide flag


async def test_a_client_disconnect_never_cancels_the_run(
    served: tuple[Starlette, uvicorn.Server],
) -> None:
    app, server = served
    runs: RunRegistry = app.state.run_registry
    handle = await streaming_run(runs, "run-1", ["first"])
    base = f"http://127.0.0.1:{server.config.port}/registry"
    async with (
        httpx.AsyncClient(base_url=base, timeout=DEADLINE) as client,
        aconnect_sse(client, "GET", "/runs/run-1/events") as source,
    ):
        raw = source.aiter_sse()
        event = await anext(raw)
        assert (event.id, event.data) == ("1", "first")
        assert len(open_streams(app)) == 1
        ping = await asyncio.wait_for(anext(raw), DEADLINE)  # a quiet stream is kept alive
        assert ping.data == ""
    # the client went away: its subscription ends, the run goes on
    async with asyncio.timeout(DEADLINE):
        while len(open_streams(app)):
            await asyncio.sleep(0.01)
    assert not handle.cancellation_token().is_cancelled()
    assert await handle.publish(b"second") == 2
    record = await runs.run("run-1")
    assert record is not None
    assert record.status is RunStatus.ACTIVE
    assert record.cancel_requested_at is None


async def test_shutdown_ends_the_streams_promptly(
    served: tuple[Starlette, uvicorn.Server],
) -> None:
    app, server = served
    runs: RunRegistry = app.state.run_registry
    await streaming_run(runs, "run-1", ["first"])
    base = f"http://127.0.0.1:{server.config.port}/registry"
    async with (
        httpx.AsyncClient(base_url=base, timeout=DEADLINE) as client,
        aconnect_sse(client, "GET", "/runs/run-1/events") as source,
    ):
        received = chunk_events(source)
        assert (await anext(received)).data == "first"
        stopping = time.monotonic()
        server.should_exit = True  # what uvicorn's SIGTERM handler sets
        rest = [event async for event in received]  # it ends: no timeout, a complete response
    assert rest == []  # no end event: the run goes on, on another server
    # ended by the subscription's close, not by sse-starlette's cancel after the grace
    assert time.monotonic() - stopping < SHUTDOWN_GRACE
    assert len(open_streams(app)) == 0
    async with asyncio.timeout(DEADLINE):  # then the lifespan closes the registry
        while not runs.closed:
            await asyncio.sleep(0.01)
