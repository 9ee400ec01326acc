"""Fencing against a real stalled owner: a process stopped (SIGSTOP) past its lease.

The owner runs ``tests/faults/fencing_worker.py``. While it is stopped its lease expires, and
this test, as the heir, adopts the run and consumes its inbox; then the owner is continued
(SIGCONT) with a delivery in hand that it has not acknowledged yet. From then on nothing the
owner does may land (its claims and its ack are refused under its old owner epoch), and it
must be told within about one heartbeat that it lost the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from registry import DecisionInbox, RegistrySettings, RunHandle, RunRegistry, ToolCallDecision
from tests.helpers.database import decisions_of_run, fetch

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("fencing_worker.py")
PROJECT_ROOT = Path(__file__).resolve().parents[2]

LEASE_SECONDS = 2.0
HEARTBEAT_INTERVAL = 0.5
#: how long the owner is kept stopped: past its lease, so that the heir can adopt the run
STOPPED_FOR = 3.0
#: decisions forwarded after the owner is continued, one every FORWARD_EVERY seconds
FORWARDS = 20
FORWARD_EVERY = 0.05
#: the owner must report the lost lease this soon after SIGCONT (about one heartbeat)
LOST_WITHIN = 1.0
#: deadline for a line from the owner (a process start imports SQLAlchemy and Alembic)
LINE_TIMEOUT = 20.0
#: deadline for the heir to see what it waits for
HEIR_TIMEOUT = 5.0
#: deadline for each thing the owner must say after SIGCONT (a wait, not the bound checked)
OUTCOME_TIMEOUT = 3.0


class Owner:
    """The owner process; every stdout line is kept with the test's monotonic time of arrival."""

    def __init__(self, process: asyncio.subprocess.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr
        self.lines: list[tuple[float, str]] = []
        self._eof = False
        self._changed = asyncio.Event()
        self._pump = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while raw := await self.process.stdout.readline():
            self.lines.append((time.monotonic(), raw.decode().rstrip("\n")))
            self._changed.set()
        self._eof = True
        self._changed.set()

    def story(self) -> str:
        try:
            err = self.stderr.read_text(errors="replace")[-3000:]
        except OSError:
            err = "(unreadable)"
        texts = [text for _, text in self.lines]
        return f"owner: exit {self.process.returncode}; lines {texts}; stderr: {err}"

    def texts(self, verb: str) -> list[list[str]]:
        """The words of every line so far whose first word is ``verb``."""
        return [text.split() for _, text in self.lines if text.split()[:1] == [verb]]

    async def first(
        self, what: str, matches: Callable[[list[str]], bool], timeout: float = LINE_TIMEOUT
    ) -> tuple[float, list[str]]:
        """The first line (arrival time, words) that ``matches``, waiting up to ``timeout``."""
        found = await self.maybe_first(matches, timeout)
        if found is None:
            raise AssertionError(f"no {what} within {timeout}s from {self.story()}")
        return found

    async def maybe_first(
        self, matches: Callable[[list[str]], bool], timeout: float
    ) -> tuple[float, list[str]] | None:
        """Like :meth:`first`, but ``None`` if no such line came within ``timeout``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout, 0)):
                while True:
                    self._changed.clear()
                    for arrived, text in self.lines:
                        words = text.split()
                        if words[:1] == ["error"]:
                            raise AssertionError(f"the owner failed: {self.story()}")
                        if matches(words):
                            return arrived, words
                    if self._eof:
                        raise AssertionError(f"the owner closed stdout: {self.story()}")
                    await self._changed.wait()
        return None

    async def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()

    def signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, number)

    async def reap(self) -> None:
        self.signal(signal.SIGCONT)  # a stopped process must not outlive the test
        self.signal(signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 30)
        await asyncio.wait_for(self._pump, 30)
        if self.process.stdin is not None:
            self.process.stdin.close()


@contextlib.asynccontextmanager
async def owner_process(url: str, directory: Path, *args: str) -> AsyncIterator[Owner]:
    """Start the owner worker inside the block; it is killed and reaped when the block exits."""
    stderr_path = directory / "owner.stderr"
    stderr = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            url,
            *args,
            cwd=PROJECT_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    finally:
        os.close(stderr)  # the child holds its own copy
    owner = Owner(process, stderr_path)
    try:
        yield owner
    finally:
        await owner.reap()


def decision(decision_id: str) -> ToolCallDecision:
    return ToolCallDecision.resume(
        f"call-{decision_id}", {"approved": True}, 1_700_000_000_000, decision_id=decision_id
    )


async def consume(inbox: DecisionInbox, got: list[tuple[str, int, bool]]) -> None:
    """Acknowledge every delivery of ``inbox`` and record (decision id, attempts, acked)."""
    async for delivery in inbox:
        acked = await inbox.ack(delivery)
        got.append((delivery.decision.decision_id, delivery.attempts, acked))


async def until(condition: Callable[[], bool], timeout: float) -> bool:
    """Whether ``condition`` came true within ``timeout`` seconds (polled)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.02)
    return condition()


async def test_a_stopped_owner_gets_and_acks_nothing_after_the_adoption_and_learns_it_lost_the_run(
    registry_database_url: str, tmp_path: Path
) -> None:
    url = registry_database_url
    heir_settings = RegistrySettings(
        lease_seconds=LEASE_SECONDS, heartbeat_interval=HEARTBEAT_INTERVAL, safety_interval=0.2
    )
    leases = ("--lease", str(LEASE_SECONDS), "--heartbeat", str(HEARTBEAT_INTERVAL))
    heir_got: list[tuple[str, int, bool]] = []
    async with (
        await RunRegistry.connect(url, worker_id="sender", listen=False) as sender,
        await RunRegistry.connect(url, worker_id="heir", settings=heir_settings) as heir,
        owner_process(
            url, tmp_path, "owner", "run-1", "thread-1", *leases, "--hold-ack", "held"
        ) as owner,
    ):
        await owner.first("ready", lambda words: words == ["ready"])

        # before the stop the owner works normally: it receives and acknowledges
        assert await sender.forward_decisions_by_run_id("run-1", [decision("before")])
        _, acked = await owner.first("ack of 'before'", lambda w: w[:2] == ["acked", "before"])
        assert acked[2] == "true", owner.story()
        # and it stops holding "held": received, not yet acknowledged
        assert await sender.forward_decisions_by_run_id("run-1", [decision("held")])
        await owner.first("'held'", lambda w: w[:2] == ["received", "held"])

        stopped_wall = time.time()
        stopped_at = time.monotonic()
        owner.signal(signal.SIGSTOP)

        # the heir adopts the run as soon as the owner's lease has expired...
        adopted: list[RunHandle] = []
        async with asyncio.timeout(LEASE_SECONDS + HEIR_TIMEOUT):
            while not adopted:
                adopted = await heir.adopt_orphaned_runs()
                if not adopted:
                    await asyncio.sleep(0.05)
        [handle] = adopted
        adopted_after = time.monotonic() - stopped_at
        assert (handle.run_id, handle.record.owner_epoch) == ("run-1", 2)
        # ...and consumes its inbox: "held" is delivered again, and acknowledged by the heir
        consumer = asyncio.create_task(consume(handle.decisions(), heir_got))
        try:
            assert await until(lambda: bool(heir_got), HEIR_TIMEOUT), "the heir got nothing"
            assert heir_got == [("held", 2, True)]
            assert time.monotonic() - stopped_at < STOPPED_FOR, (
                "adopting took longer than the owner stays stopped: the test proves nothing"
            )

            await asyncio.sleep(stopped_at + STOPPED_FOR - time.monotonic())  # the input
            owner.signal(signal.SIGCONT)
            resumed_at = time.monotonic()

            await owner.send("ack")  # the owner now acknowledges "held", which it still holds
            after = [f"after-{index:02}" for index in range(FORWARDS)]
            for decision_id in after:
                assert await sender.forward_decisions_by_run_id("run-1", [decision(decision_id)])
                await asyncio.sleep(FORWARD_EVERY)
            await until(lambda: len(heir_got) > FORWARDS, HEIR_TIMEOUT)
            # what the owner says after SIGCONT, each awaited a bounded time (checked below)
            ack_of_held = await owner.maybe_first(
                lambda w: w[0] in ("acked", "ack-refused") and w[1] == "held", OUTCOME_TIMEOUT
            )
            tripped = await owner.maybe_first(
                lambda w: w[0] == "token-tripped",
                resumed_at + LOST_WITHIN + OUTCOME_TIMEOUT - time.monotonic(),
            )
            inbox_lost = await owner.maybe_first(lambda w: w[0] == "inbox-lost", OUTCOME_TIMEOUT)
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer

    received = owner.texts("received")
    assert [(words[1], words[2]) for words in received] == [("before", "1"), ("held", "1")], (
        f"the owner received decisions after it was stopped: {owner.story()}"
    )
    assert all(float(words[3]) < stopped_wall for words in received), owner.story()
    assert ack_of_held is not None, f"the owner never tried to ack 'held': {owner.story()}"
    assert ack_of_held[1][0] == "ack-refused", (
        f"the owner's ack of 'held' after the adoption was not refused: {owner.story()}"
    )
    assert [words[1] for words in owner.texts("acked")] == ["before"], owner.story()
    assert tripped is not None, f"the owner's token never tripped: {owner.story()}"
    tripped_at, tripped_words = tripped
    assert tripped_words[1] == "lease_lost=true", owner.story()
    assert tripped_at - resumed_at <= LOST_WITHIN, (
        f"the owner learnt it lost the run {tripped_at - resumed_at:.2f}s after SIGCONT"
    )
    assert inbox_lost is not None, f"the owner's inbox never raised LeaseLostError: {owner.story()}"
    assert heir_got == [("held", 2, True)] + [(d, 1, True) for d in after], (
        f"the heir did not receive every decision exactly once: {heir_got}"
    )

    print(
        f"\nfencing: adopted {adopted_after:.2f}s after SIGSTOP; the owner was told it lost the"
        f" run {tripped_at - resumed_at:.3f}s after SIGCONT"
    )
    rows = await decisions_of_run(url, "run-1")
    assert [(row["decision_id"], row["status"], row["attempts"]) for row in rows] == [
        ("before", "acked", 1),
        ("held", "acked", 2),
        *[(d, "acked", 1) for d in after],
    ], "each decision acknowledged once, and nothing after the adoption claimed by the owner"
    [run] = await fetch(url, "SELECT owner_id, owner_epoch, status FROM registry.runs")
    assert (run["owner_id"], run["owner_epoch"], run["status"]) == ("heir", 2, "active")
