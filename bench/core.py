"""Benchmark the registry's core calls against raw asyncpg doing the minimal equivalent SQL.

Run it from the checkout, with the project installed (``pip install -e '.[dev]'``)::

    python bench/core.py [--database-url URL] [--iterations N]

The server is ``--database-url``, else ``$REGISTRY_DATABASE_URL``, else an embedded PostgreSQL
started in a temporary directory (and stopped at the end). The role must be allowed to create
databases: the benchmark creates a fresh ``registry_bench_<hex>`` database on that server,
migrates it, runs everything against it and drops it at the end.

For each operation it prints our figure, a baseline measured in the same run against the same
database with a raw asyncpg pool or connection (for 5, the lease length), and the ratio
ours/baseline:

1. ``register`` + ``remove_by_run_id`` on fresh ids, against a raw INSERT of the run row
   (``RETURNING`` the row, as a handle needs it) and an UPDATE of it to ``completed``: mean
   microseconds per pair, and pairs per second for one sequential caller.
2. ``handle_by_thread``, against ``pool.fetchrow`` of the same SELECT: p50 and mean
   microseconds. Goal: within 1.5x of raw asyncpg.
3. Forward-to-inbox latency across two processes: the parent stamps ``time.monotonic_ns()``
   just before ``forward_decisions_by_run_id``; a child process, iterating the run's inbox,
   stamps the delivery on receipt, acknowledges it and reports the stamp over its stdout. One
   decision is in flight at a time. Baseline: INSERT of the decision row and ``pg_notify`` in
   one statement, received by a raw asyncpg LISTEN in the child (stamped in the listener
   callback). Goal: our p50 within 2x of the raw round trip. A second baseline, for
   diagnosis: the raw LISTEN child then also claims the row with a minimal UPDATE ...
   RETURNING, stamps when the row is in hand and acks it: the floor of the inbox's design
   (notify, then claim), without the registry's code.
4. Cancel propagation across two processes: for a fresh run each iteration the child holds the
   run's ``cancellation_token()`` and stamps when ``await token.wait()`` returns; the parent
   stamps just before ``cancel_active_run_by_id``. Baseline: UPDATE of ``cancel_requested_at``
   with ``pg_notify`` in one statement, received by a raw asyncpg LISTEN in the child.
5. Death to adoption: a worker process registers ``DEATH_RUNS`` runs with a short lease
   (``DEATH_LEASE`` seconds, renewed every ``DEATH_HEARTBEAT``), says it is ready and is
   SIGKILLed by the parent at a random point of its heartbeat cycle; an adopter registry in
   the parent then calls ``adopt_orphaned_runs(limit=ADOPT_LIMIT)`` back to back while a call
   fills its limit, else every ``ADOPT_POLL`` seconds, until it holds every run. Figures:
   from the kill to the first and to the last adoption, over ``DEATH_ROUNDS`` rounds.
   Baseline: the lease length, the bound the design promises. The exact floor of a round is
   the lease left at the kill (read from the rows after it, and again while waiting, as a
   renewal sent just before the kill may land after it): up to one heartbeat less than the
   lease, so a ratio under 1 is expected; it is the baseline of a second, diagnostic row.
6. Resume after a restart: ``RESUME_RUNS`` active runs owned by one worker id, each with
   ``RESUME_DECISIONS`` pending decisions, bulk-inserted with raw SQL (``INSERT ... SELECT``
   over ``generate_series``: seconds faster than registering and forwarding through the API,
   and the rows are the same), one such set for ours and one for the baseline. A fresh
   registry with that worker id times ``resume_owned_runs()`` (p50 of ``RESUME_ROUNDS`` calls
   after one warm-up; the call is repeatable), against one raw ``UPDATE runs ... RETURNING``.
   Then it opens every resumed handle's inbox, ``DRAIN_CONCURRENCY`` at a time, and drains and
   acks its decisions: the total for all of them. Baseline, at the same concurrency, on a pool
   of as many connections as the registry's engine may open (``pool_size`` plus as many
   overflow): per run one claim ``UPDATE ... RETURNING`` (the one of the forward baseline) and
   one ack ``UPDATE`` per decision, as the inbox acks them one by one.
   The drain runs in halves ordered ours, raw, raw, ours, so warm-up and drift hit both alike.
   For diagnosis, the server sessions opened during each variant's drain are printed
   (``pg_stat_database.sessions``, PostgreSQL 14 and later).

7. The connection path: the registry's own ``ConnectionLane`` (connections kept open and handed
   whole from statement to statement) against asyncpg's ``Pool`` with its reset disabled, both
   with ``PATH_SIZE`` connections and the lookup of 2 as the statement: p50/p99 of one lookup and
   of one lookup inside ``BEGIN``/``COMMIT`` (interleaved call by call), and the time per call
   with ``PATH_CALLERS`` concurrent callers of ``PATH_CALLS`` lookups each (median of
   ``PATH_ROUNDS`` rounds, alternating which goes first). This is the figure that keeps the lane:
   a library's pool would replace it if the lane were not faster.

CLOCK_MONOTONIC is system-wide on Linux, so parent and child stamps compare. Each operation
is warmed up before it is measured, and ours and the baselines alternate call by call (with
their child processes running side by side) so that drift and noisy neighbours hit every
variant alike; the load average is printed so a reader can judge how quiet the machine was.

The baseline SQL lives here, not in ``registry/repository.py``: it is the yardstick the
registry is measured against, so it must not share the registry's code path. Every value
travels as a bind parameter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import random
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import sqlalchemy
from _shared import (
    CHILD_TIMEOUT,
    Child,
    Headline,
    Probe,
    add_summary_option,
    benchmark_database,
    benchmark_server,
    interleave,
    raw_pool,
    say,
    stdin_reader,
    write_summary,
)

from registry import (
    RegistrySettings,
    RunCancellationToken,
    RunHandle,
    RunRegistry,
    ToolCallDecision,
)
from registry.connections import ConnectionLane
from registry.database import asyncpg_dsn

DEFAULT_ITERATIONS = 500
#: seconds to wait for a child's line before calling the benchmark broken
#: how many active threads the lookup benchmark cycles through
LOOKUP_THREADS = 64
AGENT_ID = "bench-agent"
WORKER_ID = "bench-parent"
LEASE = timedelta(seconds=30)

#: death to adoption: runs the worker registers, rounds, its lease and heartbeat in seconds
DEATH_RUNS = 100
DEATH_ROUNDS = 3
DEATH_LEASE = 1.0
DEATH_HEARTBEAT = 0.2
#: the adopter claims at most this many runs per call, and polls this often while none is due
ADOPT_LIMIT = 25
ADOPT_POLL = 0.01
#: resume: runs per worker id, pending decisions per run, inboxes drained at once, timed calls
RESUME_RUNS = 1000
RESUME_DECISIONS = 10
DRAIN_CONCURRENCY = 50
RESUME_ROUNDS = 5

#: connection paths: connections of the lane and of asyncpg's pool, callers at once, calls each
PATH_SIZE = 10
PATH_CALLERS = 100
PATH_CALLS = 20
PATH_ROUNDS = 5

CHILD_MODES = (
    "forward-ours",
    "forward-raw",
    "forward-raw-claim",
    "cancel-ours",
    "cancel-raw",
    "worker",
)

# --- the raw asyncpg baseline: the minimal SQL that does the same job --------------------------

#: the raw baselines' own channel: the registry's carries signed payloads they do not read
RAW_CHANNEL = "bench_core_raw"
RAW_INSERT_RUN = """
    INSERT INTO runs (run_id, thread_id, agent_id, owner_id, lease_expires_at)
    VALUES ($1, $2, $3, $4, now() + $5::interval)
    RETURNING run_id, thread_id, agent_id, status, owner_id, cancel_requested_at,
              created_at, updated_at, ended_at, end_reason
"""

RAW_COMPLETE_RUN = """
    UPDATE runs
       SET status = 'completed', end_reason = 'removed', ended_at = now(), updated_at = now(),
           lease_expires_at = NULL
     WHERE run_id = $1 AND status = 'active'
"""

RAW_ACTIVE_BY_THREAD = """
    SELECT run_id, thread_id, agent_id, status, owner_id, cancel_requested_at,
           created_at, updated_at, ended_at, end_reason
      FROM runs
     WHERE thread_id = $1 AND status = 'active'
"""

RAW_FORWARD = """
    WITH inserted AS (
        INSERT INTO decisions (run_id, thread_id, agent_id, decision_id, target_id, action,
                               result, decision_updated_at)
        VALUES ($1, $2, $3, $4, $5, 'resume', $6::jsonb, $7)
        RETURNING run_id
    )
    SELECT pg_notify($8, json_build_object('kind', 'decision', 'id', run_id)::text)
      FROM inserted
"""

# a minimal claim and ack, for the second forward baseline (the floor of the inbox's design)
RAW_CLAIM = """
    UPDATE decisions
       SET status = 'delivered', delivered_at = coalesce(delivered_at, now()),
           attempts = attempts + 1
     WHERE id IN (
            SELECT id FROM decisions
             WHERE run_id = $1 AND id > $2 AND status IN ('pending', 'delivered')
             ORDER BY id
             LIMIT $3
           )
    RETURNING id, run_id, decision_id, target_id, action, result::text AS result, reason,
              decision_updated_at, attempts, received_at
"""

RAW_ACK = """
    UPDATE decisions SET status = 'acked', acked_at = now()
     WHERE id = $1 AND run_id = $2 AND status = 'delivered'
"""

RAW_CANCEL = """
    WITH cancelled AS (
        UPDATE runs SET cancel_requested_at = now(), updated_at = now()
         WHERE run_id = $1 AND status = 'active'
        RETURNING run_id
    )
    SELECT pg_notify($2, json_build_object('kind', 'cancel', 'id', run_id)::text)
      FROM cancelled
"""

RAW_RESUME = """
    UPDATE runs SET lease_expires_at = now() + $2::interval, updated_at = now()
     WHERE owner_id = $1 AND status = 'active'
    RETURNING run_id, thread_id, agent_id, status, owner_id, cancel_requested_at,
              created_at, updated_at, ended_at, end_reason
"""

# --- set-up, inspection and clean-up (not timed) ------------------------------------------------

BULK_INSERT_RUNS = """
    INSERT INTO runs (run_id, thread_id, agent_id, owner_id, lease_expires_at)
    SELECT $1::text || '-' || n, 'thread-' || $1::text || '-' || n, $2, $3, now() + $4::interval
      FROM generate_series(1, $5::int) AS n
"""

# in forward order: run by run, decision by decision
BULK_INSERT_DECISIONS = """
    INSERT INTO decisions (run_id, thread_id, agent_id, decision_id, target_id, action, result,
                           decision_updated_at)
    SELECT run_id, thread_id, agent_id, 'd' || k, 'call-' || k, 'resume',
           jsonb_build_object('ok', true, 'index', k), k
      FROM runs, generate_series(1, $2::int) AS k
     WHERE owner_id = $1 AND status = 'active'
     ORDER BY run_id, k
"""

# seconds until the last lease of the owner's active runs ends
LEASE_LEFT = """
    SELECT extract(epoch FROM max(lease_expires_at) - clock_timestamp())::float8
      FROM runs WHERE owner_id = $1 AND status = 'active'
"""

UNACKED_OF_OWNERS = """
    SELECT count(*) FROM decisions
     WHERE status <> 'acked'
       AND run_id IN (SELECT run_id FROM runs WHERE owner_id = ANY($1::text[]))
"""

# sessions ever opened on this database (PostgreSQL 14 and later)
SESSIONS_OPENED = """
    SELECT CASE WHEN current_setting('server_version_num')::int >= 140000
                THEN (SELECT sessions FROM pg_stat_database WHERE datname = current_database())
           END
"""

COMPLETE_OWNED = """
    UPDATE runs
       SET status = 'completed', end_reason = 'removed', ended_at = now(), updated_at = now(),
           lease_expires_at = NULL
     WHERE owner_id = ANY($1::text[]) AND status = 'active'
"""


# --- figures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timings:
    """Measured durations of one operation, in microseconds."""

    values: list[float]

    @classmethod
    def from_ns(cls, values: Sequence[int]) -> Timings:
        return cls([value / 1000 for value in values])

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile: the smallest value with ``fraction`` of values at or below."""
        ordered = sorted(self.values)
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[rank - 1]


@dataclass(frozen=True)
class Row:
    """One line of the result table."""

    operation: str
    metric: str
    ours: float
    baseline: float
    goal: float | None = None
    rate: bool = False
    #: how many items one measured duration covers (for the rate)
    items: int = 1
    #: show the figures in milliseconds instead of microseconds
    millis: bool = False
    #: what the baseline is, when it is not a raw asyncpg figure
    baseline_note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline

    def cells(self) -> list[str]:
        def figure(value: float) -> str:
            text = f"{value / 1000:,.1f} ms" if self.millis else f"{value:,.1f} µs"
            return f"{text} ({self.items * 1e6 / value:,.0f}/s)" if self.rate else text

        if self.goal is None:
            goal = "-"
        else:
            goal = f"<= {self.goal:g}x " + ("met" if self.ratio <= self.goal else "MISSED")
        return [
            self.operation,
            self.metric,
            figure(self.ours),
            f"{figure(self.baseline)} {self.baseline_note}".rstrip(),
            f"{self.ratio:.2f}x",
            goal,
        ]


def print_table(rows: Sequence[Row]) -> None:
    header = ["operation", "metric", "ours", "baseline (raw asyncpg unless noted)", "ratio", "goal"]
    lines = [header, *(row.cells() for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    for index, line in enumerate(lines):
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print(" | ".join(cells).rstrip())
        if index == 0:
            print("-+-".join("-" * width for width in widths))


# --- the child process --------------------------------------------------------------------------


async def serve(reader: asyncio.StreamReader, consumer: Coroutine[Any, Any, None]) -> None:
    """Say ``ready`` and run ``consumer`` until the parent closes our stdin.

    A failing consumer ends this process at once (the task group cancels the wait), so the
    parent sees our stdout close instead of waiting for a line that will never come.
    """
    async with asyncio.TaskGroup() as group:
        consuming = group.create_task(consumer)
        say("ready")
        await reader.read()
        consuming.cancel()


async def commands(reader: asyncio.StreamReader) -> AsyncIterator[list[str]]:
    """The parent's command lines, split into words, until it closes our stdin."""
    while line := await reader.readline():
        yield line.decode().split()


@contextlib.asynccontextmanager
async def raw_listener(url: str) -> AsyncIterator[asyncio.Queue[tuple[int, str]]]:
    """A raw asyncpg LISTEN whose callback only stamps the payload and queues it."""
    received: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    def on_notification(_connection: object, _pid: int, _channel: str, payload: object) -> None:
        received.put_nowait((time.monotonic_ns(), str(payload)))

    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.add_listener(RAW_CHANNEL, on_notification)
        yield received
    finally:
        await connection.close()


async def child_forward_ours(url: str, run_id: str, reader: asyncio.StreamReader) -> None:
    async def consume() -> None:
        async for delivery in inbox:
            received = time.monotonic_ns()
            await inbox.ack(delivery)
            say("got", received, delivery.decision.decision_id)

    async with await RunRegistry.connect(url, worker_id="bench-child") as registry:
        handle = await registry.handle_by_run_id(run_id)
        if handle is None:
            raise RuntimeError(f"run {run_id} is not active")
        async with handle.decisions() as inbox:
            await serve(reader, consume())


async def child_forward_raw(url: str, run_id: str, reader: asyncio.StreamReader) -> None:
    async def consume() -> None:
        while True:
            received, payload = await notifications.get()
            message = json.loads(payload)
            if message == {"kind": "decision", "id": run_id}:
                say("got", received, "-")

    async with raw_listener(url) as notifications:
        await serve(reader, consume())


async def child_forward_raw_claim(url: str, run_id: str, reader: asyncio.StreamReader) -> None:
    async def consume() -> None:
        after = 0
        while True:
            _, payload = await notifications.get()
            if json.loads(payload) != {"kind": "decision", "id": run_id}:
                continue
            rows = await connection.fetch(RAW_CLAIM, run_id, after, 100)
            received = time.monotonic_ns()
            for row in sorted(rows, key=lambda row: row["id"]):
                after = row["id"]
                await connection.execute(RAW_ACK, row["id"], run_id)
                say("got", received, row["decision_id"])

    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with raw_listener(url) as notifications:
            await serve(reader, consume())
    finally:
        await connection.close()


async def child_cancel_ours(url: str, reader: asyncio.StreamReader) -> None:
    waiters: set[asyncio.Task[None]] = set()

    async def wait(token: RunCancellationToken) -> None:
        await token.wait()
        say("fired", token.run_id, time.monotonic_ns())

    async with (
        await RunRegistry.connect(url, worker_id="bench-child") as registry,
        asyncio.TaskGroup() as group,
    ):
        say("ready")
        async for words in commands(reader):
            run_id = words[1]
            handle = await registry.handle_by_run_id(run_id)
            if handle is None:
                raise RuntimeError(f"run {run_id} is not active")
            waiter = group.create_task(wait(handle.cancellation_token()))
            waiters.add(waiter)
            waiter.add_done_callback(waiters.discard)
            say("watching", run_id)
        for waiter in list(waiters):
            waiter.cancel()


async def child_cancel_raw(url: str, reader: asyncio.StreamReader) -> None:
    watched: set[str] = set()

    async def consume() -> None:
        while True:
            received, payload = await notifications.get()
            message = json.loads(payload)
            if message.get("kind") == "cancel" and message.get("id") in watched:
                watched.discard(message["id"])
                say("fired", message["id"], received)

    async with raw_listener(url) as notifications, asyncio.TaskGroup() as group:
        consuming = group.create_task(consume())
        say("ready")
        async for words in commands(reader):
            watched.add(words[1])
            say("watching", words[1])
        consuming.cancel()


async def child_worker(url: str, worker_id: str, reader: asyncio.StreamReader) -> None:
    """Register ``DEATH_RUNS`` runs under a short lease, say ``ready``, and wait to be killed."""
    settings = RegistrySettings(lease_seconds=DEATH_LEASE, heartbeat_interval=DEATH_HEARTBEAT)
    async with await RunRegistry.connect(url, worker_id=worker_id, settings=settings) as registry:
        for index in range(DEATH_RUNS):
            run_id = f"{worker_id}-{index}"
            await registry.register(run_id, AGENT_ID, f"thread-{run_id}")
        # let a heartbeat renew them all at once after the last register: the steady state
        await asyncio.sleep(1.5 * DEATH_HEARTBEAT)
        say("ready")
        await reader.read()


async def child_main(mode: str, url: str, run_id: str | None) -> None:
    reader = await stdin_reader()
    if mode == "forward-ours" and run_id is not None:
        await child_forward_ours(url, run_id, reader)
    elif mode == "forward-raw" and run_id is not None:
        await child_forward_raw(url, run_id, reader)
    elif mode == "forward-raw-claim" and run_id is not None:
        await child_forward_raw_claim(url, run_id, reader)
    elif mode == "cancel-ours":
        await child_cancel_ours(url, reader)
    elif mode == "cancel-raw":
        await child_cancel_raw(url, reader)
    elif mode == "worker" and run_id is not None:
        # for a worker, the "run id" is its worker id, which prefixes the ids of its runs
        await child_worker(url, run_id, reader)
    else:
        raise SystemExit(f"bad child mode {mode!r} (run id {run_id!r})")


def start_child(mode: str, url: str, run_id: str | None = None) -> Awaitable[Child]:
    """Start this script as a child in ``mode`` (the URL travels in its environment)."""
    arguments = ["--child", mode] + (["--run-id", run_id] if run_id else [])
    return Child.start(__file__, arguments, {"REGISTRY_DATABASE_URL": url})


@contextlib.asynccontextmanager
async def child_process(mode: str, url: str, run_id: str | None = None) -> AsyncIterator[Child]:
    child = await start_child(mode, url, run_id)
    try:
        yield child
    except BaseException:
        await child.kill()
        raise
    await child.close()


# --- the measurements ---------------------------------------------------------------------------


#: one timed call of one variant: given the iteration index, return nanoseconds


@dataclass(frozen=True)
class DeathRound:
    """One worker killed and its runs adopted: nanoseconds from the kill."""

    first: int
    last: int
    #: the lease its runs had left at the kill: when the last could be adopted at the earliest
    lease_left: int


@dataclass(frozen=True)
class Drain:
    """All the inboxes of one variant drained: total nanoseconds and decisions acked."""

    elapsed: int
    decisions: int
    #: server sessions opened meanwhile (``None`` before PostgreSQL 14)
    sessions: int | None = None


async def run_concurrently(jobs: Sequence[Callable[[], Awaitable[int]]], limit: int) -> Drain:
    """Run ``jobs`` with at most ``limit`` in flight; return the time and the sum of results."""
    pending = iter(jobs)
    total = 0

    async def worker() -> None:
        nonlocal total
        for job in pending:
            done = await job()  # not `total += await ...`: that reads total before awaiting
            total += done

    start = time.perf_counter_ns()
    async with asyncio.timeout(CHILD_TIMEOUT), asyncio.TaskGroup() as group:
        for _ in range(min(limit, len(jobs))):
            group.create_task(worker())
    return Drain(time.perf_counter_ns() - start, total)


def lookup_probes(
    registry: RunRegistry, pool: asyncpg.Pool, threads: Sequence[str]
) -> dict[str, Probe]:
    """``handle_by_thread`` and its raw SELECT, over ``threads`` in turn (each has an active
    run)."""

    async def ours(index: int) -> int:
        thread_id = threads[index % len(threads)]
        start = time.perf_counter_ns()
        handle = await registry.handle_by_thread(thread_id)
        elapsed = time.perf_counter_ns() - start
        assert handle is not None
        return elapsed

    async def raw(index: int) -> int:
        thread_id = threads[index % len(threads)]
        start = time.perf_counter_ns()
        row = await pool.fetchrow(RAW_ACTIVE_BY_THREAD, thread_id)
        elapsed = time.perf_counter_ns() - start
        assert row is not None
        return elapsed

    return {"ours": ours, "raw": raw}


@dataclass
class Bench:
    """What every measurement needs: the database, our registry, a raw pool, a unique tag."""

    url: str
    registry: RunRegistry
    pool: asyncpg.Pool
    iterations: int
    warmup: int
    tag: str

    def ids(self, kind: str, index: int) -> tuple[str, str]:
        """A fresh (run id, thread id) pair."""
        return f"{kind}-{self.tag}-{index}", f"thread-{kind}-{self.tag}-{index}"

    async def interleave(
        self, probes: dict[str, Probe], *, iterations: int | None = None, warmup: int | None = None
    ) -> dict[str, Timings]:
        """Run every probe once per iteration, rotating which goes first; drop the warm-up.

        Interleaving call by call makes drift and noisy neighbours hit every variant alike.
        """
        iterations = self.iterations if iterations is None else iterations
        warmup = self.warmup if warmup is None else warmup
        samples = await interleave(probes, iterations, warmup)
        return {name: Timings.from_ns(values) for name, values in samples.items()}

    async def register_remove(self) -> dict[str, Timings]:
        async def ours(index: int) -> int:
            run_id, thread_id = self.ids("pair-ours", index)
            start = time.perf_counter_ns()
            await self.registry.register(run_id, AGENT_ID, thread_id)
            removed = await self.registry.remove_by_run_id(run_id)
            elapsed = time.perf_counter_ns() - start
            assert removed
            return elapsed

        async def raw(index: int) -> int:
            run_id, thread_id = self.ids("pair-raw", index)
            start = time.perf_counter_ns()
            await self.pool.fetchrow(RAW_INSERT_RUN, run_id, thread_id, AGENT_ID, WORKER_ID, LEASE)
            status = await self.pool.execute(RAW_COMPLETE_RUN, run_id)
            elapsed = time.perf_counter_ns() - start
            assert status == "UPDATE 1"
            return elapsed

        return await self.interleave({"ours": ours, "raw": raw})

    async def lookup(self) -> dict[str, Timings]:
        threads = []
        for index in range(LOOKUP_THREADS):
            run_id, thread_id = self.ids("lookup", index)
            await self.registry.register(run_id, AGENT_ID, thread_id)
            threads.append(thread_id)

        timings = await self.interleave(lookup_probes(self.registry, self.pool, threads))
        for index in range(LOOKUP_THREADS):
            await self.registry.remove_by_run_id(self.ids("lookup", index)[0])
        return timings

    async def connection_paths(self) -> tuple[dict[str, Timings], dict[str, float]]:
        """The registry's connection lane against asyncpg's own pool (reset disabled, so it
        pays only for its own bookkeeping): one lookup, one lookup in BEGIN/COMMIT, and
        ``PATH_CALLERS`` concurrent callers sharing ``PATH_SIZE`` connections."""
        lane = ConnectionLane(asyncpg_dsn(self.url), PATH_SIZE)
        pool = await raw_pool(self.url, min_size=PATH_SIZE, max_size=PATH_SIZE)
        thread_id = self.ids("path", 0)[1]
        try:

            async def lane_statement(transaction: bool) -> None:
                borrow = lane.transaction() if transaction else lane.autocommit()
                async with borrow as connection:
                    await connection.fetchrow(RAW_ACTIVE_BY_THREAD, thread_id)

            async def pool_statement(transaction: bool) -> None:
                async with pool.acquire() as connection:
                    if transaction:
                        async with connection.transaction():
                            await connection.fetchrow(RAW_ACTIVE_BY_THREAD, thread_id)
                    else:
                        await connection.fetchrow(RAW_ACTIVE_BY_THREAD, thread_id)

            def timed(statement: Callable[[bool], Awaitable[None]], transaction: bool) -> Probe:
                async def probe(_index: int) -> int:
                    start = time.perf_counter_ns()
                    await statement(transaction)
                    return time.perf_counter_ns() - start

                return probe

            timings = await self.interleave(
                {
                    "lane": timed(lane_statement, False),
                    "pool": timed(pool_statement, False),
                    "lane-tx": timed(lane_statement, True),
                    "pool-tx": timed(pool_statement, True),
                }
            )

            async def crowd(statement: Callable[[bool], Awaitable[None]]) -> float:
                async def caller() -> None:
                    for _ in range(PATH_CALLS):
                        await statement(False)

                start = time.perf_counter_ns()
                await asyncio.gather(*(caller() for _ in range(PATH_CALLERS)))
                return (time.perf_counter_ns() - start) / 1000 / (PATH_CALLERS * PATH_CALLS)

            per_call: dict[str, list[float]] = {"lane": [], "pool": []}
            for round_index in range(PATH_ROUNDS):
                order = ["lane", "pool"] if round_index % 2 == 0 else ["pool", "lane"]
                for name in order:
                    per_call[name].append(
                        await crowd(lane_statement if name == "lane" else pool_statement)
                    )
            crowded = {name: statistics.median(values) for name, values in per_call.items()}
            return timings, crowded
        finally:
            await lane.close()
            await pool.close()

    async def forward(self) -> dict[str, Timings]:
        """Forward one decision at a time to a child; all three children run side by side."""
        ours_run, ours_thread = self.ids("forward-ours", 0)
        await self.registry.register(ours_run, AGENT_ID, ours_thread)
        raw_runs: dict[str, tuple[str, str]] = {}
        for mode in ("forward-raw", "forward-raw-claim"):
            raw_runs[mode] = run_id, thread_id = self.ids(mode, 0)
            await self.pool.fetchrow(RAW_INSERT_RUN, run_id, thread_id, AGENT_ID, WORKER_ID, LEASE)

        async with contextlib.AsyncExitStack() as stack:
            children = {
                mode: await stack.enter_async_context(child_process(mode, self.url, run_id))
                for mode, run_id in [("forward-ours", ours_run)]
                + [(mode, run_id) for mode, (run_id, _) in raw_runs.items()]
            }

            async def ours(index: int) -> int:
                decision = ToolCallDecision.resume(
                    f"call-{index}", {"ok": True, "index": index}, index, decision_id=f"d{index}"
                )
                start = time.monotonic_ns()
                forwarded = await self.registry.forward_decisions_by_run_id(ours_run, [decision])
                received, decision_id = await children["forward-ours"].expect("got")
                assert forwarded is not None
                assert decision_id == decision.decision_id, (decision_id, decision.decision_id)
                return int(received) - start

            def raw(mode: str) -> Probe:
                run_id, thread_id = raw_runs[mode]

                async def probe(index: int) -> int:
                    start = time.monotonic_ns()
                    await self.pool.execute(
                        RAW_FORWARD,
                        run_id,
                        thread_id,
                        AGENT_ID,
                        f"d{index}",
                        f"call-{index}",
                        json.dumps({"ok": True, "index": index}),
                        index,
                        RAW_CHANNEL,
                    )
                    received, decision_id = await children[mode].expect("got")
                    assert decision_id in ("-", f"d{index}"), (decision_id, index)
                    return int(received) - start

                return probe

            timings = await self.interleave(
                {
                    "ours": ours,
                    "raw": raw("forward-raw"),
                    "raw-claim": raw("forward-raw-claim"),
                }
            )
        await self.registry.remove_by_run_id(ours_run)
        for run_id, _ in raw_runs.values():
            await self.pool.execute(RAW_COMPLETE_RUN, run_id)
        return timings

    async def cancel(self) -> dict[str, Timings]:
        """Cancel a fresh run each iteration, watched by a child; both children side by side."""
        async with (
            child_process("cancel-ours", self.url) as ours_child,
            child_process("cancel-raw", self.url) as raw_child,
        ):

            async def ours(index: int) -> int:
                run_id, thread_id = self.ids("cancel-ours", index)
                await self.registry.register(run_id, AGENT_ID, thread_id)
                await ours_child.send("watch", run_id)
                await ours_child.expect("watching")
                start = time.monotonic_ns()
                cancelled = await self.registry.cancel_active_run_by_id(run_id)
                fired_run_id, received = await ours_child.expect("fired")
                assert cancelled
                assert fired_run_id == run_id, (fired_run_id, run_id)
                await self.registry.remove_by_run_id(run_id)
                return int(received) - start

            async def raw(index: int) -> int:
                run_id, thread_id = self.ids("cancel-raw", index)
                await self.pool.fetchrow(
                    RAW_INSERT_RUN, run_id, thread_id, AGENT_ID, WORKER_ID, LEASE
                )
                await raw_child.send("watch", run_id)
                await raw_child.expect("watching")
                start = time.monotonic_ns()
                await self.pool.execute(RAW_CANCEL, run_id, RAW_CHANNEL)
                fired_run_id, received = await raw_child.expect("fired")
                assert fired_run_id == run_id, (fired_run_id, run_id)
                await self.pool.execute(RAW_COMPLETE_RUN, run_id)
                return int(received) - start

            return await self.interleave({"ours": ours, "raw": raw})

    async def death_to_adoption(self) -> list[DeathRound]:
        """Kill a worker process holding runs; time until an adopter here holds all of them."""
        adopter_id = f"bench-adopter-{self.tag}"
        rounds = []
        async with await RunRegistry.connect(self.url, worker_id=adopter_id) as adopter:
            for round_index in range(DEATH_ROUNDS):
                worker_id = f"bench-worker-{self.tag}-{round_index}"
                expected = {f"{worker_id}-{index}" for index in range(DEATH_RUNS)}
                child = await start_child("worker", self.url, worker_id)
                try:
                    # at a random point of the worker's heartbeat cycle, as a crash would be
                    await asyncio.sleep(random.uniform(0, DEATH_HEARTBEAT))
                finally:
                    killed = time.monotonic_ns()
                    await child.kill()  # SIGKILL, and reaped: nothing of the worker runs now
                # when the worker's leases end, on our clock: a renewal it sent just before the
                # kill may still land, so this is read again after every empty adoption
                left = await self.pool.fetchval(LEASE_LEFT, worker_id)
                if left is None:
                    raise RuntimeError(f"worker {worker_id} left no active runs")
                deadline = time.monotonic_ns() + round(left * 1e9)
                adopted: set[str] = set()
                first = last = 0
                while adopted != expected:
                    handles = await adopter.adopt_orphaned_runs(limit=ADOPT_LIMIT)
                    now = time.monotonic_ns()
                    if not adopted and not handles:
                        left = await self.pool.fetchval(LEASE_LEFT, worker_id)
                        if left is not None:
                            deadline = max(deadline, time.monotonic_ns() + round(left * 1e9))
                    if handles:
                        first = first or now - killed
                        last = now - killed
                        adopted.update(handle.run_id for handle in handles)
                        if not adopted <= expected:
                            raise RuntimeError(f"adopted others' runs: {adopted - expected}")
                    if now - killed > (DEATH_LEASE + CHILD_TIMEOUT) * 1e9:
                        raise RuntimeError(f"adopted {len(adopted)} of {DEATH_RUNS} runs")
                    if len(handles) < ADOPT_LIMIT:
                        await asyncio.sleep(ADOPT_POLL)
                rounds.append(DeathRound(first, last, deadline - killed))
                await self.pool.execute(COMPLETE_OWNED, [adopter_id])
        return rounds

    async def resume(self) -> tuple[dict[str, Timings], dict[str, Drain]]:
        """Resume a worker's runs with pending decisions, then drain every inbox."""
        owners = {name: f"bench-resume-{name}-{self.tag}" for name in ("ours", "raw")}
        for name, owner in owners.items():
            await self.pool.execute(
                BULK_INSERT_RUNS, f"resume-{name}-{self.tag}", AGENT_ID, owner, LEASE, RESUME_RUNS
            )
            await self.pool.execute(BULK_INSERT_DECISIONS, owner, RESUME_DECISIONS)
        # fresh statistics, as a long-lived table would have: both variants get the same plans
        await self.pool.execute("ANALYZE runs, decisions")

        registry = await RunRegistry.connect(self.url, worker_id=owners["ours"])
        try:
            lease = timedelta(seconds=registry.settings.lease_seconds)
            # as many connections as the registry's engine may open: pool_size + max_overflow
            capacity = 2 * registry.settings.pool_size
            pool = await raw_pool(self.url, min_size=1, max_size=capacity)
            try:
                resumed: list[RunHandle] = []
                raw_rows: list[asyncpg.Record] = []

                async def ours_resume(_index: int) -> int:
                    start = time.perf_counter_ns()
                    handles = await registry.resume_owned_runs()
                    elapsed = time.perf_counter_ns() - start
                    assert len(handles) == RESUME_RUNS, len(handles)
                    resumed[:] = handles
                    return elapsed

                async def raw_resume(_index: int) -> int:
                    start = time.perf_counter_ns()
                    rows = await pool.fetch(RAW_RESUME, owners["raw"], lease)
                    elapsed = time.perf_counter_ns() - start
                    assert len(rows) == RESUME_RUNS, len(rows)
                    raw_rows[:] = rows
                    return elapsed

                timings = await self.interleave(
                    {"ours": ours_resume, "raw": raw_resume}, iterations=RESUME_ROUNDS, warmup=1
                )

                async def drain_ours(handle: RunHandle) -> int:
                    received = 0
                    async with handle.decisions() as inbox:
                        async for delivery in inbox:
                            acked = await inbox.ack(delivery)
                            assert acked, delivery
                            assert delivery.attempts == 1, delivery
                            received += 1
                            if received == RESUME_DECISIONS:
                                break
                    return received

                async def drain_raw(run_id: str) -> int:
                    rows = await pool.fetch(RAW_CLAIM, run_id, 0, registry.settings.inbox_batch)
                    for row in sorted(rows, key=lambda row: row["id"]):
                        assert row["attempts"] == 1, row
                        status = await pool.execute(RAW_ACK, row["id"], run_id)
                        assert status == "UPDATE 1", status
                    return len(rows)

                # both pools warmed by as many concurrent lookups as they may hold connections
                # (the registry's engine keeps pool_size of them), then the drain in halves
                # ordered ours, raw, raw, ours
                await asyncio.gather(
                    *(registry.handle_by_run_id(resumed[0].run_id) for _ in range(capacity)),
                    *(pool.fetchrow(RAW_ACTIVE_BY_THREAD, "-") for _ in range(capacity)),
                )
                half = RESUME_RUNS // 2
                jobs: dict[str, list[list[Callable[[], Awaitable[int]]]]] = {
                    "ours": [
                        [functools.partial(drain_ours, handle) for handle in part]
                        for part in (resumed[:half], resumed[half:])
                    ],
                    "raw": [
                        [functools.partial(drain_raw, row["run_id"]) for row in part]
                        for part in (raw_rows[:half], raw_rows[half:])
                    ],
                }
                elapsed = dict.fromkeys(jobs, 0)
                drained = dict.fromkeys(jobs, 0)
                sessions: dict[str, int | None] = dict.fromkeys(jobs, 0)
                for name, part in (("ours", 0), ("raw", 0), ("raw", 1), ("ours", 1)):
                    gc.collect()
                    opened = await self.pool.fetchval(SESSIONS_OPENED)
                    drain = await run_concurrently(jobs[name][part], DRAIN_CONCURRENCY)
                    elapsed[name] += drain.elapsed
                    drained[name] += drain.decisions
                    now_opened = await self.pool.fetchval(SESSIONS_OPENED)
                    counted = sessions[name]
                    if counted is None or opened is None or now_opened is None:
                        sessions[name] = None
                    else:
                        sessions[name] = counted + now_opened - opened
            finally:
                await pool.close()
        finally:
            await registry.close()
        expected = RESUME_RUNS * RESUME_DECISIONS
        assert drained == {"ours": expected, "raw": expected}, drained
        unacked = await self.pool.fetchval(UNACKED_OF_OWNERS, list(owners.values()))
        assert unacked == 0, unacked
        await self.pool.execute(COMPLETE_OWNED, list(owners.values()))
        return timings, {name: Drain(elapsed[name], drained[name], sessions[name]) for name in jobs}


def latency_rows(name: str, ours: Timings, baseline: Timings, goal: float | None) -> list[Row]:
    return [
        Row(name, "p50", ours.percentile(0.5), baseline.percentile(0.5), goal),
        Row(name, "p99", ours.percentile(0.99), baseline.percentile(0.99)),
    ]


def death_rows(rounds: Sequence[DeathRound]) -> tuple[list[Row], str]:
    """Rows for death to adoption, and a line with every round's figures."""
    name = f"death -> adoption, {DEATH_RUNS} runs (**)"
    lease = DEATH_LEASE * 1e6
    first = Timings.from_ns([one.first for one in rounds])
    last = Timings.from_ns([one.last for one in rounds])
    median = sorted(rounds, key=lambda one: one.last)[(len(rounds) - 1) // 2]
    of = f"of {len(rounds)}"
    rows = [
        Row(name, f"first, median {of}", first.percentile(0.5), lease, millis=True),
        Row(name, f"last, median {of}", last.percentile(0.5), lease, millis=True),
        Row(name, f"last, worst {of}", max(last.values), lease, millis=True),
    ]
    rows = [dataclasses.replace(row, baseline_note="(the lease)") for row in rows]
    rows.append(
        Row(
            "  same, vs lease left at kill (**)",
            "last, median round",
            median.last / 1000,
            median.lease_left / 1000,
            millis=True,
            baseline_note="(lease left)",
        )
    )
    detail = ", ".join(
        f"{one.first / 1e6:.0f}/{one.last / 1e6:.0f}/{one.lease_left / 1e6:.0f}" for one in rounds
    )
    return rows, detail


async def measure(url: str, iterations: int) -> tuple[list[Row], list[str]]:
    warmup = max(20, iterations // 10)
    registry = await RunRegistry.connect(url, worker_id=WORKER_ID)
    try:
        pool = await raw_pool(url, min_size=1, max_size=10)
        try:
            bench = Bench(url, registry, pool, iterations, warmup, secrets.token_hex(4))
            print(f"measuring {iterations} iterations per operation after {warmup} warm-up ...")
            rows: list[Row] = []

            gc.collect()
            pair = await bench.register_remove()
            rows.append(
                Row("register + remove", "mean", pair["ours"].mean, pair["raw"].mean, rate=True)
            )

            gc.collect()
            lookup = await bench.lookup()
            rows += latency_rows("handle_by_thread", lookup["ours"], lookup["raw"], 1.5)
            rows.append(
                Row("handle_by_thread", "mean", lookup["ours"].mean, lookup["raw"].mean, 1.5)
            )

            gc.collect()
            paths, crowded = await bench.connection_paths()
            pool_note = "(asyncpg Pool)"
            rows += [
                dataclasses.replace(row, baseline_note=pool_note)
                for row in latency_rows(
                    "connection lane, 1 lookup", paths["lane"], paths["pool"], None
                )
                + latency_rows(
                    "connection lane, lookup in BEGIN/COMMIT",
                    paths["lane-tx"],
                    paths["pool-tx"],
                    None,
                )
            ]
            rows.append(
                Row(
                    f"connection lane, {PATH_CALLERS} callers, {PATH_SIZE} connections",
                    f"per call, median of {PATH_ROUNDS}",
                    crowded["lane"],
                    crowded["pool"],
                    rate=True,
                    baseline_note=pool_note,
                )
            )

            gc.collect()
            forward = await bench.forward()
            rows += latency_rows(
                "forward -> inbox, 2 processes", forward["ours"], forward["raw"], 2
            )
            rows += latency_rows(
                "  same, vs raw LISTEN + claim (*)", forward["ours"], forward["raw-claim"], None
            )

            gc.collect()
            cancel = await bench.cancel()
            rows += latency_rows(
                "cancel -> token, 2 processes", cancel["ours"], cancel["raw"], None
            )

            gc.collect()
            death, detail = death_rows(await bench.death_to_adoption())
            rows += death

            gc.collect()
            resume, drain = await bench.resume()
            rows.append(
                Row(
                    f"resume_owned_runs, {RESUME_RUNS:,} runs (***)",
                    f"p50 of {RESUME_ROUNDS}",
                    resume["ours"].percentile(0.5),
                    resume["raw"].percentile(0.5),
                    rate=True,
                    items=RESUME_RUNS,
                    millis=True,
                )
            )
            rows.append(
                Row(
                    f"drain {RESUME_RUNS:,} inboxes x {RESUME_DECISIONS} (***)",
                    f"total, {DRAIN_CONCURRENCY} at once",
                    drain["ours"].elapsed / 1000,
                    drain["raw"].elapsed / 1000,
                    rate=True,
                    items=drain["ours"].decisions,
                    millis=True,
                )
            )
            notes = [
                "(**) kill -> first / last adoption / lease left at the kill, ms, each round: "
                + detail,
                "(***) server sessions opened during the drain (pg_stat_database.sessions): "
                + ", ".join(
                    f"{name} {'n/a' if one.sessions is None else f'{one.sessions:,}'}"
                    for name, one in drain.items()
                ),
            ]
            return rows, notes
        finally:
            await pool.close()
    finally:
        await registry.close()


# --- the parent process -------------------------------------------------------------------------


async def describe_server(url: str) -> str:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        version = connection.get_settings().server_version
    finally:
        await connection.close()
    return f"PostgreSQL {version}"


async def run_benchmark(
    server_url: str, where: str, iterations: int, summary: str | None = None
) -> None:
    async with benchmark_database(server_url) as database:
        url, name, version_num = database.url, database.name, database.version_num
        print(f"server:   {await describe_server(url)} (server_version_num {version_num})")
        print(f"          {where}, database {name}")
        print(
            f"client:   Python {platform.python_version()}, asyncpg {asyncpg.__version__}, "
            f"SQLAlchemy {sqlalchemy.__version__}, {type(asyncio.get_running_loop()).__name__}"
            f", {os.cpu_count()} CPUs"
        )
        started = time.monotonic()
        load_before = os.getloadavg()[0]
        rows, notes = await measure(url, iterations)
        load_after = os.getloadavg()[0]
        print()
        print_table(rows)
        headlines = [row.cells() for row in rows if row.goal is not None]
        write_summary(
            summary,
            [
                Headline.from_cells("core", f"{name}, {metric}", *rest)
                for name, metric, *rest in headlines
            ],
        )
        print()
        print("ratio = ours / baseline (time; lower is better).")
        print(
            "(*) a second baseline: the raw LISTEN child also runs a minimal claim UPDATE "
            "and stamps when the\n    decision's row is in hand, then acks it: the floor of "
            "the inbox's design (notify, then claim)."
        )
        print(
            f"(**) a worker process registers {DEATH_RUNS} runs (lease {DEATH_LEASE:g} s, "
            f"renewed every {DEATH_HEARTBEAT:g} s) and is SIGKILLed;\n"
            f"    an adopter calls adopt_orphaned_runs(limit={ADOPT_LIMIT}) back to back "
            f"while a call fills its limit, else\n"
            f"    every {ADOPT_POLL * 1000:g} ms. Baseline: the lease, the promised bound; "
            "the exact floor is the lease left at\n"
            "    the kill (up to one heartbeat less), the baseline of the row below it."
        )
        print(
            f"(***) {RESUME_RUNS:,} runs of one worker id with {RESUME_DECISIONS} pending "
            "decisions each, bulk-inserted with raw SQL; ours\n"
            f"    and the baseline on separate sets. Resume: p50 of {RESUME_ROUNDS} calls "
            "after 1 warm-up, vs one raw\n"
            "    UPDATE ... RETURNING. Drain: every resumed inbox opened and drained, each "
            "decision acked,\n"
            f"    {DRAIN_CONCURRENCY} runs at a time; baseline: per run one claim UPDATE ... "
            "RETURNING and one ack UPDATE per\n"
            "    decision, on a pool of as many connections as the registry's engine may "
            "open. Rates: runs per\n"
            "    second, decisions per second."
        )
        for note in notes:
            print(note)
        print(
            f"measured in {time.monotonic() - started:.1f} s; 1-minute load average "
            f"{load_before:.2f} before, {load_after:.2f} after"
        )


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the registry against raw asyncpg (see the module docstring)."
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("REGISTRY_DATABASE_URL"),
        help="PostgreSQL server to benchmark on; a fresh database is created there "
        "(default: $REGISTRY_DATABASE_URL, else an embedded PostgreSQL)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=DEFAULT_ITERATIONS,
        help=f"measured iterations per operation (default {DEFAULT_ITERATIONS})",
    )
    add_summary_option(parser)
    parser.add_argument("--child", choices=CHILD_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.iterations < 1:
        parser.error("--iterations must be at least 1")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.child:
        asyncio.run(child_main(arguments.child, arguments.database_url, arguments.run_id))
        return 0
    with benchmark_server(arguments.database_url) as (server_url, where):
        asyncio.run(run_benchmark(server_url, where, arguments.iterations, arguments.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
