"""Real processes killed with SIGKILL at the worst moments; the rows must still tell the truth.

The processes run ``tests/faults/worker.py``. A killed process runs no cleanup at all: its
leases are not released, its connections just vanish, so what the database shows afterwards
is exactly what a crash leaves behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from registry import RunRegistry, ToolCallDecision
from tests.helpers.database import decisions_of_run, fetch, runs_of_thread

pytestmark = pytest.mark.slow

T = TypeVar("T")

WORKER = Path(__file__).with_name("worker.py")
PROJECT_ROOT = Path(__file__).resolve().parents[2]

#: deadline for one line from a worker (a process start imports SQLAlchemy and Alembic)
LINE_TIMEOUT = 20.0
#: deadline for the database to notice a killed client and end its backends
BACKENDS_GONE_TIMEOUT = 15.0


class Child:
    """One worker process: read its stdout lines with deadlines, write to its stdin, kill it."""

    def __init__(
        self, name: str, process: asyncio.subprocess.Process, stderr: Path, *, group: bool
    ) -> None:
        self.name = name
        self.process = process
        self.stderr = stderr
        #: the process leads its own process group, which holds every process it forked
        self.group = group
        self.lines: list[str] = []

    def _story(self) -> str:
        try:
            err = self.stderr.read_text(errors="replace")[-3000:]
        except OSError:
            err = "(unreadable)"
        return f"{self.name}: exit {self.process.returncode}; lines {self.lines}; stderr: {err}"

    async def line(self, timeout: float = LINE_TIMEOUT) -> str:
        """The next line; fails at EOF, after ``timeout``, or when the worker reports an error."""
        assert self.process.stdout is not None
        try:
            raw = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(f"no line within {timeout}s from {self._story()}") from None
        if not raw:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 5)
            raise AssertionError(f"stdout closed by {self._story()}")
        text = raw.decode().rstrip("\n")
        self.lines.append(text)
        if text.startswith("error "):
            raise AssertionError(f"worker failed: {self._story()}")
        return text

    async def expect(self, expected: str, timeout: float = LINE_TIMEOUT) -> None:
        got = await self.line(timeout)
        assert got == expected, f"expected {expected!r}, got {got!r} from {self._story()}"

    async def rest(self, timeout: float = LINE_TIMEOUT) -> list[str]:
        """Every line still in the pipe, up to EOF (after the process died)."""
        assert self.process.stdout is not None
        data = await asyncio.wait_for(self.process.stdout.read(), timeout)
        rest = data.decode().splitlines()
        self.lines.extend(rest)
        return rest

    async def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()

    def kill(self) -> None:
        if self.group:
            # also after the leader exited: a group id is not reused while a member lives
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        elif self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    async def exit_code(self, timeout: float = LINE_TIMEOUT) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"did not exit within {timeout}s: {self._story()}") from None

    async def killed(self) -> None:
        """SIGKILL the process and wait until it is gone."""
        self.kill()
        assert await self.exit_code() == -signal.SIGKILL, self._story()

    async def reap(self) -> None:
        self.kill()
        if self.process.stdin is not None:
            self.process.stdin.close()
        # drains the pipes to EOF, so their transports close before the event loop does
        await asyncio.wait_for(self.process.communicate(), 30)


def _stderr_file(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


class Children:
    """Starts workers and remembers them, so that :func:`children` can kill every one."""

    def __init__(self, url: str, directory: Path) -> None:
        self.url = url
        self.directory = directory
        self.started: list[Child] = []

    async def start(self, role: str, *args: str, group: bool = False) -> Child:
        """Start ``worker.py ROLE URL *args`` (it prints its first line once set up).

        ``group=True`` starts it in a session of its own, so that a kill reaches every process
        it forks.
        """
        name = f"{role}-{len(self.started)}"
        stderr_path = self.directory / f"{name}.stderr"
        stderr = _stderr_file(stderr_path)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER),
                role,
                self.url,
                *args,
                cwd=PROJECT_ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=group,
            )
        finally:
            os.close(stderr)  # the child holds its own copy
        child = Child(name, process, stderr_path, group=group)
        self.started.append(child)
        return child


@contextlib.asynccontextmanager
async def children(url: str, directory: Path) -> AsyncIterator[Children]:
    """Start workers inside the block; every one is killed and reaped when it exits."""
    pool = Children(url, directory)
    try:
        yield pool
    finally:
        for child in pool.started:
            child.kill()
        await asyncio.gather(*(child.reap() for child in pool.started))


async def together(*reads: Awaitable[T]) -> list[T]:
    """Await ``reads`` at once; if one fails, the others are cancelled before anything reads on.

    (``gather`` would leave them waiting on the pipes that the clean-up then drains.)
    """
    tasks = [asyncio.ensure_future(read) for read in reads]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def client_backends(url: str) -> int:
    """How many client connections to the test database there are, besides this query's own."""
    [row] = await fetch(
        url,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
        " AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    return int(row["n"])


async def until_no_client_backends(url: str) -> None:
    """Wait until the server has ended the backends of every killed client.

    A backend finishes its current statement (and commits it, if the client had sent it whole)
    before it notices that the client is gone; only then is what the kill left final.
    """
    async with asyncio.timeout(BACKENDS_GONE_TIMEOUT):
        while await client_backends(url):
            await asyncio.sleep(0.05)


async def delivered(child: Child) -> tuple[str, int, bool]:
    """The next delivery an ``inbox`` worker reports: decision id, attempts, acked."""
    line = json.loads(await child.line())
    return line["decision_id"], line["attempts"], line["acked"]


def decision(decision_id: str) -> ToolCallDecision:
    return ToolCallDecision.resume(
        f"call-{decision_id}", {"approved": True}, 1_700_000_000_000, decision_id=decision_id
    )


# --- 1. a worker killed between receiving a decision and acknowledging it -------------------


async def test_a_decision_received_but_not_acked_is_delivered_again_after_a_kill(
    registry_database_url: str, tmp_path: Path
) -> None:
    url = registry_database_url
    async with (
        await RunRegistry.connect(url, worker_id="client", listen=False) as client,
        children(url, tmp_path) as spawn,
    ):
        first = await spawn.start("inbox", "worker-1", "run-1", "--register", "thread-1")
        await first.expect("ready")
        assert await client.forward_decisions_by_run_id("run-1", [decision("d1")]) is not None
        assert await delivered(first) == ("d1", 1, False)
        [row] = await decisions_of_run(url, "run-1")
        assert (row["status"], row["attempts"]) == ("delivered", 1)

        await first.killed()  # holding d1, not acknowledged

        second = await spawn.start("inbox", "worker-1", "run-1", "--ack")
        await second.expect("resumed run-1")
        await second.expect("ready")
        assert await delivered(second) == ("d1", 2, True)
        [row] = await decisions_of_run(url, "run-1")
        assert (row["decision_id"], row["status"], row["attempts"]) == ("d1", "acked", 2)
        # the inbox goes on with the next decision, not with d1 again
        assert await client.forward_decisions_by_run_id("run-1", [decision("d2")]) is not None
        assert await delivered(second) == ("d2", 1, True)

        await second.killed()

        # a fresh inbox starts from the table: an acknowledged decision is never a third time
        third = await spawn.start("inbox", "worker-1", "run-1", "--ack")
        await third.expect("resumed run-1")
        await third.expect("ready")
        assert await client.forward_decisions_by_run_id("run-1", [decision("d3")]) is not None
        assert await delivered(third) == ("d3", 1, True)

    rows = await decisions_of_run(url, "run-1")
    assert [(row["decision_id"], row["status"], row["attempts"]) for row in rows] == [
        ("d1", "acked", 2),
        ("d2", "acked", 1),
        ("d3", "acked", 1),
    ]


# --- 2. a client killed in the middle of forwarding a batch ---------------------------------

BATCH = 500
KILL_ROUNDS = 5


async def batch_sizes(url: str) -> dict[str, int]:
    """Stored decisions per batch (``ROUND-N`` of ``ROUND-N-INDEX``)."""
    rows = await fetch(
        url,
        "SELECT regexp_replace(decision_id, '-[0-9]+$', '') AS batch, count(*) AS n"
        " FROM registry.decisions WHERE run_id = 'run-1' GROUP BY 1",
    )
    return {row["batch"]: int(row["n"]) for row in rows}


async def test_a_client_killed_mid_forward_leaves_each_batch_whole_or_absent(
    registry_database_url: str, tmp_path: Path
) -> None:
    url = registry_database_url
    seed = random.randrange(2**32)
    chance = random.Random(seed)
    async with await RunRegistry.connect(url, worker_id="owner", listen=False) as owner:
        await owner.register("run-1", "agent-a", "thread-1")
    # the owner is closed: every client backend left in the database belongs to a forwarder

    sent: list[str] = []
    confirmed: set[str] = set()
    in_flight: list[str] = []
    async with children(url, tmp_path) as spawn:
        for number in range(KILL_ROUNDS):
            forwarder = await spawn.start("forward-loop", "run-1", f"k{number}", str(BATCH))
            # two whole batches first, to learn how long one takes on this machine
            stamps: list[float] = []
            while len(stamps) < 3:
                line = await forwarder.line()
                if line.startswith("forwarded "):
                    stamps.append(time.monotonic())
            per_batch = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
            # not a synchronisation: this picks the random moment of the kill
            await asyncio.sleep(chance.uniform(0, per_batch))
            await forwarder.killed()
            await forwarder.rest()
            for line in forwarder.lines:
                verb, prefix = line.split()
                if verb == "sending":
                    sent.append(prefix)
                else:
                    confirmed.add(prefix)
            if forwarder.lines[-1].startswith("sending "):
                in_flight.append(forwarder.lines[-1].split()[1])
            await until_no_client_backends(url)

            sizes = await batch_sizes(url)
            torn = {prefix: size for prefix, size in sizes.items() if size != BATCH}
            assert not torn, f"batches stored in part after a kill (seed {seed}): {torn}"

    sizes = await batch_sizes(url)
    assert set(sizes) <= set(sent), "only batches that were sent are stored"
    assert confirmed <= set(sizes), "a forward that returned is stored"
    assert all(size == BATCH for size in sizes.values()), sizes
    # the kills must have hit forwards in flight, or this test proved nothing
    assert in_flight, f"no kill landed during a forward (seed {seed})"
    outcome = {prefix: sizes.get(prefix, 0) for prefix in in_flight}
    print(f"\nforward kills (seed {seed}): in flight at the kill -> stored decisions: {outcome}")


# --- 3. the owner of many runs killed; adopters race for them --------------------------------

RUNS = 100
LEASE_SECONDS = 1.0
HEARTBEAT_INTERVAL = 0.2
#: the owner's lease expires at most one lease after the kill; the adopters poll every 20 ms
ADOPTED_WITHIN = 2 * LEASE_SECONDS
#: how long to wait for every adoption before reporting what is missing (a hang guard)
ADOPTION_DEADLINE = LEASE_SECONDS + 5.0


async def test_runs_of_a_killed_owner_are_each_adopted_once_within_two_leases_of_the_kill(
    registry_database_url: str, tmp_path: Path
) -> None:
    url = registry_database_url
    leases = ("--lease", str(LEASE_SECONDS), "--heartbeat", str(HEARTBEAT_INTERVAL))
    names = [f"adopter-{index}" for index in range(3)]
    got: dict[str, list[str]] = {name: [] for name in names}
    async with children(url, tmp_path) as spawn:
        owner = await spawn.start("own", "owner", str(RUNS), *leases)
        adopters = [
            await spawn.start("adopt", name, *leases, "--idle-after", str(1.5 * LEASE_SECONDS))
            for name in names
        ]
        await owner.expect("ready", timeout=40)
        await together(*(adopter.expect("ready") for adopter in adopters))
        for adopter in adopters:
            await adopter.send("go")
        # while the owner lives, its heartbeat keeps every lease: nobody adopts anything
        await together(*(adopter.expect("idle") for adopter in adopters))

        lines: asyncio.Queue[tuple[str, str, float]] = asyncio.Queue()

        async def pump(name: str, adopter: Child) -> None:
            while True:
                line = await adopter.line(timeout=ADOPTION_DEADLINE + LINE_TIMEOUT)
                await lines.put((name, line, time.monotonic()))
                if line.startswith("stopped "):
                    return

        killed_at = time.monotonic()
        owner.kill()
        pumps = [
            asyncio.create_task(pump(name, adopter))
            for name, adopter in zip(names, adopters, strict=True)
        ]
        try:
            first_at = 0.0
            try:
                async with asyncio.timeout(ADOPTION_DEADLINE):
                    while sum(len(runs) for runs in got.values()) < RUNS:
                        name, line, at = await lines.get()
                        verb, *run_ids = line.split()
                        assert verb == "adopted", f"{name} said {line!r}"
                        got[name].extend(run_ids)
                        first_at = first_at or at
            except TimeoutError:
                failed = [task.exception() for task in pumps if task.done() and task.exception()]
                raise AssertionError(
                    f"not all {RUNS} runs adopted within {ADOPTION_DEADLINE}s of the kill: "
                    f"{ {name: len(runs) for name, runs in got.items()} }; pumps: {failed}"
                ) from None
            adopted_in = at - killed_at
            assert await owner.exit_code() == -signal.SIGKILL
            for adopter in adopters:
                await adopter.send("stop")
            await asyncio.wait_for(asyncio.gather(*pumps), LINE_TIMEOUT)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        while not lines.empty():
            name, line, _ = lines.get_nowait()
            verb, *run_ids = line.split()
            if verb == "adopted":
                got[name].extend(run_ids)
            else:
                assert (verb, run_ids) == ("stopped", [str(len(got[name]))]), line

        # the adopters still hold their runs (none has exited): the table says who
        rows = await fetch(
            url, "SELECT run_id, owner_id, status FROM registry.runs ORDER BY run_id"
        )

    print(
        f"\nadoption: first run {first_at - killed_at:.3f}s, all {RUNS} runs "
        f"{adopted_in:.3f}s after the kill (lease {LEASE_SECONDS}s); "
        f"per adopter {[len(runs) for runs in got.values()]}"
    )
    everything = [run_id for runs in got.values() for run_id in runs]
    assert sorted(everything) == sorted(f"run-{index}" for index in range(RUNS)), (
        "every run adopted, and none twice"
    )
    owners = {run_id: name for name, runs in got.items() for run_id in runs}
    assert {row["run_id"]: row["owner_id"] for row in rows} == owners
    assert {row["status"] for row in rows} == {"active"}
    assert adopted_in < ADOPTED_WITHIN, (
        f"the last run was adopted {adopted_in:.2f}s after the kill (lease {LEASE_SECONDS}s)"
    )


# --- 4. fifty processes register on one thread at the same moment ----------------------------

RACERS = 50


async def test_fifty_processes_registering_on_one_thread_leave_one_active_run(
    registry_database_url: str, tmp_path: Path
) -> None:
    url = registry_database_url
    run_ids = [f"run-{index:02}" for index in range(RACERS)]
    started = time.monotonic()
    async with children(url, tmp_path) as spawn:
        # one process imports the registry and forks the fifty racers (see worker.py)
        race = await spawn.start("register-race", "thread-1", str(RACERS), group=True)
        # every racer has connected and checked the schema before anyone registers
        ready = sorted([await race.line(timeout=60) for _ in range(RACERS)])
        assert ready == sorted(f"ready {index}" for index in range(RACERS))
        connected = time.monotonic()
        await race.send("go")
        registered: list[str] = []
        exits: dict[int, int] = {}
        while (line := await race.line(timeout=60)) != "done":
            verb, first, *rest = line.split()
            if verb == "registered":
                registered.append(first)
            else:
                assert verb == "exit", line
                exits[int(first)] = int(rest[0])
        raced = time.monotonic()
        assert await race.exit_code() == 0
    print(
        f"\n{RACERS} registering processes: {connected - started:.1f}s to fork and connect, "
        f"{raced - connected:.2f}s from 'go' to the last exit"
    )
    assert sorted(registered) == run_ids, "every racer's register returned"
    assert exits == dict.fromkeys(range(RACERS), 0)

    rows = await runs_of_thread(url, "thread-1")
    assert sorted(row["run_id"] for row in rows) == run_ids
    active = [row["run_id"] for row in rows if row["status"] == "active"]
    assert len(active) == 1, active
    superseded = {row["run_id"]: row for row in rows if row["status"] == "superseded"}
    assert len(superseded) == RACERS - 1
    # each register superseded the run active just before it: one chain through all fifty
    successor = {run_id: row["superseded_by"] for run_id, row in superseded.items()}
    for run_id, row in superseded.items():
        assert row["end_reason"] == f"superseded by run {successor[run_id]}"
    [first] = set(run_ids) - set(successor.values())
    chain = [first]
    while chain[-1] in successor and len(chain) <= RACERS:
        chain.append(successor[chain[-1]])
    assert chain[-1] == active[0]
    assert sorted(chain) == run_ids, "the supersede chain passes every run exactly once"


async def test_a_run_queued_when_its_worker_is_killed_runs_after_the_restart(
    registry_database_url: str, tmp_path: Path
) -> None:
    async with children(registry_database_url, tmp_path) as spawn:
        owner = await spawn.start("own", "server", "1", "--queued")
        await owner.expect("ready", timeout=40)
        await owner.killed()  # nothing released: the active run's lease is still held
    async with RunRegistry.connect(registry_database_url, worker_id="server") as restarted:
        resumed = {handle.run_id: handle for handle in await restarted.resume_owned_runs()}
        assert sorted(resumed) == ["queued-0", "run-0"]
        ran = asyncio.Event()

        async def carry_on() -> None:
            async with restarted.continue_run(resumed["queued-0"]):
                ran.set()

        task = asyncio.create_task(carry_on())
        assert await resumed["run-0"].finish("completed")
        await asyncio.wait_for(task, LINE_TIMEOUT)
        assert ran.is_set()
    rows = await runs_of_thread(registry_database_url, "thread-0")
    assert {row["run_id"]: row["status"] for row in rows} == {
        "run-0": "completed",
        "queued-0": "completed",
    }
