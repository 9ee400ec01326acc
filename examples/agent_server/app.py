"""An example agent server on ``registry.contrib.asgi`` and FastAPI.

A toy agent streams a few words, suspends on a tool call that needs a human's approval
(waiting on its decision inbox), and finishes once a decision arrives. Run it with ``make
example`` (on the embedded PostgreSQL unless ``REGISTRY_DATABASE_URL`` names one), then open
http://127.0.0.1:8000/. Start two of them on one database (another port each) and a run
started on one can be watched, approved and cancelled through the other; stop the one that
holds a run and the other adopts it and goes on where the stream stopped.

``AGENT_CHUNK_DELAY`` (seconds between chunks, default 0.3) paces the toy agent;
``REGISTRY_WORKER_ID`` names the server as the owner of its runs (default: generated).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse

from registry import ResumeDecisionAction, RunHandle, RunRegistry, resolve_database_url
from registry.contrib.asgi import (
    RegistryLifespan,
    add_exception_handlers,
    get_run_registry,
    registry_routes,
)

AGENT_ID = "example-agent"
TOOL_CALL_ID = "call-1"
#: what the agent streams before the tool call, the tool call, and after each decision
BEFORE = ["Looking ", "at ", "/srv/scratch: ", "3 stale ", "build ", "folders, ", "1.2 GB. "]
TOOL_CALL = '[tool call delete_files(path="/srv/scratch/build-*") awaits approval] '
APPROVED = ["Approved: ", "deleting. ", "Done, ", "1.2 GB ", "freed."]
DECLINED = ["Declined: ", "nothing ", "deleted."]
#: seconds between chunks, so that a reader sees the stream grow
CHUNK_DELAY = float(os.environ.get("AGENT_CHUNK_DELAY", "0.3"))
#: how long the agent waits for a decision before the run fails
APPROVAL_TIMEOUT = 600.0
STATIC = Path(__file__).resolve().parent / "static"


async def publish_from(run: RunHandle, chunks: list[str], start: int, seq: int) -> int:
    """Publish ``chunks`` whose stream positions come after ``start``, from where the stream
    is (``seq``): a resumed or adopted run publishes only what is missing."""
    for position, text in enumerate(chunks, start=start + 1):
        if position <= seq:
            continue
        await asyncio.sleep(CHUNK_DELAY)
        seq = await run.publish(text.encode(), after_seq=seq)
    return seq


async def agent_turn(run: RunHandle) -> None:
    """The run body: stream, suspend on the tool call until a decision, finish."""
    await run.bind_stream_fanout()
    seq = run.record.stream_seq or 0
    seq = await publish_from(run, [*BEFORE, TOOL_CALL], 0, seq)
    async with run.decisions(until_cancelled=True) as inbox:
        delivery = await inbox.get(timeout=APPROVAL_TIMEOUT)
        approved = delivery.decision.action is ResumeDecisionAction.RESUME
        await publish_from(run, APPROVED if approved else DECLINED, len(BEFORE) + 1, seq)
        await delivery.ack()


async def carry_on(runs: RunRegistry, handle: RunHandle) -> None:
    """A run this server resumed or adopted: go on from where its stream stopped."""
    async with runs.continue_run(handle) as run:
        await agent_turn(run)


async def database_url() -> str:
    return await resolve_database_url()  # REGISTRY_DATABASE_URL, else the embedded server


#: the app's registry, for a route (FastAPI's dependency injection)
Registry = Annotated[RunRegistry, Depends(get_run_registry)]

lifespan = RegistryLifespan(
    database_url,
    carry_on=carry_on,
    adopt_interval=1.0,
    worker_id=os.environ.get("REGISTRY_WORKER_ID") or None,  # None: one is generated
)
app = FastAPI(title="registry example agent server", lifespan=lifespan)
app.mount("/registry", registry_routes())
add_exception_handlers(app)


@app.post("/threads/{thread_id}/runs", status_code=201)
async def start_run(thread_id: str, runs: Registry) -> dict[str, str]:
    """Start the toy agent on the thread; 409 while the thread has an active run."""
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    handle = await runs.register(run_id, AGENT_ID, thread_id, on_conflict="reject")
    await handle.bind_stream_fanout()  # a client may follow the stream as soon as it has the id
    lifespan.spawn(carry_on(runs, handle))
    return {"run_id": run_id, "thread_id": thread_id, "agent_id": AGENT_ID}


@app.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")
