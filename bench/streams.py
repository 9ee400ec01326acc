"""Benchmark the registry's output streams against raw asyncpg, raw NOTIFY and Redis pub/sub.

Run it from the checkout, with the project installed (``pip install -e '.[dev]'``)::

    python bench/streams.py [--database-url URL] [--chunks N] [--redis-url redis://127.0.0.1:6379]

The server is ``--database-url``, else ``$REGISTRY_DATABASE_URL``, else an embedded PostgreSQL
started in a temporary directory (and shut down at the end). The role must be allowed to create
databases: the benchmark creates a fresh ``registry_bench_<hex>`` database on that server,
migrates it, runs everything against it and drops it at the end. Redis is optional: when
nothing answers at ``--redis-url`` its baseline is skipped with a note.

Every chunk is 200 bytes. Each figure is printed next to a baseline measured in the same run,
on the same database, with ``ratio = ours / baseline`` in cost (time per chunk, or latency):
1.00x is as fast as the baseline, higher is slower.

1. Publish throughput, chunks per second from one sequential caller:
   ``RunHandle.publish`` (one chunk per call) against a raw asyncpg ``INSERT`` of one chunk row
   with a client-side seq, and ``RunHandle.publish_many`` in batches of 100 and 1000 against one
   raw ``INSERT ... SELECT FROM unnest(seqs, datas)`` per batch. The baselines allocate no seq
   under the run's row lock and send no notification: that is what the registry adds. For
   reference, raw ``executemany`` of the one-row INSERT per batch and raw ``pg_notify`` per
   chunk. Ours and the baselines alternate in rounds. Goal: batched publish at least
   20,000 chunks/s.
2. End-to-end latency across two processes, p50 and p99: the parent stamps
   ``time.monotonic_ns()`` just before ``publish``; a child process stamps each subscriber's
   receipt (when ``async for chunk in subscription`` yields) and reports the stamps over its
   stdout. CLOCK_MONOTONIC is system-wide on Linux, so the stamps compare. One chunk is in
   flight at a time and variants take turns with a short pause between chunks, so each run's
   chunks are further apart than the registry's notification window (as a token stream's
   are). With 1 subscriber and with 100 subscribers, all on one ``RunRegistry`` in the child,
   whose LISTEN connections are counted in ``pg_stat_activity`` (it must be one). For 100
   subscribers every subscriber's receipt is a sample. Diagnostic rows repeat each case back
   to back (the next chunk as soon as the last arrived, no pause), where the registry's
   notification window coalesces notifications and subscribers read the table.
3. Latency baselines, side by side with ours in the same phase: raw asyncpg ``pg_notify``
   (the same JSON payload our notification carries, 200 bytes inline as base64) received by a
   raw asyncpg LISTEN in a child, and Redis ``PUBLISH`` received by ``redis.asyncio`` pub/sub
   in a child. For 100 subscribers the raw child registers 100 ``add_listener`` callbacks on
   its one connection, and the Redis child reads its one pub/sub connection and hands each
   message to 100 queues; in both, each subscriber is a task that stamps when it takes the
   payload from its queue and then reads the seq, the same shape as our subscriber tasks.
   Goal: our p50 within 2x of raw NOTIFY. A diagnostic baseline, the floor of the design:
   one raw statement that INSERTs the chunk row and NOTIFYs with it inline, received by the
   same raw child (what storing the chunk before waking costs, without our seq allocation
   and without SQLAlchemy).

The parent's registry connects with ``listen=False``: a publisher waits on nothing, and the
only registry LISTEN connections on the benchmark database are then the child's.

The baseline SQL lives here, not in ``registry/repository.py``: it is the yardstick, so it
must not share the registry's code path. Every value travels as a bind parameter.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import math
import os
import platform
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis
import redis.asyncio
import sqlalchemy
from _shared import (
    CHILD_TIMEOUT,
    Child,
    Headline,
    add_summary_option,
    benchmark_database,
    benchmark_server,
    raw_pool,
    say,
    stdin_reader,
    write_summary,
)

from registry import RunHandle, RunRegistry, StreamSubscription
from registry.database import asyncpg_dsn
from registry.listener import LISTENER_APPLICATION_NAME

CHUNK_BYTES = 200
#: the payload every variant publishes (its content does not matter, only its size)
CHUNK = bytes(index % 251 for index in range(CHUNK_BYTES))
DEFAULT_CHUNKS = 20_000
#: the one-chunk-per-call variants publish this fraction of ``--chunks``
SINGLE_FRACTION = 10
BATCH_SIZES = (100, 1000)
#: throughput variants alternate in this many rounds
ROUNDS = 5
PUBLISH_GOAL = 20_000.0
LATENCY_GOAL = 2.0
FANOUT = 100
#: measured chunks per latency variant, by number of subscribers (after the warm-up)
SAMPLES = {1: 400, FANOUT: 150}
#: measured chunks per variant in the back-to-back diagnostic
BACK_TO_BACK_SAMPLES = {1: 100, FANOUT: 30}
#: seconds between chunks in the latency phases: more than the default notification window
GAP = 0.005
#: seconds to wait for a child's line before calling the benchmark broken
AGENT_ID = "bench-agent"
WORKER_ID = "bench-streams-parent"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
RAW_CHANNEL = "bench_streams_raw"
REDIS_CHANNEL = "bench:streams"
CHILD_MODES = ("ours", "raw", "redis")

# --- the raw baselines: the minimal SQL that does the same job -------------------------------

RAW_INSERT_ONE = "INSERT INTO stream_chunks (run_id, seq, data) VALUES ($1, $2, $3)"

RAW_INSERT_BATCH = """
    INSERT INTO stream_chunks (run_id, seq, data)
    SELECT $1, chunk.seq, chunk.data
      FROM unnest($2::bigint[], $3::bytea[]) AS chunk(seq, data)
"""

RAW_NOTIFY = "SELECT pg_notify($1, $2)"

#: the floor of the design (store the chunk, then wake): one INSERT and its NOTIFY, no seq lock
RAW_INSERT_NOTIFY = """
    WITH inserted AS (
        INSERT INTO stream_chunks (run_id, seq, data) VALUES ($1, $2, $3)
        RETURNING run_id, seq
    )
    SELECT pg_notify($4, json_build_object(
               'kind', 'chunk', 'id', run_id, 'seq', seq, 'data', $5::text)::text)
      FROM inserted
"""

LISTENER_CONNECTIONS = """
    SELECT pid FROM pg_stat_activity
     WHERE application_name = $1 AND datname = current_database()
"""


def payload(run_id: str, seq: int) -> str:
    """The notification our registry sends for a small chunk, as the baselines send it."""
    data = base64.b64encode(CHUNK).decode("ascii")
    return json.dumps({"kind": "chunk", "id": run_id, "seq": seq, "data": data})


# --- figures ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with ``fraction`` of values at or below."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def rate_text(rate: float) -> str:
    return f"{rate:,.0f}/s"


def micros_text(nanoseconds: float) -> str:
    return f"{nanoseconds / 1000:,.0f} µs"


@dataclass(frozen=True)
class Row:
    """One line of the result table, already formatted."""

    measure: str
    ours: str
    baseline: str
    ratio: str
    goal: str

    def cells(self) -> list[str]:
        return [self.measure, self.ours, self.baseline, self.ratio, self.goal]


def rate_row(
    measure: str, ours: float | None, baseline: float, name: str, goal: float | None = None
) -> Row:
    """A throughput row; the ratio is in cost per chunk, so it is ``baseline / ours``."""
    if ours is None:
        return Row(measure, "-", f"{rate_text(baseline)} {name}", "-", "-")
    verdict = "-"
    if goal is not None:
        verdict = f">= {rate_text(goal)} " + ("met" if ours >= goal else "MISSED")
    return Row(
        measure,
        rate_text(ours),
        f"{rate_text(baseline)} {name}",
        f"{baseline / ours:.2f}x",
        verdict,
    )


def latency_row(
    measure: str, ours: float, baseline: float, name: str, goal: float | None = None
) -> Row:
    ratio = ours / baseline
    verdict = "-"
    if goal is not None:
        verdict = f"<= {goal:g}x " + ("met" if ratio <= goal else "MISSED")
    return Row(
        measure, micros_text(ours), f"{micros_text(baseline)} {name}", f"{ratio:.2f}x", verdict
    )


def print_table(rows: Sequence[Row]) -> None:
    header = ["measure", "ours", "baseline", "ratio", "goal"]
    lines = [header, *(row.cells() for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    for index, line in enumerate(lines):
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print(" | ".join(cells).rstrip())
        if index == 0:
            print("-+-".join("-" * width for width in widths))


# --- the child process --------------------------------------------------------------------------


class Receipts:
    """Collects every subscriber's receipt stamp of a chunk; reports once all have it."""

    def __init__(self, subscribers: int) -> None:
        self._subscribers = subscribers
        self._pending: dict[int, list[int]] = {}

    def stamp(self, seq: int, received: int) -> None:
        stamps = self._pending.setdefault(seq, [])
        stamps.append(received)
        if len(stamps) == self._subscribers:
            del self._pending[seq]
            say("got", seq, *stamps)


async def serve(
    reader: asyncio.StreamReader,
    consumers: Sequence[Coroutine[Any, Any, None]],
    *ready: object,
) -> None:
    """Say ``ready`` and run ``consumers`` until the parent closes our stdin.

    A failing consumer ends this process at once (the task group cancels the wait), so the
    parent sees our stdout close instead of waiting for a line that will never come.
    """
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(consumer) for consumer in consumers]
        say("ready", *ready)
        await reader.read()
        for task in tasks:
            task.cancel()


async def follow(subscription: StreamSubscription, receipts: Receipts) -> None:
    previous: int | None = None
    async for chunk in subscription:
        received = time.monotonic_ns()
        if previous is not None and chunk.seq != previous + 1:
            raise RuntimeError(f"chunk {chunk.seq} after {previous}")
        if len(chunk.data) != CHUNK_BYTES:
            raise RuntimeError(f"chunk {chunk.seq} has {len(chunk.data)} bytes")
        previous = chunk.seq
        receipts.stamp(chunk.seq, received)


async def drain(queue: asyncio.Queue[bytes | str], receipts: Receipts) -> None:
    """One baseline subscriber: stamp on taking a payload from its queue, then read the seq."""
    while True:
        message = await queue.get()
        received = time.monotonic_ns()
        receipts.stamp(int(json.loads(message)["seq"]), received)


async def child_ours(url: str, run_id: str, subscribers: int, reader: asyncio.StreamReader) -> None:
    receipts = Receipts(subscribers)
    worker_id = f"bench-streams-child-{os.getpid()}"
    async with await RunRegistry.connect(url, worker_id=worker_id) as registry:
        subscriptions = []
        for _ in range(subscribers):
            subscription = await registry.subscribe_thread_run_stream(run_id)
            if subscription is None:
                raise RuntimeError(f"run {run_id} has no stream")
            subscriptions.append(subscription)
        listener = registry.listener
        backend_pid = None if listener is None else listener.backend_pid
        await serve(
            reader, [follow(subscription, receipts) for subscription in subscriptions], backend_pid
        )


async def child_raw(url: str, subscribers: int, reader: asyncio.StreamReader) -> None:
    receipts = Receipts(subscribers)
    queues: list[asyncio.Queue[bytes | str]] = [asyncio.Queue() for _ in range(subscribers)]

    def callback(queue: asyncio.Queue[bytes | str]) -> Callable[[Any, int, str, Any], None]:
        def on_notification(_connection: Any, _pid: int, _channel: str, message: Any) -> None:
            queue.put_nowait(message)

        return on_notification

    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for queue in queues:
            await connection.add_listener(RAW_CHANNEL, callback(queue))
        await serve(reader, [drain(queue, receipts) for queue in queues])
    finally:
        await connection.close()


async def child_redis(redis_url: str, subscribers: int, reader: asyncio.StreamReader) -> None:
    receipts = Receipts(subscribers)
    queues: list[asyncio.Queue[bytes | str]] = [asyncio.Queue() for _ in range(subscribers)]

    async def pump(pubsub: redis.asyncio.client.PubSub) -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                for queue in queues:
                    queue.put_nowait(message["data"])

    async with redis.asyncio.Redis.from_url(redis_url) as client, client.pubsub() as pubsub:
        await pubsub.subscribe(REDIS_CHANNEL)
        confirmation = await pubsub.get_message(timeout=CHILD_TIMEOUT)
        if confirmation is None or confirmation["type"] != "subscribe":
            raise RuntimeError(f"no SUBSCRIBE confirmation from Redis: {confirmation!r}")
        await serve(reader, [pump(pubsub), *(drain(queue, receipts) for queue in queues)])


async def child_main(arguments: argparse.Namespace) -> None:
    reader = await stdin_reader()
    url: str = arguments.database_url
    subscribers: int = arguments.subscribers
    if arguments.child == "ours" and arguments.run_id:
        await child_ours(url, arguments.run_id, subscribers, reader)
    elif arguments.child == "raw":
        await child_raw(url, subscribers, reader)
    elif arguments.child == "redis":
        await child_redis(arguments.redis_url, subscribers, reader)
    else:
        raise SystemExit(f"bad child mode {arguments.child!r} (run id {arguments.run_id!r})")


def start_child(
    mode: str, url: str, redis_url: str, subscribers: int, run_id: str | None = None
) -> Awaitable[Child]:
    """Start this script as a child in ``mode`` (the URLs travel in its environment)."""
    arguments = ["--child", mode, "--subscribers", str(subscribers)]
    if run_id is not None:
        arguments += ["--run-id", run_id]
    return Child.start(
        __file__, arguments, {"REGISTRY_DATABASE_URL": url, "BENCH_REDIS_URL": redis_url}
    )


@contextlib.asynccontextmanager
async def child_processes(
    starts: dict[str, Awaitable[Child]],
) -> AsyncIterator[dict[str, Child]]:
    """Start the children side by side; on any failure kill every one that started."""
    names = list(starts)
    results = await asyncio.gather(*starts.values(), return_exceptions=True)
    children = {
        name: result
        for name, result in zip(names, results, strict=True)
        if isinstance(result, Child)
    }
    try:
        for result in results:
            if isinstance(result, BaseException):
                raise result
        yield children
    except BaseException:
        for child in children.values():
            await child.kill()
        raise
    for child in children.values():
        await child.close()


# --- the measurements ---------------------------------------------------------------------------

#: publish one call's worth of chunks
Publisher = Callable[[list[bytes]], Awaitable[None]]
#: publish chunk number ``index`` and return every subscriber's latency in nanoseconds
Probe = Callable[[int], Awaitable[list[int]]]


class RawStream:
    """A run's chunk rows written by raw asyncpg, with seqs counted by the client."""

    def __init__(self, pool: asyncpg.Pool, run_id: str) -> None:
        self._pool = pool
        self.run_id = run_id
        self._next = 1

    def _seqs(self, count: int) -> list[int]:
        first, self._next = self._next, self._next + count
        return list(range(first, first + count))

    async def insert_one(self, chunks: list[bytes]) -> None:
        for seq, chunk in zip(self._seqs(len(chunks)), chunks, strict=True):
            await self._pool.execute(RAW_INSERT_ONE, self.run_id, seq, chunk)

    async def insert_batch(self, chunks: list[bytes]) -> None:
        await self._pool.execute(RAW_INSERT_BATCH, self.run_id, self._seqs(len(chunks)), chunks)

    async def executemany(self, chunks: list[bytes]) -> None:
        rows = [
            (self.run_id, seq, chunk)
            for seq, chunk in zip(self._seqs(len(chunks)), chunks, strict=True)
        ]
        await self._pool.executemany(RAW_INSERT_ONE, rows)

    async def insert_notify(self, chunk: bytes) -> int:
        """Insert one chunk and notify with it inline, in one statement; return its seq."""
        [seq] = self._seqs(1)
        data = base64.b64encode(chunk).decode("ascii")
        await self._pool.execute(RAW_INSERT_NOTIFY, self.run_id, seq, chunk, RAW_CHANNEL, data)
        return seq

    async def notify(self, chunks: list[bytes]) -> None:
        for seq in self._seqs(len(chunks)):
            await self._pool.execute(RAW_NOTIFY, RAW_CHANNEL, payload(self.run_id, seq))


async def rates(variants: dict[str, Publisher], total: int, batch: int) -> dict[str, float]:
    """Chunks per second of each variant publishing ``total`` chunks, ``batch`` per call.

    Each variant is warmed up first; then they alternate in rounds, rotating which goes first,
    so that drift and noisy neighbours hit every variant alike.
    """
    chunks = [CHUNK] * batch
    calls = max(1, total // batch // ROUNDS)
    for publish in variants.values():
        for _ in range(max(2, calls // 5)):
            await publish(chunks)
    names = list(variants)
    elapsed = dict.fromkeys(names, 0)
    gc.collect()
    for round_index in range(ROUNDS):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            publish = variants[name]
            start = time.perf_counter_ns()
            for _ in range(calls):
                await publish(chunks)
            elapsed[name] += time.perf_counter_ns() - start
    published = calls * ROUNDS * batch
    return {name: published * 1e9 / nanoseconds for name, nanoseconds in elapsed.items()}


async def alternate(
    probes: dict[str, Probe], samples: int, warmup: int, gap: float
) -> dict[str, list[int]]:
    """Run every probe once per step, rotating which goes first, pausing ``gap`` after each.

    The first ``warmup`` steps are dropped. Returns every latency, in nanoseconds.
    """
    names = list(probes)
    latencies: dict[str, list[int]] = {name: [] for name in names}
    for index in range(warmup + samples):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            measured = await probes[name](index)
            if index >= warmup:
                latencies[name] += measured
            await asyncio.sleep(gap)
    return latencies


@dataclass
class Bench:
    """What every measurement needs: the database, our registry, a raw pool, Redis, a tag."""

    url: str
    redis_url: str
    registry: RunRegistry
    pool: asyncpg.Pool
    redis: redis.asyncio.Redis | None
    tag: str

    async def stream(self, kind: str) -> RunHandle:
        """A fresh active run with its stream bound."""
        run_id = f"{kind}-{self.tag}"
        handle = await self.registry.register(run_id, AGENT_ID, f"thread-{run_id}")
        if not await handle.bind_stream_fanout():
            raise RuntimeError(f"could not bind the stream of {run_id}")
        return handle

    async def throughput(self, chunks: int) -> list[Row]:
        ours = await self.stream("throughput-ours")
        raw = RawStream(self.pool, (await self.stream("throughput-raw")).run_id)
        notify = RawStream(self.pool, ours.run_id)

        async def publish(batch: list[bytes]) -> None:
            for chunk in batch:
                await ours.publish(chunk)

        async def publish_many(batch: list[bytes]) -> None:
            await ours.publish_many(batch)

        single = chunks // SINGLE_FRACTION
        print(f"publish throughput: {single:,} chunks one per call, {chunks:,} per batch size ...")
        one = await rates(
            {"ours": publish, "insert": raw.insert_one, "notify": notify.notify}, single, 1
        )
        rows = [
            rate_row("publish, 1 chunk per call", one["ours"], one["insert"], "raw INSERT"),
        ]
        references = [
            rate_row("  reference: raw pg_notify per chunk", None, one["notify"], "raw NOTIFY")
        ]
        for size in BATCH_SIZES:
            many = await rates(
                {"ours": publish_many, "unnest": raw.insert_batch, "many": raw.executemany},
                chunks,
                size,
            )
            rows.append(
                rate_row(
                    f"publish_many, batches of {size}",
                    many["ours"],
                    many["unnest"],
                    "raw INSERT unnest",
                    PUBLISH_GOAL,
                )
            )
            references.append(
                rate_row(
                    f"  reference: raw executemany, batches of {size}",
                    None,
                    many["many"],
                    "raw executemany",
                )
            )
        await self.registry.remove_by_run_id(ours.run_id)
        await self.registry.remove_by_run_id(raw.run_id)
        return rows + references

    async def listener_pids(self) -> list[int]:
        rows = await self.pool.fetch(LISTENER_CONNECTIONS, LISTENER_APPLICATION_NAME)
        return [int(row["pid"]) for row in rows]

    async def latency(self, subscribers: int) -> tuple[list[Row], list[Row]]:
        """Latency rows for ``subscribers`` (ours against each baseline), and check rows."""
        handle = await self.stream(f"latency-{subscribers}")
        floor = RawStream(self.pool, (await self.stream(f"latency-raw-{subscribers}")).run_id)
        starts: dict[str, Awaitable[Child]] = {
            "ours": start_child("ours", self.url, self.redis_url, subscribers, handle.run_id),
            "raw": start_child("raw", self.url, self.redis_url, subscribers),
        }
        if self.redis is not None:
            starts["redis"] = start_child("redis", self.url, self.redis_url, subscribers)
        redis_client = self.redis
        label = "1 subscriber" if subscribers == 1 else f"{subscribers} subscribers"
        samples = SAMPLES[subscribers]
        warmup = max(20, samples // 10)
        print(f"latency, {label}: {samples} chunks per variant after {warmup} warm-up ...")
        async with child_processes(starts) as children:
            pids = await self.listener_pids()
            child_pid = children["ours"].ready[0]

            async def receipts(child: str, seq: int, start: int) -> list[int]:
                words = await children[child].expect("got")
                if int(words[0]) != seq:
                    raise RuntimeError(f"{child}: got chunk {words[0]}, expected {seq}")
                return [int(stamp) - start for stamp in words[1:]]

            async def ours(_index: int) -> list[int]:
                start = time.monotonic_ns()
                seq = await handle.publish(CHUNK)
                return await receipts("ours", seq, start)

            async def raw(index: int) -> list[int]:
                start = time.monotonic_ns()
                await self.pool.execute(RAW_NOTIFY, RAW_CHANNEL, payload(floor.run_id, index))
                return await receipts("raw", index, start)

            async def raw_insert(_index: int) -> list[int]:
                start = time.monotonic_ns()
                seq = await floor.insert_notify(CHUNK)
                return await receipts("raw", seq, start)

            async def redis_probe(index: int) -> list[int]:
                assert redis_client is not None
                start = time.monotonic_ns()
                await redis_client.publish(REDIS_CHANNEL, payload(floor.run_id, index))
                return await receipts("redis", index, start)

            probes: dict[str, Probe] = {"ours": ours, "raw": raw, "raw-insert": raw_insert}
            if redis_client is not None:
                probes["redis"] = redis_probe
            gc.collect()
            measured = await alternate(probes, samples, warmup, GAP)
            gc.collect()
            back_to_back = await alternate(
                {"ours": ours, "raw": raw}, BACK_TO_BACK_SAMPLES[subscribers], 10, 0.0
            )
        await self.registry.remove_by_run_id(handle.run_id)
        await self.registry.remove_by_run_id(floor.run_id)

        rows = []
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            ours_value = percentile(measured["ours"], fraction)
            measure = f"e2e latency {name}, {label}"
            goal = LATENCY_GOAL if name == "p50" else None
            rows.append(
                latency_row(
                    measure, ours_value, percentile(measured["raw"], fraction), "raw NOTIFY", goal
                )
            )
            if "redis" in measured:
                rows.append(
                    latency_row(
                        measure, ours_value, percentile(measured["redis"], fraction), "Redis"
                    )
                )
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            rows.append(
                latency_row(
                    f"  diagnostic: {name}, {label} (**)",
                    percentile(measured["ours"], fraction),
                    percentile(measured["raw-insert"], fraction),
                    "raw INSERT+NOTIFY",
                )
            )
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            rows.append(
                latency_row(
                    f"  diagnostic: {name}, {label}, back to back (***)",
                    percentile(back_to_back["ours"], fraction),
                    percentile(back_to_back["raw"], fraction),
                    "raw NOTIFY",
                )
            )
        count = len(pids)
        met = count == 1 and str(pids[0]) == child_pid
        checks = [
            Row(
                f"LISTEN connections, {label} in one process (*)",
                str(count),
                "-",
                "-",
                "== 1 " + ("met" if met else "MISSED"),
            )
        ]
        return rows, checks


async def connect_redis(url: str) -> tuple[redis.asyncio.Redis | None, str]:
    """A Redis client if one answers at ``url``, and a line describing it (or the skip)."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        info = await asyncio.wait_for(client.info("server"), 2.0)
    except (OSError, redis.RedisError, TimeoutError) as exc:
        await client.aclose()
        return None, f"Redis:    skipped, nothing answered at {url} ({type(exc).__name__}: {exc})"
    return client, f"Redis:    {info.get('redis_version', '?')} at {url}"


async def measure(url: str, chunks: int, redis_url: str) -> list[Row]:
    redis_client, redis_line = await connect_redis(redis_url)
    print(redis_line)
    registry = await RunRegistry.connect(url, worker_id=WORKER_ID, listen=False)
    settings = registry.settings
    print(
        f"settings: stream_notify_window {settings.stream_notify_window * 1000:g} ms, "
        f"inline_chunk_bytes {settings.inline_chunk_bytes}, "
        f"subscriber_buffer {settings.subscriber_buffer}; payload "
        f"{len(payload('latency-1-' + '0' * 8, 1000))} bytes of JSON per 200-byte chunk"
    )
    print()
    try:
        pool = await raw_pool(url, min_size=2, max_size=2)
        try:
            bench = Bench(url, redis_url, registry, pool, redis_client, secrets.token_hex(4))
            rows = await bench.throughput(chunks)
            checks: list[Row] = []
            for subscribers in (1, FANOUT):
                latency_rows, check_rows = await bench.latency(subscribers)
                rows += latency_rows
                checks += check_rows
            return rows + checks
        finally:
            await pool.close()
    finally:
        await registry.close()
        if redis_client is not None:
            await redis_client.aclose()


# --- the parent process -------------------------------------------------------------------------


async def describe_server(url: str) -> str:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        version = await connection.fetchval("SELECT version()")
    finally:
        await connection.close()
    return str(version)


async def run_benchmark(
    server_url: str, where: str, chunks: int, redis_url: str, summary: str | None = None
) -> None:
    async with benchmark_database(server_url) as database:
        url, name, version_num = database.url, database.name, database.version_num
        print(f"server:   {await describe_server(url)}")
        print(f"          server_version_num {version_num}; {where}, database {name}")
        print(
            f"client:   Python {platform.python_version()}, asyncpg {asyncpg.__version__}, "
            f"SQLAlchemy {sqlalchemy.__version__}, redis-py {redis.__version__}, "
            f"{os.cpu_count()} CPUs"
        )
        started = time.monotonic()
        load_before = os.getloadavg()[0]
        rows = await measure(url, chunks, redis_url)
        load_after = os.getloadavg()[0]
        print()
        print_table(rows)
        write_summary(
            summary,
            [Headline.from_cells("streams", *row.cells()) for row in rows if row.goal != "-"],
        )
        print()
        print(
            "ratio = ours / baseline in cost (time per chunk, or latency): "
            "1.00x is as fast, higher is slower."
        )
        print(
            "(*)   registry LISTEN connections on the benchmark database while the child "
            f"held its subscribers\n      (pg_stat_activity, application_name = "
            f"{LISTENER_APPLICATION_NAME!r}); the parent publishes with\n      listen=False."
        )
        print(
            "(**)  the same chunks against a second baseline, the floor of the design: the "
            "raw child woken by one\n      statement that INSERTs the chunk row and NOTIFYs "
            "with it inline (no seq allocation, no SQLAlchemy)."
        )
        print(
            "(***) one chunk in flight, the next published as soon as the last arrived: "
            "chunks closer together\n      than stream_notify_window share one coalesced "
            "notification without inline data, so every\n      subscriber reads the table."
        )
        print(
            f"measured in {time.monotonic() - started:.1f} s; 1-minute load average "
            f"{load_before:.2f} before, {load_after:.2f} after"
        )


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the registry's streams (see the module docstring)."
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("REGISTRY_DATABASE_URL"),
        help="PostgreSQL server to benchmark on; a fresh database is created there "
        "(default: $REGISTRY_DATABASE_URL, else an embedded PostgreSQL)",
    )
    parser.add_argument(
        "--chunks",
        type=int,
        default=DEFAULT_CHUNKS,
        help=f"chunks published per batched throughput variant (default {DEFAULT_CHUNKS:,}); "
        f"the one-chunk-per-call variants publish a {SINGLE_FRACTION}th of it",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis for the pub/sub baseline, skipped if none answers "
        f"(default: $BENCH_REDIS_URL, else {DEFAULT_REDIS_URL})",
    )
    add_summary_option(parser)
    parser.add_argument("--child", choices=CHILD_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--subscribers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.chunks < max(BATCH_SIZES) * ROUNDS:
        parser.error(f"--chunks must be at least {max(BATCH_SIZES) * ROUNDS}")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.child:
        asyncio.run(child_main(arguments))
        return 0
    with benchmark_server(arguments.database_url) as (server_url, where):
        asyncio.run(
            run_benchmark(
                server_url, where, arguments.chunks, arguments.redis_url, arguments.summary
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
