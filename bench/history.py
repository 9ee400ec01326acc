"""Benchmark what a growing history costs: the hot calls with 10^4 .. 10^6 ended runs behind them.

Run it from the checkout, with the project installed (``pip install -e '.[dev]'``)::

    python bench/history.py [--database-url URL] [--sizes 10000,100000,1000000]
                            [--iterations N] [--explain] [--summary PATH]

The server is ``--database-url``, else ``$REGISTRY_DATABASE_URL``, else an embedded PostgreSQL
started in a temporary directory (and shut down at the end). The benchmark creates a fresh
``registry_bench_<hex>`` database, migrates it, and drops it at the end.

History: for each size in ``--sizes`` (default 10^4 and 10^5 ended runs; 10^6 is 10^8 chunk
rows, ask for it), ended runs with ``DECISIONS_PER_RUN`` acked decisions and
``CHUNKS_PER_RUN`` chunks of ``CHUNK_BYTES`` bytes each are bulk-loaded server-side (``INSERT
... SELECT generate_series``, straight into the registry's tables) up to that many, then
``VACUUM ANALYZE``. The sizes grow one database: the figures of each size are measured on top
of everything loaded before.

At each size, on a small working set of active runs registered through the API, every
operation runs ``--iterations`` times (after a warm-up), ours and the raw asyncpg baseline
interleaved call by call, and prints p50:

* ``handle_by_thread`` against the SELECT of the thread's active run;
* forward: ``forward_decisions_by_run_id`` of one decision, against an INSERT of the decision
  row with ``pg_notify``;
* claim: a fresh inbox's read of the one decision pending on its run (``inbox_batch`` 1),
  against a claim ``UPDATE ... RETURNING`` whose commit, as ours, does not wait for the WAL
  flush (the forward and the ack around it are not timed);
* publish: ``RunHandle.publish`` of one chunk, against an INSERT of the chunk row with a
  client-side seq;
* adopt: ``adopt_orphaned_runs(limit=1)`` of the one run whose lease expired, against the same
  ``UPDATE ... FOR UPDATE SKIP LOCKED`` (the orphan's insert and removal are not timed);
* replay: a subscriber of a run with ``REPLAY_CHUNKS`` stored chunks reading them all
  (``subscribe_thread_run_stream(after_seq=0)``), against one SELECT of those chunks.

Each size is measured in two rounds and each p50 is the lower of the two (a neighbour's burst
on a shared machine inflates one round, rarely both). ``--explain`` prints, at each size,
``EXPLAIN (ANALYZE, BUFFERS)`` of the replay's read, the thread lookup and the adoption's
candidate scan: what bounds a figure that grows.

Each figure is printed as ours, baseline, ours / baseline, and as its ratio to the same figure
on the smallest history. Goal: each of ours within 1.3x of the smallest history. Storage: table
and index bytes per run, per decision and per chunk (``pg_relation_size``, ``pg_indexes_size``;
rows from ``pg_class.reltuples`` after the ``VACUUM ANALYZE``).

Retention, on the largest history: ``PRUNE_RUNS`` of the ended runs (``PRUNE_RUNS *
CHUNKS_PER_RUN``, 10^6 chunks) are dated older than the retention, and one publisher publishes
one chunk at a time, first for ``QUIET_SECONDS`` (without), then while
``RegistryInspector.prune`` deletes those chunks (during). Ours: publish p99 during the prune;
baseline: publish p99 without. Goal: within 2x.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from _shared import (
    Headline,
    Probe,
    benchmark_database,
    benchmark_parser,
    benchmark_server,
    interleave,
    print_measured,
    print_table,
    raw_pool,
    write_summary,
)
from core import RAW_ACTIVE_BY_THREAD, RAW_FORWARD, lookup_probes

from registry import RegistrySettings, RunHandle, RunRegistry, ToolCallDecision
from registry.database import asyncpg_dsn
from registry.inspection import RegistryInspector

DEFAULT_SIZES = (10_000, 100_000)
DECISIONS_PER_RUN = 10
CHUNKS_PER_RUN = 100
CHUNK_BYTES = 32
#: history runs per loading statement (each carries this many times 100 chunk rows)
LOAD_BATCH = 5_000
WORKING_RUNS = 20
DEFAULT_ITERATIONS = 200
WARMUP = 20
REPLAY_CHUNKS = 1000
REPLAY_ITERATIONS = 20
ROUNDS = 2
PRUNE_RUNS = 10_000
QUIET_SECONDS = 3.0
GOAL_GROWTH = 1.3
GOAL_PRUNE = 2.0
AGENT_ID = "bench-agent"
OWNER = "bench-history"
RAW_CHANNEL = "bench_history_raw"
CHUNK = b"c" * CHUNK_BYTES
LEASE = timedelta(seconds=15)
OPERATIONS = ("handle_by_thread", "forward", "claim", "publish", "adopt", "replay 1,000 chunks")

# --- loading the history (not timed) -----------------------------------------------------------

LOAD_RUNS = """
    INSERT INTO runs (run_id, thread_id, agent_id, status, owner_id, end_reason, created_at,
                      updated_at, ended_at, stream_seq)
    SELECT 'hist-' || g, 'hist-thread-' || g, $3, 'completed', $4, 'removed',
           now() - interval '2 hours', now() - interval '1 hour', now() - interval '1 hour', $5
      FROM generate_series($1::bigint, $2::bigint) AS g
"""

LOAD_DECISIONS = """
    INSERT INTO decisions (run_id, thread_id, agent_id, decision_id, target_id, action, result,
                           decision_updated_at, status, attempts, received_at, delivered_at,
                           acked_at)
    SELECT 'hist-' || g, 'hist-thread-' || g, $3, 'd' || d, 'call-' || d, 'resume',
           '{"ok": true}'::jsonb, 0, 'acked', 1, now() - interval '2 hours',
           now() - interval '2 hours', now() - interval '2 hours'
      FROM generate_series($1::bigint, $2::bigint) AS g, generate_series(1, $4::int) AS d
"""

LOAD_CHUNKS = """
    INSERT INTO stream_chunks (run_id, seq, data, created_at)
    SELECT 'hist-' || g, s, $4, now() - interval '2 hours'
      FROM generate_series($1::bigint, $2::bigint) AS g, generate_series(1, $3::bigint) AS s
"""

# superuser only: skips the per-row foreign-key triggers (the rows are consistent by make)
FAST_LOAD = "SET session_replication_role = replica"

STORAGE = """
    SELECT c.relname AS name, c.reltuples::bigint AS tuples,
           pg_relation_size(c.oid) AS heap, pg_indexes_size(c.oid) AS indexes
      FROM pg_class c
     WHERE c.relname IN ('runs', 'decisions', 'stream_chunks') AND c.relkind = 'r'
       AND c.relnamespace = 'public'::regnamespace
"""

DATE_FOR_PRUNE = """
    UPDATE runs SET ended_at = now() - interval '30 days'
     WHERE run_id IN (SELECT 'hist-' || g FROM generate_series(1, $1::bigint) AS g)
"""

WAL_POSITION = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"

INSERT_ORPHAN = """
    INSERT INTO runs (run_id, thread_id, agent_id, owner_id, lease_expires_at)
    VALUES ($1, $2, $3, 'bench-gone', now() - interval '1 minute')
"""

# --- the raw asyncpg baseline: the minimal SQL that does the same job (and bench/core.py's
# lookup and forward) -------------------------------------------------------------------------

# as the registry's claim, its commit does not wait for the WAL flush (a lost mark only means
# one more delivery)
RAW_CLAIM = """
    WITH relaxed AS (
        SELECT set_config('synchronous_commit', 'off', true)
    )
    UPDATE decisions
       SET status = 'delivered', delivered_at = coalesce(delivered_at, now()),
           attempts = attempts + 1
      FROM relaxed
     WHERE id IN (
            SELECT id FROM decisions
             WHERE run_id = $1 AND status IN ('pending', 'delivered')
             ORDER BY id LIMIT 1
           )
    RETURNING id, run_id, decision_id, target_id, action, result::text AS result, reason,
              decision_updated_at, attempts, received_at
"""

RAW_ACK = "UPDATE decisions SET status = 'acked', acked_at = now() WHERE id = $1"

RAW_PUBLISH = "INSERT INTO stream_chunks (run_id, seq, data) VALUES ($1, $2, $3)"

RAW_ADOPT = """
    UPDATE runs SET owner_id = $1, updated_at = now(), lease_expires_at = now() + $2::interval,
           owner_epoch = owner_epoch + 1
     WHERE run_id IN (
            SELECT run_id FROM runs
             WHERE status = 'active' AND (lease_expires_at IS NULL OR lease_expires_at < now())
             ORDER BY lease_expires_at NULLS FIRST, created_at
             LIMIT 1
               FOR UPDATE SKIP LOCKED
           )
    RETURNING run_id, thread_id, agent_id, status, owner_id, owner_epoch
"""

ADOPT_CANDIDATES = """
    SELECT run_id FROM runs
     WHERE status = 'active' AND (lease_expires_at IS NULL OR lease_expires_at < now())
     ORDER BY lease_expires_at NULLS FIRST, created_at
     LIMIT 1
"""

RAW_COMPLETE = """
    UPDATE runs SET status = 'completed', end_reason = 'removed', ended_at = now(),
           updated_at = now(), lease_expires_at = NULL
     WHERE run_id = $1 AND status = 'active'
"""

RAW_REPLAY = """
    SELECT seq, data FROM stream_chunks WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3
"""


def micros(nanoseconds: float) -> str:
    return (
        f"{nanoseconds / 1000:,.0f} µs" if nanoseconds >= 1e5 else f"{nanoseconds / 1000:,.1f} µs"
    )


def percentile(values: Sequence[int], fraction: float) -> float:
    ordered = sorted(values)
    return float(ordered[max(0, min(len(ordered) - 1, int(fraction * len(ordered))))])


async def medians(probes: dict[str, Probe], iterations: int, warmup: int) -> dict[str, float]:
    """p50 (ns) of each probe, the probes interleaved call by call."""
    samples = await interleave(probes, iterations, warmup)
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass(frozen=True)
class Storage:
    """Bytes per row of one table: heap and indexes."""

    rows: int
    heap: float
    indexes: float


class Bench:
    """The working set (active runs, through the API) and the operations measured on it."""

    def __init__(self, url: str, registry: RunRegistry, adopter: RunRegistry, pool: asyncpg.Pool):
        self.url = url
        self.registry = registry
        self.adopter = adopter
        self.pool = pool
        self.tag = secrets.token_hex(3)
        self.handles: dict[str, list[RunHandle]] = {}
        self.threads: list[str] = []
        self.raw_seq: dict[str, int] = {}
        self.replay_run = ""
        self.rounds = 0
        #: publishes measured without and during the prune
        self.prune_samples = (0, 0)
        #: WAL written meanwhile (server-wide, the publisher's included)
        self.prune_wal = 0

    def ids(self, kind: str, index: int) -> tuple[str, str]:
        return f"{kind}-{self.tag}-{index}", f"{kind}-thread-{self.tag}-{index}"

    async def set_up(self) -> None:
        for kind in ("work", "claim", "raw-work", "raw-claim"):
            self.handles[kind] = []
            for index in range(WORKING_RUNS):
                run_id, thread_id = self.ids(kind, index)
                handle = await self.registry.register(run_id, AGENT_ID, thread_id)
                if kind == "work":
                    await handle.bind_stream_fanout()
                    self.threads.append(thread_id)
                self.handles[kind].append(handle)
                self.raw_seq[run_id] = 0
        run_id, thread_id = self.ids("replay", 0)
        replay = await self.registry.register(run_id, AGENT_ID, thread_id)
        await replay.bind_stream_fanout()
        await replay.publish_many([CHUNK] * REPLAY_CHUNKS)
        self.replay_run = run_id

    async def measure(self, iterations: int) -> dict[str, tuple[float, float]]:
        """p50 (ns) of ours and of the baseline for every operation."""
        self.rounds += 1
        figures: dict[str, tuple[float, float]] = {}
        steps: list[tuple[str, Callable[[], Awaitable[dict[str, Probe]]], int]] = [
            ("handle_by_thread", self.lookup, iterations),
            ("forward", self.forward, iterations),
            ("claim", self.claim, iterations),
            ("publish", self.publish, iterations),
            ("adopt", self.adopt, iterations),
            ("replay 1,000 chunks", self.replay, REPLAY_ITERATIONS),
        ]
        for name, make, count in steps:
            gc.collect()
            p50 = await medians(await make(), count, min(WARMUP, count))
            figures[name] = (p50["ours"], p50["raw"])
        return figures

    async def lookup(self) -> dict[str, Probe]:
        return lookup_probes(self.registry, self.pool, self.threads)

    def decision(self, index: int) -> ToolCallDecision:
        return ToolCallDecision.resume(
            f"call-{index}", {"ok": True}, index, decision_id=f"d{self.rounds}-{index}"
        )

    async def raw_forward(self, handle: RunHandle, index: int) -> None:
        decision = self.decision(index)
        await self.pool.execute(
            RAW_FORWARD,
            handle.run_id,
            handle.thread_id,
            AGENT_ID,
            decision.decision_id,
            decision.target_id,
            '{"ok": true}',
            decision.updated_at,
            RAW_CHANNEL,
        )

    async def forward(self) -> dict[str, Probe]:
        async def ours(index: int) -> int:
            handle = self.handles["work"][index % WORKING_RUNS]
            decision = self.decision(index)
            start = time.perf_counter_ns()
            forwarded = await self.registry.forward_decisions_by_run_id(handle.run_id, [decision])
            elapsed = time.perf_counter_ns() - start
            assert forwarded is not None
            return elapsed

        async def raw(index: int) -> int:
            handle = self.handles["raw-work"][index % WORKING_RUNS]
            start = time.perf_counter_ns()
            await self.raw_forward(handle, index)
            return time.perf_counter_ns() - start

        return {"ours": ours, "raw": raw}

    async def claim(self) -> dict[str, Probe]:
        async def ours(index: int) -> int:
            handle = self.handles["claim"][index % WORKING_RUNS]
            await self.registry.forward_decisions_by_run_id(handle.run_id, [self.decision(index)])
            async with handle.decisions() as inbox:
                start = time.perf_counter_ns()
                delivery = await anext(inbox)
                elapsed = time.perf_counter_ns() - start
                assert await inbox.ack(delivery)
            return elapsed

        async def raw(index: int) -> int:
            handle = self.handles["raw-claim"][index % WORKING_RUNS]
            await self.raw_forward(handle, index)
            start = time.perf_counter_ns()
            row = await self.pool.fetchrow(RAW_CLAIM, handle.run_id)
            elapsed = time.perf_counter_ns() - start
            assert row is not None
            await self.pool.execute(RAW_ACK, row["id"])
            return elapsed

        return {"ours": ours, "raw": raw}

    async def publish(self) -> dict[str, Probe]:
        async def ours(index: int) -> int:
            handle = self.handles["work"][index % WORKING_RUNS]
            start = time.perf_counter_ns()
            await handle.publish(CHUNK)
            return time.perf_counter_ns() - start

        async def raw(index: int) -> int:
            run_id = self.handles["raw-work"][index % WORKING_RUNS].run_id
            self.raw_seq[run_id] += 1
            start = time.perf_counter_ns()
            await self.pool.execute(RAW_PUBLISH, run_id, self.raw_seq[run_id], CHUNK)
            return time.perf_counter_ns() - start

        return {"ours": ours, "raw": raw}

    async def adopt(self) -> dict[str, Probe]:
        async def orphan(kind: str, index: int) -> str:
            run_id, thread_id = self.ids(f"{kind}-{self.rounds}", index)
            await self.pool.execute(INSERT_ORPHAN, run_id, thread_id, AGENT_ID)
            return run_id

        async def ours(index: int) -> int:
            run_id = await orphan("orphan", index)
            start = time.perf_counter_ns()
            adopted = await self.adopter.adopt_orphaned_runs(limit=1)
            elapsed = time.perf_counter_ns() - start
            assert [handle.run_id for handle in adopted] == [run_id], adopted
            assert await self.adopter.remove_by_run_id(run_id)
            return elapsed

        async def raw(index: int) -> int:
            run_id = await orphan("raw-orphan", index)
            start = time.perf_counter_ns()
            row = await self.pool.fetchrow(RAW_ADOPT, OWNER, LEASE)
            elapsed = time.perf_counter_ns() - start
            assert row is not None
            assert row["run_id"] == run_id, row
            await self.pool.execute(RAW_COMPLETE, run_id)
            return elapsed

        return {"ours": ours, "raw": raw}

    async def replay(self) -> dict[str, Probe]:
        async def ours(_index: int) -> int:
            start = time.perf_counter_ns()
            subscription = await self.registry.subscribe_thread_run_stream(
                self.replay_run, after_seq=0
            )
            assert subscription is not None
            async with subscription:
                async for chunk in subscription:
                    if chunk.seq == REPLAY_CHUNKS:
                        break
            return time.perf_counter_ns() - start

        async def raw(_index: int) -> int:
            start = time.perf_counter_ns()
            rows = await self.pool.fetch(RAW_REPLAY, self.replay_run, 0, REPLAY_CHUNKS)
            elapsed = time.perf_counter_ns() - start
            assert len(rows) == REPLAY_CHUNKS
            return elapsed

        return {"ours": ours, "raw": raw}

    async def publish_during_prune(self) -> tuple[float, float, float, int, str]:
        """Publish p99 (ns) without and during a prune of ``PRUNE_RUNS`` runs' chunks, the
        prune's duration (s), the chunks it deleted, and a note."""
        handle = self.handles["work"][0]
        await self.pool.execute(DATE_FOR_PRUNE, PRUNE_RUNS)

        async def publish_until(done: Callable[[], bool]) -> list[int]:
            durations = []
            while not done():
                start = time.perf_counter_ns()
                await handle.publish(CHUNK)
                durations.append(time.perf_counter_ns() - start)
            return durations

        quiet_end = time.monotonic() + QUIET_SECONDS
        without = await publish_until(lambda: time.monotonic() >= quiet_end)
        # a prune is one statement, and every call is bounded by call_timeout (5 s by
        # default): an inspector with a long one lets this prune finish, and the note says
        # whether the default would have cut it short
        settings = RegistrySettings(call_timeout=3600.0)
        async with RegistryInspector(dsn=asyncpg_dsn(self.url), settings=settings) as inspector:
            wal = await self.pool.fetchval(WAL_POSITION)
            started = time.monotonic()
            pruning = asyncio.ensure_future(inspector.prune(timedelta(days=1)))
            during = await publish_until(pruning.done)
            deleted = pruning.result()
            elapsed = time.monotonic() - started
            self.prune_wal = await self.pool.fetchval(WAL_POSITION) - wal
        self.prune_samples = (len(without), len(during))
        limit = RegistrySettings().call_timeout
        note = (
            f"longer than the default call_timeout ({limit:g} s): RunRegistry.prune raises "
            "DatabaseUnavailableError for it (the server may still commit it)"
            if elapsed > limit
            else ""
        )
        return percentile(without, 0.99), percentile(during, 0.99), elapsed, deleted, note


async def load_history(pool: asyncpg.Pool, start: int, end: int) -> tuple[float, bool]:
    """Load ended runs ``start`` .. ``end`` (1-based, inclusive) with their decisions and
    chunks; return the seconds it took and whether the foreign-key triggers were skipped."""
    began = time.monotonic()
    async with pool.acquire() as connection:
        try:
            await connection.execute(FAST_LOAD)
            fast = True
        except asyncpg.InsufficientPrivilegeError:
            fast = False
        try:
            for first in range(start, end + 1, LOAD_BATCH):
                last = min(end, first + LOAD_BATCH - 1)
                async with connection.transaction():
                    await connection.execute(
                        LOAD_RUNS, first, last, AGENT_ID, OWNER, CHUNKS_PER_RUN
                    )
                    await connection.execute(
                        LOAD_DECISIONS, first, last, AGENT_ID, DECISIONS_PER_RUN
                    )
                    await connection.execute(LOAD_CHUNKS, first, last, CHUNKS_PER_RUN, CHUNK)
                done = last - start + 1
                if done % (LOAD_BATCH * 20) == 0 or last == end:
                    print(f"  loaded {done:,} of {end - start + 1:,} runs", flush=True)
        finally:
            if fast:
                await connection.execute("RESET session_replication_role")
        await connection.execute("VACUUM ANALYZE runs, decisions, stream_chunks")
        if fast:
            # write the load's dirty pages out now, not during the measurements
            await connection.execute("CHECKPOINT")
    return time.monotonic() - began, fast


async def print_plans(pool: asyncpg.Pool, bench: Bench) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of the replay's read and the thread lookup (the statements
    of repository.py, read-only), for ``--explain``."""
    statements = {
        "replay read (read_chunks)": (RAW_REPLAY, bench.replay_run, 0, REPLAY_CHUNKS),
        "handle_by_thread (active_run_by_thread)": (RAW_ACTIVE_BY_THREAD, bench.threads[0]),
        "adopt's candidates (adopt_orphans, without its lock)": (ADOPT_CANDIDATES,),
    }
    for name, (statement, *arguments) in statements.items():
        rows = await pool.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", *arguments)
        print(f"  plan of {name}:")
        for row in rows:
            print(f"    {row[0]}")


async def storage(pool: asyncpg.Pool) -> dict[str, Storage]:
    rows = await pool.fetch(STORAGE)
    return {
        row["name"]: Storage(
            row["tuples"],
            row["heap"] / max(1, row["tuples"]),
            row["indexes"] / max(1, row["tuples"]),
        )
        for row in rows
    }


async def run_benchmark(
    server_url: str,
    where: str,
    sizes: Sequence[int],
    iterations: int,
    summary: str | None,
    *,
    explain: bool = False,
) -> None:
    async with benchmark_database(server_url) as database:
        url = database.url
        pool = await raw_pool(url, min_size=2, max_size=4)
        settings = RegistrySettings(inbox_batch=1)
        registry = await RunRegistry.connect(url, worker_id=OWNER, settings=settings)
        adopter = await RunRegistry.connect(url, worker_id=f"{OWNER}-adopter", listen=False)
        try:
            version = await pool.fetchval("SELECT version()")
            print(f"server:   {version}")
            print(f"          {where}, database {database.name}")
            print(
                f"client:   Python {platform.python_version()}, asyncpg {asyncpg.__version__}, "
                f"{os.cpu_count()} CPUs"
            )
            print(
                f"history:  ended runs with {DECISIONS_PER_RUN} acked decisions and "
                f"{CHUNKS_PER_RUN} chunks of {CHUNK_BYTES} bytes each; sizes "
                + ", ".join(f"{size:,}" for size in sizes)
            )
            started = time.monotonic()
            load_before = os.getloadavg()[0]
            bench = Bench(url, registry, adopter, pool)
            await bench.set_up()
            figures: dict[int, dict[str, tuple[float, float]]] = {}
            stored: dict[int, dict[str, Storage]] = {}
            loaded = 0
            for size in sizes:
                print(f"loading history up to {size:,} ended runs ...", flush=True)
                seconds, fast = await load_history(pool, loaded + 1, size)
                loaded = size
                print(
                    f"  {seconds:.1f} s"
                    + ("" if fast else " (foreign-key triggers on: the role is no superuser)")
                )
                stored[size] = await storage(pool)
                print(f"measuring {iterations} iterations per operation ...", flush=True)
                # the lower p50 of two rounds: a neighbour's burst on a shared machine
                # inflates one round, rarely both
                rounds = [await bench.measure(iterations) for _ in range(ROUNDS)]
                figures[size] = {
                    name: (
                        min(one[name][0] for one in rounds),
                        min(one[name][1] for one in rounds),
                    )
                    for name in OPERATIONS
                }
                if explain:
                    await print_plans(pool, bench)
            print("retention: publishing during a prune ...", flush=True)
            without, during, prune_seconds, deleted, note = await bench.publish_during_prune()
            load_after = os.getloadavg()[0]
        finally:
            await adopter.close()
            await registry.close()
            await pool.close()

    smallest = sizes[0]
    headlines: list[Headline] = []
    lines = []
    for operation in OPERATIONS:
        base_ours, base_raw = figures[smallest][operation]
        for size in sizes:
            ours, raw = figures[size][operation]
            growth = ours / base_ours
            goal = "-"
            if size != smallest:
                met = growth <= GOAL_GROWTH
                goal = f"<= {GOAL_GROWTH:g}x " + ("met" if met else "MISSED")
                if size == sizes[-1]:
                    headlines.append(
                        Headline(
                            "history",
                            f"{operation} p50, {size:,} vs {smallest:,} ended runs",
                            micros(ours),
                            f"{micros(raw)} raw asyncpg",
                            f"{growth:.2f}x of smallest ({ours / raw:.2f}x raw)",
                            f"<= {GOAL_GROWTH:g}x of smallest",
                            met,
                        )
                    )
            lines.append(
                [
                    operation,
                    f"{size:,}",
                    micros(ours),
                    micros(raw),
                    f"{ours / raw:.2f}x",
                    f"{growth:.2f}x",
                    f"{raw / base_raw:.2f}x",
                    goal,
                ]
            )
    print()
    print_table(
        [
            "operation (p50)",
            "ended runs",
            "ours",
            "raw asyncpg",
            "ours/raw",
            "ours vs smallest",
            "raw vs smallest",
            "goal",
        ],
        lines,
    )
    print()
    storage_lines = []
    for size in sizes:
        for table, per in (("runs", "run"), ("decisions", "decision"), ("stream_chunks", "chunk")):
            one = stored[size][table]
            storage_lines.append(
                [
                    f"{size:,}",
                    table,
                    f"{one.rows:,}",
                    f"{one.heap:,.0f}",
                    f"{one.indexes:,.0f}",
                    per,
                ]
            )
    print_table(
        ["ended runs", "table", "rows", "table bytes/row", "index bytes/row", "row is a"],
        storage_lines,
    )
    ratio = during / without
    met = ratio <= GOAL_PRUNE
    print()
    print_table(
        ["retention", "ours (during prune)", "baseline (without)", "ratio", "goal"],
        [
            [
                "publish p99",
                micros(during),
                micros(without),
                f"{ratio:.2f}x",
                f"<= {GOAL_PRUNE:g}x " + ("met" if met else "MISSED"),
            ]
        ],
    )
    print(
        f"prune deleted {deleted:,} chunks of {PRUNE_RUNS:,} runs in {prune_seconds:.1f} s "
        f"({deleted / prune_seconds:,.0f} chunks/s), on a history of {sizes[-1]:,} ended runs"
        + (f"; {note}" if note else "")
        + f"; publishes: {bench.prune_samples[0]:,} without, {bench.prune_samples[1]:,} during"
        + f"; WAL written meanwhile: {bench.prune_wal / 1e6:,.0f} MB"
    )
    headlines.append(
        Headline(
            "history",
            f"publish p99 during prune of {deleted:,} chunks",
            micros(during),
            f"{micros(without)} without prune",
            f"{ratio:.2f}x",
            f"<= {GOAL_PRUNE:g}x",
            met,
        )
    )
    write_summary(summary, headlines)
    print(
        "ours/raw: our p50 over the raw asyncpg statement's; vs smallest: the p50 over its "
        f"figure on {smallest:,} ended runs (raw's too, to tell growth from the machine's noise)."
    )
    print_measured(started, load_before, load_after)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(
        "Benchmark the hot calls as history grows (see the module docstring)."
    )
    parser.add_argument(
        "--sizes",
        default=",".join(str(size) for size in DEFAULT_SIZES),
        help="ended runs of history, ascending, comma-separated (default "
        + ",".join(str(size) for size in DEFAULT_SIZES)
        + f"); each has {CHUNKS_PER_RUN} chunks",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=DEFAULT_ITERATIONS,
        help=f"measured calls per operation and size (default {DEFAULT_ITERATIONS})",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="print EXPLAIN (ANALYZE, BUFFERS) of the replay read, the thread lookup and the "
        "adoption's candidate scan at each size",
    )
    arguments = parser.parse_args(argv)
    try:
        arguments.sizes = [int(size.replace("_", "")) for size in arguments.sizes.split(",")]
    except ValueError:
        parser.error("--sizes takes integers separated by commas")
    if arguments.sizes != sorted(set(arguments.sizes)) or arguments.sizes[0] < PRUNE_RUNS:
        parser.error(f"--sizes must ascend, each at least {PRUNE_RUNS:,}")
    if arguments.iterations < 1:
        parser.error("--iterations must be at least 1")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    with benchmark_server(arguments.database_url) as (server_url, where):
        asyncio.run(
            run_benchmark(
                server_url,
                where,
                arguments.sizes,
                arguments.iterations,
                arguments.summary,
                explain=arguments.explain,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
