"""``registry demo``: a run outlives the process that runs it, told and checked in seconds.

The story, with real processes and a real signal:

1. worker 1 (a process) registers a run, streams the start of its answer, and suspends on a
   tool call that needs a human's approval;
2. the demo SIGKILLs worker 1;
3. while no worker runs, the demo forwards the approval (twice, as a client that retries), and
   a subscriber in another process replays the stream from the start;
4. worker 2, started with the same ``worker_id``, calls ``resume_owned_runs()``, receives the
   approval from the run's inbox, acknowledges it, finishes the stream and removes the run;
5. the demo prints the run's rows of the ``decision_audit`` view.

Every claim printed is checked first; the demo exits 1 if one fails (the decision lost,
delivered again after its ack, a gap or a duplicate in the stream). The helper processes are
``python -m registry.demo ROLE ...``: each prints ``{"event": "ready"}`` once imported, waits
for a ``go URL`` line on stdin, then reports what happens as one JSON object per line. They are
started at once, so that their start-up overlaps the database's; the demo reads their lines
with deadlines and never sleeps to synchronise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape

from registry.console import audit_table, output_console
from registry.errors import DatabaseUnavailableError
from registry.inbox import DecisionInbox
from registry.locate import DatabaseLocation, DatabaseSource, locate_database
from registry.models import RunStatus, ToolCallDecision
from registry.registry import RunRegistry

AGENT_ID = "demo-agent"
TOOL_CALL_ID = "call-1"
TOOL_CALL = 'delete_files(path="/srv/scratch/build-*")'
#: what worker 1 streams before it suspends on the tool call
FIRST_CHUNKS = (
    "Looking at /srv/scratch...",
    " 3 stale build folders, 1.2 GB.",
    " Deleting them needs your approval.",
)
#: what worker 2 streams once the approval arrived
SECOND_CHUNKS = (" Approved: deleting.", " Done, 1.2 GB freed.")

#: deadline for one line from a helper process (it may be importing on a busy machine)
LINE_TIMEOUT = 30.0
#: deadline for one decision or chunk inside a helper process
STEP_TIMEOUT = 20.0
#: deadline for the demo's own connection
CONNECT_TIMEOUT = 10.0


class DemoFailed(Exception):
    """A claim the demo was about to make did not hold."""


# --- the helper processes -------------------------------------------------------------------------


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def _first_worker(url: str, run_id: str, thread_id: str, worker_id: str) -> int:
    """Register, stream, suspend on a tool call; wait for a decision until killed."""
    async with await RunRegistry.connect(url, worker_id=worker_id) as registry:
        handle = await registry.register(run_id, AGENT_ID, thread_id)
        _emit("registered", run_id=handle.run_id, owner_id=registry.worker_id)
        await handle.bind_stream_fanout()
        for text in FIRST_CHUNKS:
            seq = await handle.publish(text.encode())
            _emit("chunk", seq=seq, text=text)
        async with handle.decisions() as inbox:
            waiting = asyncio.ensure_future(anext(inbox))
            _emit("suspended", target_id=TOOL_CALL_ID, tool=TOOL_CALL)
            delivery = await waiting  # the demo kills this process before any decision exists
            _emit("delivered", decision_id=delivery.decision.decision_id)
    return 0


async def _second_worker(url: str, run_id: str, worker_id: str) -> int:
    """Resume the run, take the decision, ack it, finish the stream, remove the run."""
    async with await RunRegistry.connect(url, worker_id=worker_id) as registry:
        handles = {handle.run_id: handle for handle in await registry.resume_owned_runs()}
        handle = handles.get(run_id)
        _emit(
            "resumed",
            run_ids=sorted(handles),
            cancelled=handle is not None and handle.cancellation_token().is_cancelled(),
        )
        if handle is None:
            return 1
        async with handle.decisions() as inbox:
            delivery = await asyncio.wait_for(anext(inbox), STEP_TIMEOUT)
            _emit(
                "delivered",
                delivery_id=delivery.delivery_id,
                decision_id=delivery.decision.decision_id,
                target_id=delivery.decision.target_id,
                action=delivery.decision.action.value,
                result=delivery.decision.result,
                attempts=delivery.attempts,
            )
            acked = await inbox.ack(delivery)
            _emit("acked", delivery_id=delivery.delivery_id, acked=acked)
        # a fresh inbox, as a restarted worker would open: it must not see the acked decision
        fresh = handle.decisions()
        redelivered = asyncio.ensure_future(_drain(fresh))
        for text in SECOND_CHUNKS:
            seq = await handle.publish(text.encode())
            _emit("chunk", seq=seq, text=text)
        removed = await handle.remove()
        record = await registry.run(run_id)
        _emit("removed", removed=removed, status=None if record is None else record.status.value)
        again = await asyncio.wait_for(redelivered, STEP_TIMEOUT)
        _emit("redelivered", decision_ids=again)
    return 0


async def _drain(inbox: DecisionInbox) -> list[str]:
    seen = []
    async with inbox:
        async for delivery in inbox:
            seen.append(delivery.decision.decision_id)
    return seen


async def _subscriber(url: str, run_id: str) -> int:
    """Replay the run's stream from the start and follow it live until the run ends."""
    async with await RunRegistry.connect(url) as registry:
        subscription = await registry.subscribe_thread_run_stream(run_id, after_seq=0)
        if subscription is None:
            _emit("error", message=f"run {run_id} has no stream")
            return 1
        _emit("subscribed")
        async with subscription:
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(subscription), STEP_TIMEOUT)
                except StopAsyncIteration:
                    break
                _emit("chunk", seq=chunk.seq, text=chunk.data.decode("utf-8", "replace"))
        _emit("end")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m registry.demo ROLE ...``: one helper process of the demo."""
    parser = argparse.ArgumentParser(prog="python -m registry.demo")
    roles = parser.add_subparsers(dest="role", required=True)
    first = roles.add_parser("first-worker")
    first.add_argument("run_id")
    first.add_argument("thread_id")
    first.add_argument("worker_id")
    second = roles.add_parser("second-worker")
    second.add_argument("run_id")
    second.add_argument("worker_id")
    subscriber = roles.add_parser("subscriber")
    subscriber.add_argument("run_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _emit("ready")
    command, _, url = sys.stdin.readline().rstrip("\n").partition(" ")
    if command != "go" or not url:
        return 0  # the demo ended before it needed this helper
    if args.role == "first-worker":
        return asyncio.run(_first_worker(url, args.run_id, args.thread_id, args.worker_id))
    if args.role == "second-worker":
        return asyncio.run(_second_worker(url, args.run_id, args.worker_id))
    return asyncio.run(_subscriber(url, args.run_id))


# --- the story ------------------------------------------------------------------------------------


class Helper:
    """A helper process: its JSON lines, read with deadlines."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.events: list[dict[str, Any]] = []
        self._stderr: list[bytes] = []
        self._stderr_reader = asyncio.ensure_future(self._collect_stderr())

    @classmethod
    async def start(cls, name: str, *args: str) -> Helper:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "registry.demo",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(name, process)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _collect_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(4096):
            self._stderr.append(chunk)

    def stderr_tail(self) -> str:
        text = b"".join(self._stderr).decode(errors="replace").strip()
        return text.splitlines()[-1] if text else "(nothing on stderr)"

    async def expect(self, event: str, deadline: float = LINE_TIMEOUT) -> dict[str, Any]:
        """The next line, which must be ``event``, within ``deadline`` seconds."""
        message = await self.next(deadline, expected=event)
        if message.get("event") != event:
            raise DemoFailed(f"{self.name} said {message}, the demo expected {event!r}")
        return message

    async def next(
        self, deadline: float = LINE_TIMEOUT, expected: str = "a line"
    ) -> dict[str, Any]:
        """The next line, whatever it says, within ``deadline`` seconds."""
        assert self.process.stdout is not None
        try:
            raw = await asyncio.wait_for(self.process.stdout.readline(), deadline)
        except TimeoutError:
            raise DemoFailed(f"{self.name} said nothing within {deadline:g} s") from None
        if not raw:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 5)
            await asyncio.wait_for(self._stderr_reader, 5)
            raise DemoFailed(
                f"{self.name} exited ({self.process.returncode}) while the demo expected "
                f"{expected!r}: {self.stderr_tail()}"
            )
        message: dict[str, Any] = json.loads(raw)
        self.events.append(message)
        return message

    async def go(self, url: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"go {url}\n".encode())
        await self.process.stdin.drain()

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    async def exit_code(self, deadline: float = LINE_TIMEOUT) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), deadline)
        except TimeoutError:
            raise DemoFailed(f"{self.name} did not exit within {deadline:g} s") from None

    async def reap(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()  # a helper still waiting for "go" exits at EOF
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 5)
        self.kill()
        await self.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stderr_reader, 5)


@dataclass
class Story:
    """Prints the narration and counts the checks."""

    console: Console
    started: float = field(default_factory=time.monotonic)
    checks: int = 0

    def stamp(self) -> str:
        """Seconds since the demo started, dimmed."""
        return f"[dim]{time.monotonic() - self.started:5.1f}s[/]"

    def say(self, text: str) -> None:
        """Narrate an event (what a helper reported, not a claim of ours)."""
        self.console.print(f"{self.stamp()}    {text}")

    def chunk(self, seq: int, text: str) -> None:
        self.console.print(f"            [cyan]{seq:>2}[/]  {escape(json.dumps(text))}")

    def check(self, holds: bool, claim: str, failure: str = "") -> None:
        """Print ``claim`` as verified, or stop the demo if it does not hold."""
        if not holds:
            raise DemoFailed(f"{claim}: {failure}" if failure else claim)
        self.checks += 1
        self.console.print(f"{self.stamp()}  [green]✔[/] {claim}")


@contextlib.asynccontextmanager
async def _helpers(*specs: tuple[str, tuple[str, ...]]) -> AsyncIterator[list[Helper]]:
    helpers: list[Helper] = []
    try:
        for name, args in specs:
            helpers.append(await Helper.start(name, *args))
        yield helpers
    finally:
        await asyncio.gather(*(helper.reap() for helper in helpers))


async def run_demo(
    locate: Callable[[], Awaitable[DatabaseLocation]] | None = None,
    console: Console | None = None,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> int:
    """Tell the story and return 0 if every check held, 1 if one did not.

    ``locate`` chooses the database (default: :func:`registry.locate.locate_database`, so the
    embedded server unless ``REGISTRY_DATABASE_URL`` is set). The helper processes start
    before it is called, so that their start-up overlaps the database's.
    """
    console = console or output_console()
    story = Story(console)
    suffix = uuid.uuid4().hex[:8]
    run_id, thread_id, worker_id = f"demo-run-{suffix}", f"demo-thread-{suffix}", f"demo-{suffix}"
    console.print("[bold]registry demo[/]: a run outlives the process that runs it\n")
    try:
        async with _helpers(
            ("worker 1", ("first-worker", run_id, thread_id, worker_id)),
            ("worker 2", ("second-worker", run_id, worker_id)),
            ("the subscriber", ("subscriber", run_id)),
        ) as (first, second, subscriber):
            location = await (locate or locate_database)()
            _describe(console, location, run_id, thread_id, worker_id)
            try:
                async with asyncio.timeout(connect_timeout):
                    registry = await RunRegistry.connect(
                        location.url, worker_id=f"{worker_id}-demo", listen=False
                    )
            except TimeoutError:
                raise DatabaseUnavailableError(
                    f"the database at {location.display_url} did not answer within "
                    f"{connect_timeout:g} s"
                ) from None
            async with registry:
                ids = _Ids(location.url, run_id, thread_id, worker_id)
                await _story(story, registry, ids, first, second, subscriber)
    except DemoFailed as exc:
        console.print(f"{story.stamp()}  [bold red]✘ {escape(str(exc))}[/]")
        console.print(f"\n[bold red]demo failed[/] after {story.checks} checks held")
        return 1
    elapsed = time.monotonic() - story.started
    console.print(f"\n[bold green]✔ all {story.checks} checks held[/] in {elapsed:.1f} s")
    return 0


@dataclass(frozen=True, slots=True)
class _Ids:
    url: str
    run_id: str
    thread_id: str
    worker_id: str


def _describe(
    console: Console, location: DatabaseLocation, run_id: str, thread_id: str, worker_id: str
) -> None:
    if location.source is DatabaseSource.EMBEDDED:
        state = "started now" if location.started else "already running"
        where = f"embedded PostgreSQL ({state}), data in {location.data_dir}"
    else:
        where = location.display_url
    console.print(f"database  {escape(where)}")
    console.print(f"run       {run_id} on thread {thread_id}, agent {AGENT_ID}")
    console.print(f"workers   both run as worker_id {worker_id}\n")


async def _story(
    story: Story,
    registry: RunRegistry,
    ids: _Ids,
    first: Helper,
    second: Helper,
    subscriber: Helper,
) -> None:
    url, run_id, thread_id, worker_id = ids.url, ids.run_id, ids.thread_id, ids.worker_id
    # 1. worker 1 streams, then suspends on a tool call
    await first.expect("ready")
    await first.go(url)
    registered = await first.expect("registered")
    story.say(f"worker 1 (pid {first.pid}) registered the run and streams its answer:")
    streamed: list[tuple[int, str]] = []
    for _ in FIRST_CHUNKS:
        chunk = await first.expect("chunk")
        streamed.append((chunk["seq"], chunk["text"]))
        story.chunk(chunk["seq"], chunk["text"])
    await first.expect("suspended")
    story.say("worker 1 calls a tool that needs a human's approval, and suspends:")
    story.say(f"  {TOOL_CALL_ID}  {escape(TOOL_CALL)}")

    # 2. kill it
    first.kill()
    code = await first.exit_code()
    story.check(
        code == -signal.SIGKILL,
        f"worker 1 killed with SIGKILL (exit {code})",
        "it was not killed by the signal",
    )
    row = await registry.run_details(run_id)
    story.check(
        row is not None
        and row["status"] == RunStatus.ACTIVE.value
        and row["owner_id"] == registered["owner_id"] == worker_id
        and row["lease_held"],
        f"the run outlived its worker: active, lease still held by {worker_id}",
        f"the row says {row}",
    )

    # 3. the approval arrives while no worker runs; a subscriber replays the stream
    approval = ToolCallDecision.resume(
        TOOL_CALL_ID,
        {"approved": True},
        updated_at=int(time.time() * 1000),
        decision_id=f"approval-{run_id}",
    )
    forwarded = await registry.forward_decisions_by_thread(AGENT_ID, thread_id, [approval])
    story.check(
        forwarded is not None and forwarded.run_id == run_id,
        f"approval of {TOOL_CALL_ID} forwarded by thread while no worker runs",
        f"the forward went to {forwarded}",
    )
    retried = await registry.forward_decisions_by_thread(AGENT_ID, thread_id, [approval])
    stored = await registry.decisions_of_run(run_id)
    story.check(
        retried is not None and len(stored) == 1 and stored[0]["status"] == "pending",
        "forwarded again, as a retrying client would: still one decision",
        f"the run holds {[(row['decision_id'], row['status']) for row in stored]}",
    )
    await subscriber.expect("ready")
    await subscriber.go(url)
    await subscriber.expect("subscribed")
    seen: list[tuple[int, str]] = []
    for _ in FIRST_CHUNKS:
        chunk = await subscriber.expect("chunk")
        seen.append((chunk["seq"], chunk["text"]))
    story.check(
        seen == streamed,
        f"a subscriber process (pid {subscriber.pid}) replayed chunks 1-{len(seen)} from the start",
        f"it got {seen}",
    )

    # 4. worker 2 resumes the run and gets the decision exactly once
    await second.expect("ready")
    await second.go(url)
    resumed = await second.expect("resumed")
    story.check(
        resumed["run_ids"] == [run_id] and not resumed["cancelled"],
        f"worker 2 (pid {second.pid}, same worker_id) resumed it: resume_owned_runs()",
        f"it resumed {resumed['run_ids']}",
    )
    delivered = await second.expect("delivered", deadline=STEP_TIMEOUT)
    story.check(
        delivered["decision_id"] == approval.decision_id
        and delivered["target_id"] == TOOL_CALL_ID
        and delivered["attempts"] == 1,
        f"worker 2's inbox delivered the approval ({delivered['action']} "
        f"{TOOL_CALL_ID}), attempt {delivered['attempts']}",
        f"it received {delivered}",
    )
    acked = await second.expect("acked")
    story.check(acked["acked"] is True, "worker 2 acknowledged the decision")
    story.say("worker 2 finished the answer:")
    for _ in SECOND_CHUNKS:
        chunk = await second.expect("chunk")
        streamed.append((chunk["seq"], chunk["text"]))
        story.chunk(chunk["seq"], chunk["text"])
    removed = await second.expect("removed")
    story.check(
        removed["removed"] is True and removed["status"] == RunStatus.COMPLETED.value,
        "worker 2 finished and removed the run: it is completed",
        f"remove said {removed}",
    )
    again = await second.expect("redelivered", deadline=STEP_TIMEOUT)
    story.check(
        again["decision_ids"] == [],
        "a fresh inbox delivered nothing: an acknowledged decision never returns",
        f"it delivered {again['decision_ids']} again",
    )
    story.check(await second.exit_code() == 0, "worker 2 exited cleanly")

    # the subscriber followed live and ended with the run
    while (message := await subscriber.next(STEP_TIMEOUT))["event"] == "chunk":
        seen.append((message["seq"], message["text"]))
    if message["event"] != "end":
        raise DemoFailed(f"the subscriber said {message}")
    seqs = [seq for seq, _ in seen]
    story.check(
        seen == streamed and seqs == list(range(1, len(streamed) + 1)),
        f"the subscriber got chunks 1-{len(seqs)} once each, in order, then the end",
        f"it received seqs {seqs}",
    )
    story.check(await subscriber.exit_code() == 0, "the subscriber exited cleanly")

    # 5. the audit trail
    rows = await registry.audit_trail(run_id=run_id)
    story.console.print()
    story.console.print(audit_table(rows, title=f"decision_audit for {run_id}:", one_run=True))
    row = rows[0] if len(rows) == 1 else None
    story.check(
        row is not None
        and row["status"] == "acked"
        and row["attempts"] == 1
        and row["acked_at"] is not None
        and row["run_status"] == RunStatus.COMPLETED.value,
        "the audit trail: one decision, acked after one delivery, run completed",
        f"it holds {[(r['decision_id'], r['status'], r['attempts']) for r in rows]}",
    )


if __name__ == "__main__":
    sys.exit(main())
