"""Benchmark decision throughput end to end: forward, consume, ack, against PGQueuer.

Run it from the checkout, with the project and the ``bench`` extra installed
(``pip install -e '.[dev,bench]'``)::

    python bench/decisions.py [--database-url URL] [--quick] [--duration S]

The server is ``--database-url``, else ``$REGISTRY_DATABASE_URL``, else an embedded PostgreSQL
started in a temporary directory (and shut down at the end). The role must be allowed to create
databases: the benchmark creates a fresh ``registry_bench_<hex>`` database on that server,
migrates it, installs PGQueuer's schema in it, runs everything against it and drops it at the
end.

The shape (defaults; ``--quick`` is 10 s): 100 active runs owned by 4 consumer processes, 25
each, and 2 producer processes with 16 tasks each forwarding one decision per call, round robin
over all the runs, as fast as they can for ``--duration`` seconds after a warm-up (3 s, 2 s
with ``--quick``). Every process keeps ``--pool-size`` connections (8). Every decision carries
``time.time_ns()`` taken just before its forward; the consumer stamps ``time.time_ns()`` when
the decision is handed to it (all processes share the machine's clock).

* ours: each consumer process is one ``RunRegistry`` that registers its 25 runs and iterates
  each run's inbox (``async with handle.decisions() as inbox: async for delivery in inbox``) in
  a task of its own, acknowledging each delivery with ``await inbox.ack(delivery)`` as soon as
  it has it. Each producer process is one ``RunRegistry`` (``listen=False``) calling
  ``forward_decisions_by_run_id(run_id, [decision])`` with a unique ``decision_id``.
* PGQueuer, its documented API, in the same run with the same processes, tasks and pool size:
  each consumer process runs one ``QueueManager`` over ``Queries(AsyncpgPoolDriver(pool))``
  with one entrypoint per run it owns (a run's decisions go to the process that owns the run,
  as ours), a handler that records the job and returns (PGQueuer then acknowledges it: the
  job leaves the queue for its log, in batches), and ``run()`` with PGQueuer's defaults
  (``batch_size`` 10 unless ``--pgq-batch-size``). Each producer process calls
  ``Queries.enqueue(entrypoint, payload)`` with one job per call. PGQueuer promises no order
  within an entrypoint once jobs run concurrently; ours delivers each run's decisions in order.

Figures:

* decisions/s end to end: acknowledgements committed in the measured window, per second,
  counted by the server (ours: ``decisions.acked_at``; PGQueuer: ``successful`` rows of its log
  table by ``created``). Forwarded/s likewise (ours: ``received_at``; PGQueuer: ``queued`` log
  rows). The goal: ours at least 2x PGQueuer.
* forward/enqueue p50/p99: the call's duration in the producer, for calls started in the
  window; forward -> consumer p50/p99: the consumer's receipt stamp minus the decision's stamp,
  for decisions stamped in the window (as the producers outrun the consumers, a backlog grows
  and this includes its queueing).
* server CPU, WAL, checkpoints and the backends' wait events, as ``bench/fleet.py`` measures
  them (it shares those helpers with this script).

For diagnosis, ``--per-call N`` sends N decisions per forward call (``forward_decisions_by_run_id``
takes a list; PGQueuer: ``enqueue`` of N jobs in one call) for both; the default is 1, the
figure the goal is about. ``--pgq-shared-entrypoint`` gives PGQueuer one entrypoint for every
run (any consumer takes any job), its most common use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import platform
import secrets
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy
from _shared import (
    add_summary_option,
    benchmark_database,
    benchmark_server,
    say,
    stdin_reader,
    write_summary,
)
from fleet import (
    CHECKPOINTS,
    CHECKPOINTS_17,
    WAIT_SAMPLE,
    WAITS,
    WAL_BYTES,
    WAL_POSITION,
    FleetChild,
    Row,
    ServerProcesses,
    Window,
    child_groups,
    cpu_over,
    duration_text,
    headlines,
    percentile,
    print_table,
    rate_text,
    read_go,
    read_results,
    sleep_until,
    verdict,
    write_results,
)
from pgqueuer.db import AsyncpgDriver, AsyncpgPoolDriver
from pgqueuer.models import Job
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries

from registry import RegistrySettings, RunHandle, RunRegistry, ToolCallDecision
from registry.database import asyncpg_dsn

DEFAULT_RUNS = 100
DEFAULT_CONSUMERS = 4
DEFAULT_PRODUCERS = 2
DEFAULT_TASKS = 16
DEFAULT_POOL_SIZE = 8
DEFAULT_DURATION = 30.0
DEFAULT_WARMUP = 3.0
QUICK_DURATION = 10.0
QUICK_WARMUP = 2.0
#: PGQueuer's own default batch size of QueueManager.run
DEFAULT_PGQ_BATCH = 10
GO_DELAY = 1.0
GOAL_RATIO = 2.0
STAMP = struct.Struct("<q")
PGQUEUER_VERSION = importlib.metadata.version("pgqueuer")
AGENT_ID = "bench-agent"
VARIANTS = ("ours", "pgqueuer")
VARIANT_NAMES = {"ours": "ours", "pgqueuer": f"PGQueuer {PGQUEUER_VERSION}"}
CHILD_MODES = ("consumer", "producer")

# --- counting on the server (not timed) --------------------------------------------------------

OURS_COUNTS = """
    SELECT count(*) FILTER (WHERE acked_at >= $1 AND acked_at < $2) AS acked,
           count(*) FILTER (WHERE received_at >= $1 AND received_at < $2) AS forwarded,
           count(*) FILTER (WHERE status IN ('pending', 'delivered')) AS backlog,
           count(*) FILTER (WHERE attempts > 1) AS redelivered
      FROM decisions WHERE run_id LIKE $3
"""

PGQ_COUNTS = """
    SELECT count(*) FILTER (WHERE status = 'successful' AND created >= $1 AND created < $2)
               AS acked,
           count(*) FILTER (WHERE status = 'queued' AND created >= $1 AND created < $2)
               AS forwarded,
           (SELECT count(*) FROM pgqueuer) AS backlog,
           0 AS redelivered
      FROM pgqueuer_log
"""


def run_ids(tag: str, variant: str, runs: int) -> list[str]:
    """Every run id (PGQueuer: entrypoint) of a variant; consumer ``i`` owns every
    ``consumers``-th from ``i``."""
    return [f"decide-{tag}-{variant}-{number:04d}" for number in range(runs)]


# --- the child processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildConfig:
    """What a child needs to know, from its command line and environment."""

    mode: str
    variant: str
    index: int
    tag: str
    runs: int
    consumers: int
    tasks: int
    pool_size: int
    pgq_batch: int
    shared_entrypoint: bool
    per_call: int
    results: str
    url: str


class Recorder:
    """A process's figures: durations (producers) or latencies (consumers) in the window."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.values = array("q")
        self.total = 0
        self.in_window = 0
        self.errors: dict[str, int] = {}

    def received(self, stamp: int) -> None:
        received = time.time_ns()
        self.total += 1
        if self.window.measure <= stamp < self.window.end:
            self.values.append(received - stamp)
        if self.window.measure <= received < self.window.end:
            self.in_window += 1

    def failed(self, exc: Exception) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


async def consumer_main(config: ChildConfig, reader: asyncio.StreamReader) -> None:
    ids = run_ids(config.tag, config.variant, config.runs)
    mine = ids[config.index :: config.consumers]
    window = Window()
    recorder = Recorder(window)
    async with contextlib.AsyncExitStack() as stack:
        consume: Callable[[], Coroutine[Any, Any, None]]
        if config.variant == "ours":
            consume = await ours_consumer(config, mine, recorder, stack)
        else:
            consume = await pgqueuer_consumer(config, mine, recorder, stack)
        say("ready")
        go = await read_go(reader)
        window.start, window.measure, window.end = go.start, go.measure, go.end
        cpu = asyncio.create_task(cpu_over(window))
        consuming = asyncio.create_task(consume())
        await sleep_until(window.end)
        if consuming.done():
            consuming.result()  # it failed: say why
        consuming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consuming
        write_results(
            config.results,
            {"total": recorder.total, "in_window": recorder.in_window, "cpu": await cpu},
            recorder.values,
        )
        say("done")
        await reader.read()


async def ours_consumer(
    config: ChildConfig, mine: list[str], recorder: Recorder, stack: contextlib.AsyncExitStack
) -> Callable[[], Coroutine[Any, Any, None]]:
    settings = RegistrySettings(pool_size=config.pool_size)
    registry = await RunRegistry.connect(
        config.url, worker_id=f"decide-{config.tag}-consumer-{config.index}", settings=settings
    )
    stack.push_async_callback(registry.close)
    handles: list[RunHandle] = []
    for run_id in mine:
        handles.append(await registry.register(run_id, AGENT_ID, f"thread-{run_id}"))

    async def drain(handle: RunHandle) -> None:
        async with handle.decisions() as inbox:
            async for delivery in inbox:
                result = delivery.decision.result
                assert isinstance(result, dict)
                stamp = result["t"]
                assert isinstance(stamp, int)
                recorder.received(stamp)
                if not await inbox.ack(delivery):
                    raise RuntimeError(f"ack of {delivery.delivery_id} refused")

    async def consume() -> None:
        async with asyncio.TaskGroup() as group:
            for handle in handles:
                group.create_task(drain(handle))

    return consume


async def pgqueuer_consumer(
    config: ChildConfig, mine: list[str], recorder: Recorder, stack: contextlib.AsyncExitStack
) -> Callable[[], Coroutine[Any, Any, None]]:
    pool = await asyncpg.create_pool(
        asyncpg_dsn(config.url), min_size=config.pool_size, max_size=config.pool_size
    )
    stack.push_async_callback(pool.close)
    manager = QueueManager(Queries(AsyncpgPoolDriver(pool)))

    async def handle(job: Job) -> None:
        assert job.payload is not None
        (stamp,) = STAMP.unpack(job.payload)
        recorder.received(stamp)

    for entrypoint in [shared_entrypoint(config.tag)] if config.shared_entrypoint else mine:
        manager.entrypoint(entrypoint)(handle)

    async def consume() -> None:
        try:
            await manager.run(batch_size=config.pgq_batch)
        finally:
            manager.shutdown.set()

    return consume


def shared_entrypoint(tag: str) -> str:
    return f"decide-{tag}-all"


async def producer_main(config: ChildConfig, reader: asyncio.StreamReader) -> None:
    ids = run_ids(config.tag, config.variant, config.runs)
    async with contextlib.AsyncExitStack() as stack:
        send: Callable[[str, int, int], Awaitable[None]]
        if config.variant == "ours":
            send = await ours_producer(config, stack)
        else:
            send = await pgqueuer_producer(config, stack)
        say("ready")
        window = await read_go(reader)
        recorder = Recorder(window)
        cpu = asyncio.create_task(cpu_over(window))
        await sleep_until(window.start)

        async def produce(task: int) -> None:
            # every task walks all the runs in turn, from its own starting point
            number = (config.index * config.tasks + task) * 37
            sent = 0
            while True:
                stamp = time.time_ns()
                if stamp >= window.end:
                    return
                run_id = ids[number % len(ids)]
                number += 1
                sent += 1
                began = time.perf_counter_ns()
                try:
                    await send(run_id, stamp, sent * 1000 + task)
                except Exception as exc:  # counted and reported: the benchmark goes on
                    recorder.failed(exc)
                    await asyncio.sleep(0.01)
                    continue
                done = time.perf_counter_ns()
                recorder.total += 1
                if window.measure <= stamp < window.end:
                    recorder.values.append(done - began)
                    recorder.in_window += 1

        async with asyncio.TaskGroup() as group:
            for task in range(config.tasks):
                group.create_task(produce(task))
        write_results(
            config.results,
            {
                "total": recorder.total,
                "in_window": recorder.in_window,
                "errors": recorder.errors,
                "cpu": await cpu,
            },
            recorder.values,
        )
        say("done")
        await reader.read()


async def ours_producer(
    config: ChildConfig, stack: contextlib.AsyncExitStack
) -> Callable[[str, int, int], Awaitable[None]]:
    settings = RegistrySettings(pool_size=config.pool_size)
    registry = await RunRegistry.connect(
        config.url,
        worker_id=f"decide-{config.tag}-producer-{config.index}",
        settings=settings,
        listen=False,
    )
    stack.push_async_callback(registry.close)
    prefix = f"p{config.index}-"

    async def send(run_id: str, stamp: int, number: int) -> None:
        decisions = [
            ToolCallDecision(
                target_id=f"call-{number}-{one}",
                decision_id=f"{prefix}{number}-{one}",
                action="resume",
                result={"t": stamp},
                updated_at=stamp // 1_000_000,
            )
            for one in range(config.per_call)
        ]
        if await registry.forward_decisions_by_run_id(run_id, decisions) is None:
            raise RuntimeError(f"run {run_id} is not active")

    return send


async def pgqueuer_producer(
    config: ChildConfig, stack: contextlib.AsyncExitStack
) -> Callable[[str, int, int], Awaitable[None]]:
    pool = await asyncpg.create_pool(
        asyncpg_dsn(config.url), min_size=config.pool_size, max_size=config.pool_size
    )
    stack.push_async_callback(pool.close)
    queries = Queries(AsyncpgPoolDriver(pool))
    shared = shared_entrypoint(config.tag) if config.shared_entrypoint else None

    async def send(run_id: str, stamp: int, _number: int) -> None:
        if config.per_call == 1:
            await queries.enqueue(shared or run_id, STAMP.pack(stamp))
        else:
            count = config.per_call
            await queries.enqueue(
                [shared or run_id] * count, [STAMP.pack(stamp)] * count, [0] * count
            )

    return send


async def child_main(config: ChildConfig) -> None:
    reader = await stdin_reader()
    if config.mode == "consumer":
        await consumer_main(config, reader)
    else:
        await producer_main(config, reader)


# --- the parent process -------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The shape of the benchmark, from the command line."""

    runs: int
    consumers: int
    producers: int
    tasks: int
    pool_size: int
    duration: float
    warmup: float
    pgq_batch: int
    shared_entrypoint: bool
    per_call: int


@dataclass
class Outcome:
    """What one variant measured."""

    variant: str
    window: float
    acked: int = 0
    forwarded: int = 0
    backlog: int = 0
    redelivered: int = 0
    forward: list[int] = field(default_factory=list)
    latency: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    producer_cpu: float = 0.0
    consumer_cpu: float = 0.0
    server_cpu: float | None = None
    wal_bytes: float | None = None
    checkpoints: int | None = None
    waits: dict[str, int] = field(default_factory=dict)
    wait_samples: int = 0
    load: float = 0.0

    @property
    def rate(self) -> float:
        return self.acked / self.window


@contextlib.asynccontextmanager
async def processes(
    plan: Plan, variant: str, tag: str, url: str, results: Path
) -> AsyncIterator[tuple[list[FleetChild], list[FleetChild]]]:
    """The consumers, then (once their runs exist) the producers; killed on any failure."""

    def start(mode: str, index: int) -> Awaitable[FleetChild]:
        arguments = [
            "--child",
            mode,
            "--variant",
            variant,
            "--index",
            str(index),
            "--tag",
            tag,
            "--runs",
            str(plan.runs),
            "--consumers",
            str(plan.consumers),
            "--tasks",
            str(plan.tasks),
            "--pool-size",
            str(plan.pool_size),
            "--pgq-batch-size",
            str(plan.pgq_batch),
            "--results",
            str(results / f"{variant}-{mode}-{index}.json"),
        ]
        if plan.shared_entrypoint:
            arguments.append("--pgq-shared-entrypoint")
        arguments += ["--per-call", str(plan.per_call)]
        return FleetChild.start(__file__, arguments, {"REGISTRY_DATABASE_URL": url})

    async with child_groups(
        start, [("consumer", plan.consumers), ("producer", plan.producers)]
    ) as groups:
        consumers, producers = groups
        yield consumers, producers


@dataclass
class Bench:
    plan: Plan
    url: str
    connection: asyncpg.Connection
    sampler: asyncpg.Connection
    version_num: int
    server: ServerProcesses | None
    tag: str

    async def sample(self) -> tuple[float | None, str, int]:
        wal = str(await self.connection.fetchval(WAL_POSITION))
        query = CHECKPOINTS_17 if self.version_num >= 170000 else CHECKPOINTS
        checkpoints = int(await self.connection.fetchval(query))
        cpu = None if self.server is None else self.server.sample()[0]
        return cpu, wal, checkpoints

    async def sample_waits(self, outcome: Outcome, end: int) -> None:
        while time.time_ns() < end:
            for row in await self.sampler.fetch(WAITS):
                outcome.waits[row["what"]] = outcome.waits.get(row["what"], 0) + row["n"]
            outcome.wait_samples += 1
            await asyncio.sleep(WAIT_SAMPLE)

    async def variant(self, variant: str) -> Outcome:
        plan = self.plan
        print(
            f"{VARIANT_NAMES[variant]}: {plan.runs} runs on {plan.consumers} consumer processes, "
            f"{plan.producers} producer processes x {plan.tasks} tasks, {plan.warmup:g} s "
            f"warm-up + {plan.duration:g} s ...",
            flush=True,
        )
        outcome = Outcome(variant, plan.duration, load=os.getloadavg()[0])
        with tempfile.TemporaryDirectory(prefix="decisions") as directory:
            results = Path(directory)
            async with processes(plan, variant, self.tag, self.url, results) as (
                consumers,
                producers,
            ):
                start = time.time_ns() + int(GO_DELAY * 1e9)
                measure = start + int(plan.warmup * 1e9)
                end = measure + int(plan.duration * 1e9)
                for child in [*consumers, *producers]:
                    await child.send("go", str(start), str(measure), str(end))
                await sleep_until(measure)
                before = await self.sample()
                sampling = asyncio.create_task(self.sample_waits(outcome, end))
                await sleep_until(end)
                after = await self.sample()
                await sampling
                for child in [*producers, *consumers]:
                    await child.expect_within("done", 60.0)
            if before[0] is not None and after[0] is not None:
                outcome.server_cpu = after[0] - before[0]
            outcome.wal_bytes = await self.connection.fetchval(WAL_BYTES, after[1], before[1])
            outcome.checkpoints = after[2] - before[2]
            for index in range(plan.producers):
                figures, values = read_results(results / f"{variant}-producer-{index}.json")
                outcome.producer_cpu += figures["cpu"]
                for name, count in figures["errors"].items():
                    outcome.errors[name] = outcome.errors.get(name, 0) + count
                outcome.forward.extend(values)
            for index in range(plan.consumers):
                figures, values = read_results(results / f"{variant}-consumer-{index}.json")
                outcome.consumer_cpu += figures["cpu"]
                outcome.latency.extend(values)
        # counted by the server, by the commit's transaction time
        since = datetime.fromtimestamp(measure / 1e9, UTC)
        until = datetime.fromtimestamp(end / 1e9, UTC)
        if variant == "ours":
            row = await self.connection.fetchrow(
                OURS_COUNTS, since, until, f"decide-{self.tag}-ours-%"
            )
        else:
            row = await self.connection.fetchrow(PGQ_COUNTS, since, until)
        assert row is not None
        outcome.acked = int(row["acked"])
        outcome.forwarded = int(row["forwarded"])
        outcome.backlog = int(row["backlog"])
        outcome.redelivered = int(row["redelivered"])
        return outcome


def result_rows(outcomes: dict[str, Outcome]) -> list[Row]:
    names = list(outcomes)
    ours = outcomes["ours"]
    theirs = outcomes.get("pgqueuer")

    def each(figure: Callable[[Outcome], str]) -> list[str]:
        return [figure(outcomes[name]) for name in names]

    def ratio(figure: Callable[[Outcome], float | None]) -> str:
        if theirs is None:
            return "-"
        mine, other = figure(ours), figure(theirs)
        if mine is None or other is None or other == 0:
            return "-"
        return f"{mine / other:.2f}x"

    def latency(pick: Callable[[Outcome], list[int]], fraction: float) -> Callable[[Outcome], str]:
        def figure(one: Outcome) -> str:
            values = sorted(pick(one))
            return duration_text(percentile(values, fraction)) if values else "-"

        return figure

    def latency_value(
        pick: Callable[[Outcome], list[int]], fraction: float
    ) -> Callable[[Outcome], float | None]:
        def figure(one: Outcome) -> float | None:
            values = sorted(pick(one))
            return float(percentile(values, fraction)) if values else None

        return figure

    def forwards(one: Outcome) -> list[int]:
        return one.forward

    def latencies(one: Outcome) -> list[int]:
        return one.latency

    met = theirs is not None and ours.rate >= GOAL_RATIO * theirs.rate
    return [
        Row(
            "decisions/s end to end (acked)",
            each(lambda one: rate_text(one.rate)),
            ratio(lambda one: one.rate),
            verdict(f">= {GOAL_RATIO:g}x PGQueuer", met),
        ),
        Row(
            "forwarded (enqueued)/s",
            each(lambda one: rate_text(one.forwarded / one.window)),
            ratio(lambda one: one.forwarded / one.window),
        ),
        Row("forward p50", each(latency(forwards, 0.5)), ratio(latency_value(forwards, 0.5))),
        Row("forward p99", each(latency(forwards, 0.99)), ratio(latency_value(forwards, 0.99))),
        Row(
            "forward -> consumer p50",
            each(latency(latencies, 0.5)),
            ratio(latency_value(latencies, 0.5)),
        ),
        Row(
            "forward -> consumer p99",
            each(latency(latencies, 0.99)),
            ratio(latency_value(latencies, 0.99)),
        ),
        Row("backlog at the end (*)", each(lambda one: f"{one.backlog:,}")),
        Row(
            "server CPU, s (CPUs busy)",
            each(
                lambda one: (
                    "n/a"
                    if one.server_cpu is None
                    else f"{one.server_cpu:,.1f} ({one.server_cpu / one.window:.2f})"
                )
            ),
            ratio(lambda one: one.server_cpu),
        ),
        Row(
            "server CPU per acked decision",
            each(
                lambda one: (
                    "n/a"
                    if one.server_cpu is None or not one.acked
                    else duration_text(one.server_cpu * 1e9 / one.acked)
                )
            ),
            ratio(
                lambda one: (
                    None if one.server_cpu is None or not one.acked else one.server_cpu / one.acked
                )
            ),
        ),
        Row(
            "producer processes CPU, s",
            each(lambda one: f"{one.producer_cpu:,.1f} ({one.producer_cpu / one.window:.2f})"),
        ),
        Row(
            "consumer processes CPU, s",
            each(lambda one: f"{one.consumer_cpu:,.1f} ({one.consumer_cpu / one.window:.2f})"),
        ),
        Row("checkpoints in the window", each(lambda one: f"{one.checkpoints or 0:,}")),
        Row(
            "WAL bytes per acked decision",
            each(
                lambda one: (
                    "-"
                    if one.wal_bytes is None or not one.acked
                    else f"{one.wal_bytes / one.acked:,.0f}"
                )
            ),
            ratio(
                lambda one: (
                    None if one.wal_bytes is None or not one.acked else one.wal_bytes / one.acked
                )
            ),
        ),
        Row("1-minute load average at the start", each(lambda one: f"{one.load:.2f}")),
    ]


async def run_benchmark(
    plan: Plan, server_url: str, where: str, summary: str | None = None
) -> None:
    async with benchmark_database(server_url) as database:
        url, name = database.url, database.name
        connection = await asyncpg.connect(asyncpg_dsn(url))
        sampler = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await Queries(AsyncpgDriver(connection)).install()
            version = await connection.fetchval("SELECT version()")
            backend = await connection.fetchval("SELECT pg_backend_pid()")
            server = ServerProcesses.find(int(backend), name)
            commit = await connection.fetchval("SHOW synchronous_commit")
            print(f"server:   {version}")
            print(f"          {where}, database {name}; synchronous_commit={commit}")
            print(
                "          server CPU: "
                + (
                    f"read from /proc (postmaster pid {server.postmaster})"
                    if server is not None
                    else "n/a (the server's processes are not visible here)"
                )
            )
            print(
                f"client:   Python {platform.python_version()}, asyncpg {asyncpg.__version__}, "
                f"SQLAlchemy {sqlalchemy.__version__}, PGQueuer {PGQUEUER_VERSION}, "
                f"{type(asyncio.get_running_loop()).__name__}, {os.cpu_count()} CPUs"
            )
            settings = RegistrySettings(pool_size=plan.pool_size)
            print(
                f"shape:    {plan.runs} runs, {plan.consumers} consumer processes "
                f"({plan.runs // plan.consumers} runs each), {plan.producers} producer processes "
                f"x {plan.tasks} tasks, {plan.pool_size} connections per process; ours: "
                f"inbox_batch {settings.inbox_batch}; PGQueuer: batch_size {plan.pgq_batch}, "
                + ("one shared entrypoint" if plan.shared_entrypoint else "one entrypoint per run")
                + f"; {plan.per_call} decision(s) per forward / enqueue call"
                + ("" if plan.per_call == 1 else " (NOT the default)")
            )
            print()
            bench = Bench(
                plan,
                url,
                connection,
                sampler,
                database.version_num,
                server,
                secrets.token_hex(4),
            )
            started = time.monotonic()
            load_before = os.getloadavg()[0]
            outcomes = {variant: await bench.variant(variant) for variant in VARIANTS}
            load_after = os.getloadavg()[0]
        finally:
            await connection.close()
            await sampler.close()
    print()
    header = ["measure", *(VARIANT_NAMES[name] for name in outcomes), "ours ÷ PGQueuer", "goal"]
    print_table(header, result_rows(outcomes))
    write_summary(summary, headlines("decisions", header[1:], result_rows(outcomes)))
    print()
    print(
        "ours ÷ PGQueuer: ratio of the figures themselves (rates: higher is better; latencies, "
        "CPU, WAL: lower\nis better). Figures in parentheses: CPU seconds per second of the "
        "window (how many CPUs were busy)."
    )
    print(
        "(*)   decisions forwarded but not yet acknowledged when the variant ended (the "
        "producers outran the\n      consumers by this much); redelivered (attempts > 1): "
        + ", ".join(f"{name} {one.redelivered:,}" for name, one in outcomes.items())
    )
    print(
        f"      what the benchmark database's active backends were doing, sampled from "
        f"pg_stat_activity every\n      {WAIT_SAMPLE * 1000:g} ms ('running' = no wait "
        "event: on a CPU or waiting for one):"
    )
    for name, one in outcomes.items():
        seen = sum(one.waits.values())
        if not seen:
            continue
        top = sorted(one.waits.items(), key=lambda item: -item[1])[:6]
        print(
            f"      {name}: {seen / one.wait_samples:.1f} active on average; "
            + ", ".join(f"{what} {count / seen:.0%}" for what, count in top)
        )
    problems = [
        f"{name}: {count:,} {error}"
        for name, one in outcomes.items()
        for error, count in sorted(one.errors.items())
    ]
    print("forward errors: " + ("; ".join(problems) if problems else "none"))
    print(
        f"measured in {time.monotonic() - started:.1f} s; 1-minute load average "
        f"{load_before:.2f} before, {load_after:.2f} after"
    )


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark decision throughput against PGQueuer (see the module docstring)."
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("REGISTRY_DATABASE_URL"),
        help="PostgreSQL server to benchmark on; a fresh database is created there "
        "(default: $REGISTRY_DATABASE_URL, else an embedded PostgreSQL)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK_DURATION:g} s after {QUICK_WARMUP:g} s of warm-up",
    )
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="active runs (100)")
    parser.add_argument(
        "--consumers", type=int, default=DEFAULT_CONSUMERS, help="consumer processes (4)"
    )
    parser.add_argument(
        "--producers", type=int, default=DEFAULT_PRODUCERS, help="producer processes (2)"
    )
    parser.add_argument(
        "--tasks", type=int, default=DEFAULT_TASKS, help="forwarding tasks per producer (16)"
    )
    parser.add_argument(
        "--pool-size", type=int, default=DEFAULT_POOL_SIZE, help="connections per process (8)"
    )
    parser.add_argument("--duration", type=float, help=f"seconds ({DEFAULT_DURATION:g})")
    parser.add_argument("--warmup", type=float, help=f"seconds ({DEFAULT_WARMUP:g})")
    parser.add_argument(
        "--pgq-batch-size",
        type=int,
        default=DEFAULT_PGQ_BATCH,
        help=f"PGQueuer's QueueManager.run(batch_size=...) (its default, {DEFAULT_PGQ_BATCH})",
    )
    parser.add_argument(
        "--pgq-shared-entrypoint",
        action="store_true",
        help="PGQueuer: one entrypoint for every run, any consumer takes any job",
    )
    parser.add_argument(
        "--per-call",
        type=int,
        default=1,
        help="decisions per forward call (PGQueuer: jobs per enqueue call), for diagnosis (1)",
    )
    add_summary_option(parser)
    parser.add_argument("--child", choices=CHILD_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.duration is None:
        arguments.duration = QUICK_DURATION if arguments.quick else DEFAULT_DURATION
    if arguments.warmup is None:
        arguments.warmup = QUICK_WARMUP if arguments.quick else DEFAULT_WARMUP
    names = ("runs", "consumers", "producers", "tasks", "pool_size", "pgq_batch_size", "per_call")
    for name in names:
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if arguments.duration <= 0 or arguments.warmup < 0:
        parser.error("--duration must be positive, --warmup not negative")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.child:
        config = ChildConfig(
            mode=arguments.child,
            variant=arguments.variant,
            index=arguments.index,
            tag=arguments.tag,
            runs=arguments.runs,
            consumers=arguments.consumers,
            tasks=arguments.tasks,
            pool_size=arguments.pool_size,
            pgq_batch=arguments.pgq_batch_size,
            shared_entrypoint=arguments.pgq_shared_entrypoint,
            per_call=arguments.per_call,
            results=arguments.results,
            url=os.environ["REGISTRY_DATABASE_URL"],
        )
        asyncio.run(child_main(config))
        return 0
    plan = Plan(
        runs=arguments.runs,
        consumers=arguments.consumers,
        producers=arguments.producers,
        tasks=arguments.tasks,
        pool_size=arguments.pool_size,
        duration=arguments.duration,
        warmup=arguments.warmup,
        pgq_batch=arguments.pgq_batch_size,
        shared_entrypoint=arguments.pgq_shared_entrypoint,
        per_call=arguments.per_call,
    )
    with benchmark_server(arguments.database_url) as (server_url, where):
        asyncio.run(run_benchmark(plan, server_url, where, arguments.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
