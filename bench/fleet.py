"""Benchmark streaming at fleet scale: many runs publishing small chunks at once, many readers.

Run it from the checkout, with the project installed (``pip install -e '.[dev]'``)::

    python bench/fleet.py [--database-url URL] [--redis-url URL] [--quick]
                          [--runs N] [--workers N] [--subscribers N] [--duration S]

The server is ``--database-url``, else ``$REGISTRY_DATABASE_URL``, else an embedded PostgreSQL
started in a temporary directory (and shut down at the end). The role must be allowed to create
databases: the benchmark creates a fresh ``registry_bench_<hex>`` database on that server,
migrates it, runs everything against it and drops it at the end. Redis is optional: when
nothing answers at ``--redis-url`` its baselines are skipped with one line.

The shape (defaults; ``--quick`` is 200 runs for 10 s): 1,000 active runs spread over 4 worker
processes, each run publishing one 200-byte chunk every 20 ms (50,000 chunks/s offered), and
one subscriber per run, the subscribers spread over 2 other processes. Each publish is one call
(``RunHandle.publish``); a run has at most one publish in flight, and a run that falls behind
publishes its next chunk as soon as the last returned (no catch-up bursts), so past saturation
the offered rate drops to what the system sustains. The runs' first chunks are staggered over
the 20 ms. Every chunk carries ``time.time_ns()`` taken just before its publish in its first 8
bytes; the subscriber stamps ``time.time_ns()`` when it receives the chunk (all processes share
the machine's clock). After a warm-up (3 s, 2 s with ``--quick``) the measured window lasts
``--duration`` seconds; then the publishers stop, end their streams, and the subscribers get up
to 20 s to drain what is left.

Variants, one after the other in the same run, each with fresh processes and runs, the same
number of worker and subscriber processes, and the same connections per worker process
(``--pool-size``):

* ours: each worker is a ``RunRegistry`` (``RegistrySettings(pool_size=...)``, listening, as a
  worker that holds runs does) that registers its runs and binds their streams; each
  subscriber process is one ``RunRegistry`` with ``subscribe_thread_run_stream(run_id,
  after_seq=0)`` per run, iterated by one task per run. At the end each worker removes its
  runs, which ends the subscriptions after their last chunk.
* raw: raw asyncpg, one statement per chunk on a pool of ``--pool-size`` connections: INSERT of
  the chunk row (seq counted by the client) and ``pg_notify`` of the same JSON shape our
  notification has (kind, run id, seq, the chunk inline in base64; unsigned, unsealed), in one
  statement. Each subscriber process LISTENs on one connection and hands each notification of
  its runs to that run's task through a queue (one task per run, as ours).
* raw batched (a diagnostic baseline, not a goal's yardstick): the floor of a publisher that
  batches across runs. The same statement shape as raw, but each worker process puts the chunks
  of all its runs that are pending when one of its connections is free into one statement
  (``INSERT ... unnest`` and one ``pg_notify`` per chunk): one commit, and one take of the
  notification queue's commit lock, per batch. Each publish still returns only once its chunk
  is committed. Subscribers as raw.
* Redis pub/sub: ``PUBLISH`` of the 200 bytes to one channel per run, from a redis-py client
  with ``--pool-size`` connections per worker; each subscriber process SUBSCRIBEs to its runs'
  channels on one connection and hands messages to per-run tasks through queues.
* Redis Streams: ``XADD`` of the chunk to one stream per run (no trimming: every chunk is kept,
  as the table keeps it); each subscriber process reads its streams with ``XREAD BLOCK``, 50
  streams per connection, and hands entries to per-run tasks through queues.

Figures (each over the measured window):

* committed: publishes that returned in the window, per second; delivered: chunks that
  subscribers received in the window, per second.
* publish p50/p99: the duration of the publish call (waiting for a connection included), for
  calls started in the window.
* publish -> subscriber p50/p99: receipt stamp minus the chunk's stamp, for chunks stamped in
  the window that were delivered before the drain ended (see "undelivered").
* server CPU: PostgreSQL, when the server runs on this machine and its processes are visible in
  /proc: CPU seconds of the backends of the benchmark database (found by their process title)
  plus the server's background processes (WAL writer, checkpointer, background writer, ...),
  and, for reference, of the postmaster's whole process tree (every database: other work on
  this server counts there); else "n/a". Redis: ``INFO cpu`` of the server. Also per chunk.
* client CPU: CPU seconds of the worker and subscriber processes (``time.process_time``).
* WAL bytes per committed chunk: ``pg_current_wal_lsn()`` moved over the window, divided by the
  chunks committed. The WAL position is the server's: another database's writes count too.

Goal (printed in the goal column, met or not): at least 30,000 chunks/s committed and delivered
with publish -> subscriber p99 under 50 ms, and at least 3x the raw per-chunk INSERT.

The baseline SQL lives here, not in ``registry/repository.py``: it is the yardstick, so it must
not share the registry's code path. Every value travels as a bind parameter. ``--profile-dir``
runs the first worker and the first subscriber process of each variant under cProfile during
the window and leaves the ``.pstats`` files there.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import dataclasses
import json
import math
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
from pathlib import Path
from typing import Any

import asyncpg
import redis
import redis.asyncio
import sqlalchemy
from _shared import (
    Child,
    Headline,
    add_summary_option,
    benchmark_database,
    benchmark_server,
    say,
    stdin_reader,
    write_summary,
)
from redis.typing import KeyT, StreamIdT

from registry import RegistrySettings, RunHandle, RunRegistry, StreamSubscription
from registry.database import asyncpg_dsn

CHUNK_BYTES = 200
#: a chunk: the sender's time.time_ns(), the seq the sender counts (baselines), padding
HEADER = struct.Struct("<qq")
PADDING = bytes(index % 251 for index in range(CHUNK_BYTES - HEADER.size))
DEFAULT_RUNS = 1000
DEFAULT_WORKERS = 4
DEFAULT_SUBSCRIBERS = 2
DEFAULT_DURATION = 30.0
DEFAULT_WARMUP = 3.0
DEFAULT_INTERVAL_MS = 20.0
DEFAULT_POOL_SIZE = 8
QUICK_RUNS = 200
QUICK_DURATION = 10.0
QUICK_WARMUP = 2.0
#: seconds the subscribers get after the window to receive what is left
DRAIN = 20.0
#: seconds between the go and the first chunk: every child has read its go by then
GO_DELAY = 1.0
#: Redis Streams subscribers read this many streams per XREAD connection
STREAMS_PER_READER = 50
#: connections of a subscriber process's registry (it reads the table only to catch up)
SUBSCRIBER_POOL_SIZE = 4

GOAL_RATE = 30_000.0
GOAL_P99_NS = 50_000_000
GOAL_RATIO = 3.0

AGENT_ID = "bench-agent"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
RAW_CHANNEL = "bench_fleet_raw"
VARIANTS = ("ours", "raw", "raw-batched", "redis-pubsub", "redis-streams")
VARIANT_NAMES = {
    "ours": "ours",
    "raw": "raw INSERT+NOTIFY",
    "raw-batched": "raw batched (diag.)",
    "redis-pubsub": "Redis PUBLISH",
    "redis-streams": "Redis XADD",
}
REDIS_VARIANTS = ("redis-pubsub", "redis-streams")
CHILD_MODES = ("worker", "subscriber")

# --- the raw baseline: the minimal SQL that does the same job ----------------------------------

RAW_CREATE_RUNS = """
    INSERT INTO runs (run_id, thread_id, agent_id, owner_id, lease_expires_at, stream_seq)
    SELECT run_id, 'thread-' || run_id, $2, $3, now() + interval '1 hour', 0
      FROM unnest($1::text[]) AS run_id
"""

#: one chunk row and its notification (the shape of ours: kind, id, seq, inline data)
RAW_INSERT_NOTIFY = """
    WITH inserted AS (
        INSERT INTO stream_chunks (run_id, seq, data) VALUES ($1, $2, $3)
        RETURNING run_id, seq
    )
    SELECT pg_notify($4, json_build_object(
               'kind', 'chunk', 'id', run_id, 'seq', seq, 'data', $5::text)::text)
      FROM inserted
"""

#: the diagnostic baseline: the chunks of many runs in one statement, one commit, each chunk
#: with its own notification as above (the notifications' commit lock is taken once per batch)
RAW_BATCH_INSERT_NOTIFY = """
    WITH batch AS (
        SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[], $5::text[])
                   AS chunk(run_id, seq, data, inline)
    ), inserted AS (
        INSERT INTO stream_chunks (run_id, seq, data)
        SELECT run_id, seq, data FROM batch
    )
    SELECT count(pg_notify($4, json_build_object(
               'kind', 'chunk', 'id', run_id, 'seq', seq, 'data', inline)::text))
      FROM batch
"""

RAW_END = """
    SELECT pg_notify($1, json_build_object('kind', 'ended', 'id', run_id, 'seq', 0)::text)
      FROM unnest($2::text[]) AS run_id
"""

# --- set-up and inspection (not timed) ---------------------------------------------------------

WAL_POSITION = "SELECT pg_current_wal_lsn()::text"
WAL_BYTES = "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::float8"
#: what the benchmark database's active backends wait on, right now
WAITS = """
    SELECT coalesce(wait_event_type || ':' || wait_event, 'running') AS what, count(*) AS n
      FROM pg_stat_activity
     WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()
     GROUP BY 1
"""
#: checkpoints the server has made (PostgreSQL 17 moved them to pg_stat_checkpointer)
CHECKPOINTS = "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
CHECKPOINTS_17 = "SELECT num_timed + num_requested FROM pg_stat_checkpointer"
#: updates of the runs table's rows (ours bumps the run's stream_seq per publish), and HOT ones
RUNS_UPDATES = """
    SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'runs'
"""
#: seconds between samples of the backends' wait events
WAIT_SAMPLE = 0.02
#: the server's settings that bound a commit-heavy workload
SERVER_SETTINGS = """
    SELECT name, setting FROM pg_settings
     WHERE name IN ('synchronous_commit', 'fsync', 'commit_delay', 'shared_buffers',
                    'max_connections', 'wal_level')
     ORDER BY name
"""


def run_ids(tag: str, variant: str, runs: int) -> list[str]:
    """Every run id of a variant, in order (worker ``i`` owns every ``workers``-th from ``i``)."""
    return [f"fleet-{tag}-{variant}-{number:05d}" for number in range(runs)]


def redis_channel(run_id: str) -> str:
    return f"bench:{run_id}"


def chunk(stamp: int, seq: int) -> bytes:
    return HEADER.pack(stamp, seq) + PADDING


# --- figures ------------------------------------------------------------------------------------


def percentile(ordered: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of sorted values: the smallest with ``fraction`` at or below."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def rate_text(rate: float) -> str:
    return f"{rate:,.0f}/s"


def duration_text(nanoseconds: float) -> str:
    if nanoseconds >= 1e9:
        return f"{nanoseconds / 1e9:,.2f} s"
    if nanoseconds >= 1e6:
        return f"{nanoseconds / 1e6:,.1f} ms"
    return f"{nanoseconds / 1e3:,.0f} µs"


@dataclass
class Outcome:
    """What one variant measured."""

    variant: str
    window: float
    committed_window: int = 0
    committed_total: int = 0
    delivered_window: int = 0
    delivered_total: int = 0
    publish: list[int] = field(default_factory=list)
    end_to_end: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    out_of_order: int = 0
    worker_cpu: float = 0.0
    subscriber_cpu: float = 0.0
    #: CPU seconds of the server's processes for this benchmark, and of its whole tree
    server_cpu: float | None = None
    server_tree_cpu: float | None = None
    wal_bytes: float | None = None
    checkpoints: int | None = None
    #: samples of the benchmark database's active backends by wait event, and sample count
    waits: dict[str, int] = field(default_factory=dict)
    wait_samples: int = 0
    #: updates of runs rows during the variant, and how many were HOT
    runs_updates: tuple[int, int] = (0, 0)
    load: float = 0.0
    drained_in: float = 0.0
    #: statements of the raw-batched variant (warm-up included)
    batches: int = 0

    @property
    def committed_rate(self) -> float:
        return self.committed_window / self.window

    @property
    def delivered_rate(self) -> float:
        return self.delivered_window / self.window

    @property
    def undelivered(self) -> int:
        return self.committed_total - self.delivered_total


@dataclass(frozen=True)
class Row:
    """One line of the result table, already formatted."""

    measure: str
    values: list[str]
    ratio: str = "-"
    goal: str = "-"


def print_table(header: list[str], rows: Sequence[Row]) -> None:
    lines = [header, *([row.measure, *row.values, row.ratio, row.goal] for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    for index, line in enumerate(lines):
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print(" | ".join(cells).rstrip())
        if index == 0:
            print("-+-".join("-" * width for width in widths))


def verdict(goal: str, met: bool) -> str:
    return f"{goal} " + ("met" if met else "MISSED")


def headlines(bench: str, names: Sequence[str], rows: Sequence[Row]) -> list[Headline]:
    """The rows with a goal, for ``--summary``: ours (the first column of figures) against
    the second, named ``names[1]`` (raw here, PGQueuer in bench/decisions.py)."""
    return [
        Headline.from_cells(
            bench,
            row.measure,
            row.values[0],
            f"{row.values[1]} {names[1]}" if len(names) > 1 else "-",
            row.ratio,
            row.goal,
        )
        for row in rows
        if row.goal != "-"
    ]


def result_rows(outcomes: dict[str, Outcome]) -> list[Row]:
    names = list(outcomes)
    ours = outcomes["ours"]
    raw = outcomes.get("raw")
    publish = {name: sorted(one.publish) for name, one in outcomes.items()}
    end_to_end = {name: sorted(one.end_to_end) for name, one in outcomes.items()}

    def each(figure: Callable[[Outcome], str]) -> list[str]:
        return [figure(outcomes[name]) for name in names]

    def ratio(figure: Callable[[Outcome], float | None]) -> str:
        if raw is None:
            return "-"
        mine, theirs = figure(ours), figure(raw)
        if mine is None or theirs is None or theirs == 0:
            return "-"
        return f"{mine / theirs:.2f}x"

    def latency(values: dict[str, list[int]], fraction: float) -> Callable[[Outcome], str]:
        def figure(one: Outcome) -> str:
            ordered = values[one.variant]
            return duration_text(percentile(ordered, fraction)) if ordered else "-"

        return figure

    def latency_value(values: dict[str, list[int]], fraction: float) -> Callable[[Outcome], float]:
        def figure(one: Outcome) -> float:
            ordered = values[one.variant]
            return float(percentile(ordered, fraction)) if ordered else math.nan

        return figure

    ours_p99 = latency_value(end_to_end, 0.99)(ours)
    raw_rate = raw.committed_rate if raw is not None else math.nan
    return [
        Row(
            "committed chunks/s (sustained)",
            each(lambda one: rate_text(one.committed_rate)),
            ratio(lambda one: one.committed_rate),
            verdict(
                f">= {GOAL_RATE:,.0f}/s and >= {GOAL_RATIO:g}x raw",
                ours.committed_rate >= GOAL_RATE and ours.committed_rate >= GOAL_RATIO * raw_rate,
            ),
        ),
        Row(
            "delivered chunks/s",
            each(lambda one: rate_text(one.delivered_rate)),
            ratio(lambda one: one.delivered_rate),
            verdict(f">= {GOAL_RATE:,.0f}/s", ours.delivered_rate >= GOAL_RATE),
        ),
        Row(
            "publish p50",
            each(latency(publish, 0.5)),
            ratio(latency_value(publish, 0.5)),
        ),
        Row(
            "publish p99",
            each(latency(publish, 0.99)),
            ratio(latency_value(publish, 0.99)),
        ),
        Row(
            "publish -> subscriber p50",
            each(latency(end_to_end, 0.5)),
            ratio(latency_value(end_to_end, 0.5)),
        ),
        Row(
            "publish -> subscriber p99",
            each(latency(end_to_end, 0.99)),
            ratio(latency_value(end_to_end, 0.99)),
            verdict(f"< {GOAL_P99_NS / 1e6:g} ms", ours_p99 < GOAL_P99_NS),
        ),
        Row(
            "undelivered after the drain (*)",
            each(lambda one: f"{one.undelivered:,} of {one.committed_total:,}"),
        ),
        Row(
            "server CPU, s (CPUs busy) (**)",
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
            "server CPU per committed chunk",
            each(
                lambda one: (
                    "n/a"
                    if one.server_cpu is None or not one.committed_window
                    else duration_text(one.server_cpu * 1e9 / one.committed_window)
                )
            ),
            ratio(
                lambda one: (
                    None
                    if one.server_cpu is None or not one.committed_window
                    else one.server_cpu / one.committed_window
                )
            ),
        ),
        Row(
            "  PostgreSQL whole tree, s (**)",
            each(
                lambda one: (
                    "-"
                    if one.variant in REDIS_VARIANTS
                    else ("n/a" if one.server_tree_cpu is None else f"{one.server_tree_cpu:,.1f}")
                )
            ),
        ),
        Row(
            "worker processes CPU, s",
            each(lambda one: f"{one.worker_cpu:,.1f} ({one.worker_cpu / one.window:.2f})"),
        ),
        Row(
            "subscriber processes CPU, s",
            each(lambda one: f"{one.subscriber_cpu:,.1f} ({one.subscriber_cpu / one.window:.2f})"),
        ),
        Row(
            "checkpoints in the window (***)",
            each(lambda one: "-" if one.checkpoints is None else f"{one.checkpoints:,}"),
        ),
        Row(
            "WAL bytes per committed chunk (***)",
            each(
                lambda one: (
                    "-"
                    if one.wal_bytes is None or not one.committed_window
                    else f"{one.wal_bytes / one.committed_window:,.0f}"
                )
            ),
            ratio(
                lambda one: (
                    None
                    if one.wal_bytes is None or not one.committed_window
                    else one.wal_bytes / one.committed_window
                )
            ),
        ),
        Row("1-minute load average at the start", each(lambda one: f"{one.load:.2f}")),
    ]


# --- CPU of the server's processes --------------------------------------------------------------


@dataclass(frozen=True)
class ServerProcesses:
    """Where to read the CPU time of a local PostgreSQL server: its postmaster's process id and
    the title its backends of the benchmark database carry."""

    postmaster: int
    database: str

    @classmethod
    def find(cls, backend_pid: int, database: str) -> ServerProcesses | None:
        """The server of our backend ``backend_pid``, if that process is visible here."""
        try:
            stat = _read_stat(backend_pid)
            title = Path(f"/proc/{backend_pid}/cmdline").read_bytes()
        except OSError:
            return None
        if stat is None or b"postgres" not in title or database.encode() not in title:
            return None
        return cls(int(stat[1]), database)

    def sample(self) -> tuple[float, float]:
        """CPU seconds so far: of this benchmark's server processes (the database's backends
        and the background processes), and of the postmaster's whole tree (exited children
        included, as the postmaster's reaped children time)."""
        ticks = os.sysconf("SC_CLK_TCK")
        mine = tree = 0
        own = _read_stat(self.postmaster)
        if own is not None:
            # the postmaster, and the children it has reaped (backends that exited)
            tree += sum(int(value) for value in own[11:15])
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = _read_stat(pid)
                if stat is None or int(stat[1]) != self.postmaster:
                    continue
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue  # exited meanwhile
            used = int(stat[11]) + int(stat[12])
            tree += used
            if self.database in title or not _is_backend(title):
                mine += used
        return mine / ticks, tree / ticks


def _read_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name: state, ppid, ... (``[11]`` and
    ``[12]`` are utime and stime, ``[13]`` and ``[14]`` the reaped children's)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    _, _, rest = text.rpartition(")")
    fields = rest.split()
    return fields if len(fields) > 15 else None


def _is_backend(title: str) -> bool:
    # a backend's title names its user, database and client; background processes' do not
    return "(" in title or "[local]" in title or "idle" in title or "autovacuum worker" in title


# --- the child processes ------------------------------------------------------------------------


@dataclass
class Window:
    """The measured window, as wall-clock nanoseconds, and the go (the first chunk's time)."""

    start: int = 0
    measure: int = 2**62
    end: int = 2**62


class Receipts:
    """A subscriber process's receipts: latencies of chunks stamped in the window, counts."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.latencies = array("q")
        self.total = 0
        self.in_window = 0
        self.out_of_order = 0

    def record(self, data: bytes, received: int, seq: int, previous: int) -> None:
        stamp, _ = HEADER.unpack_from(data)
        self.total += 1
        window = self.window
        if window.measure <= stamp < window.end:
            self.latencies.append(received - stamp)
        if window.measure <= received < window.end:
            self.in_window += 1
        if seq != previous + 1:
            self.out_of_order += 1


class Publishing:
    """A worker process's publishes: durations of calls started in the window, counts."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.durations = array("q")
        self.total = 0
        self.in_window = 0
        self.errors: dict[str, int] = {}


#: publish one chunk of a run (the worker's variant)
Publish = Callable[[int, bytes], Awaitable[None]]


async def publish_loop(
    index: int, runs: int, interval: float, publish: Publish, publishing: Publishing
) -> None:
    """Publish a chunk of run ``index`` every ``interval`` seconds until the window ends."""
    window = publishing.window
    loop = asyncio.get_running_loop()
    # the first chunks of all runs spread over one interval
    start = loop.time() + (window.start - time.time_ns()) / 1e9 + interval * index / runs
    next_at = start
    seq = 0
    while True:
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        stamp = time.time_ns()
        if stamp >= window.end:
            return
        seq += 1
        began = time.perf_counter_ns()
        try:
            await publish(seq, chunk(stamp, seq))
        except Exception as exc:  # counted and reported: the benchmark goes on
            name = type(exc).__name__
            publishing.errors[name] = publishing.errors.get(name, 0) + 1
            seq -= 1
            await asyncio.sleep(interval)
            continue
        done = time.perf_counter_ns()
        publishing.total += 1
        if window.measure <= stamp < window.end:
            publishing.durations.append(done - began)
        finished = stamp + done - began
        if window.measure <= finished < window.end:
            publishing.in_window += 1
        next_at = max(next_at + interval, loop.time())


async def sleep_until(wall_ns: int) -> None:
    await asyncio.sleep(max(0.0, (wall_ns - time.time_ns()) / 1e9))


async def cpu_over(window: Window) -> float:
    """This process's CPU seconds over the window (returns at its end)."""
    await sleep_until(window.measure)
    before = time.process_time()
    await sleep_until(window.end)
    return time.process_time() - before


class Profiled:
    """cProfile over the window in this process, when asked for."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._profile = cProfile.Profile() if path else None

    async def over(self, window: Window) -> None:
        if self._profile is None or self._path is None:
            return
        await sleep_until(window.measure)
        self._profile.enable()
        await sleep_until(window.end)
        self._profile.disable()
        self._profile.dump_stats(self._path)


@dataclass(frozen=True)
class ChildConfig:
    """What a child needs to know, from its command line and environment."""

    mode: str
    variant: str
    index: int
    tag: str
    runs: int
    workers: int
    subscribers: int
    pool_size: int
    interval: float
    notify_window: float | None
    results: str
    profile: str | None
    url: str
    redis_url: str

    def my_runs(self) -> list[tuple[int, str]]:
        ids = run_ids(self.tag, self.variant, self.runs)
        every = self.workers if self.mode == "worker" else self.subscribers
        return [(number, ids[number]) for number in range(self.index, self.runs, every)]


async def read_go(reader: asyncio.StreamReader) -> Window:
    line = (await reader.readline()).decode().split()
    if not line or line[0] != "go":
        raise RuntimeError(f"expected go, got {line!r}")
    start, measure, end = (int(word) for word in line[1:4])
    return Window(start, measure, end)


def write_results(path: str, figures: dict[str, Any], values: array[int]) -> None:
    with open(path + ".bin", "wb") as binary:
        values.tofile(binary)
    Path(path).write_text(json.dumps(figures))


async def worker_main(config: ChildConfig, reader: asyncio.StreamReader) -> None:
    mine = config.my_runs()
    batchers: list[Batcher] = []
    async with contextlib.AsyncExitStack() as stack:
        publishers: dict[int, Publish]
        finish: Callable[[], Awaitable[None]]
        if config.variant == "ours":
            publishers, finish = await ours_worker(config, mine, stack)
        elif config.variant in ("raw", "raw-batched"):
            publishers, finish = await raw_worker(config, mine, stack, batchers)
        else:
            publishers, finish = await redis_worker(config, mine, stack)
        say("ready")
        window = await read_go(reader)
        publishing = Publishing(window)
        profiled = Profiled(config.profile)
        async with asyncio.TaskGroup() as group:
            cpu = group.create_task(cpu_over(window))
            group.create_task(profiled.over(window))
            for number, publish in publishers.items():
                group.create_task(
                    publish_loop(number, config.runs, config.interval, publish, publishing)
                )
        await finish()
        write_results(
            config.results,
            {
                "total": publishing.total,
                "in_window": publishing.in_window,
                "errors": publishing.errors,
                "cpu": cpu.result(),
                "batches": sum(batcher.batches for batcher in batchers),
            },
            publishing.durations,
        )
        say("done")
        await reader.read()


async def ours_worker(
    config: ChildConfig, mine: list[tuple[int, str]], stack: contextlib.AsyncExitStack
) -> tuple[dict[int, Publish], Callable[[], Awaitable[None]]]:
    settings = RegistrySettings(pool_size=config.pool_size)
    if config.notify_window is not None:
        settings = dataclasses.replace(settings, stream_notify_window=config.notify_window)
    registry = await RunRegistry.connect(
        config.url, worker_id=f"fleet-{config.tag}-worker-{config.index}", settings=settings
    )
    stack.push_async_callback(registry.close)
    limit = asyncio.Semaphore(config.pool_size)

    async def open_run(run_id: str) -> RunHandle:
        async with limit:
            handle = await registry.register(run_id, AGENT_ID, f"thread-{run_id}")
            if not await handle.bind_stream_fanout():
                raise RuntimeError(f"could not bind the stream of {run_id}")
            return handle

    handles = await asyncio.gather(*(open_run(run_id) for _, run_id in mine))

    def publisher(handle: RunHandle) -> Publish:
        async def publish(_seq: int, data: bytes) -> None:
            await handle.publish(data)

        return publish

    async def finish() -> None:
        async def remove(handle: RunHandle) -> None:
            async with limit:
                await handle.remove()

        await asyncio.gather(*(remove(handle) for handle in handles))

    numbers = [number for number, _ in mine]
    return {
        number: publisher(handle) for number, handle in zip(numbers, handles, strict=True)
    }, finish


async def raw_worker(
    config: ChildConfig,
    mine: list[tuple[int, str]],
    stack: contextlib.AsyncExitStack,
    batches: list[Batcher],
) -> tuple[dict[int, Publish], Callable[[], Awaitable[None]]]:
    pool = await asyncpg.create_pool(
        asyncpg_dsn(config.url), min_size=config.pool_size, max_size=config.pool_size
    )
    stack.push_async_callback(pool.close)
    ids = [run_id for _, run_id in mine]
    await pool.execute(RAW_CREATE_RUNS, ids, AGENT_ID, f"fleet-{config.tag}-raw-{config.index}")
    batcher: Batcher | None = None
    if config.variant == "raw-batched":
        batcher = Batcher(pool, config.pool_size)
        stack.push_async_callback(batcher.close)
        batches[:] = [batcher]

    def publisher(run_id: str) -> Publish:
        async def publish(seq: int, data: bytes) -> None:
            inline = base64.b64encode(data).decode("ascii")
            await pool.execute(RAW_INSERT_NOTIFY, run_id, seq, data, RAW_CHANNEL, inline)

        async def publish_batched(seq: int, data: bytes) -> None:
            assert batcher is not None
            await batcher.publish(run_id, seq, data)

        return publish if batcher is None else publish_batched

    async def finish() -> None:
        await pool.execute(RAW_END, RAW_CHANNEL, ids)

    return {number: publisher(run_id) for number, run_id in mine}, finish


class Batcher:
    """The raw-batched worker's publishes: whatever is pending when a connection is free goes
    in one statement (group commit in the client); each publish returns once its batch is
    committed."""

    def __init__(self, pool: asyncpg.Pool, connections: int) -> None:
        self._pool = pool
        self._pending: list[tuple[str, int, bytes, asyncio.Future[None]]] = []
        self._ready = asyncio.Event()
        self._tasks = [asyncio.create_task(self._flush()) for _ in range(connections)]
        self.batches = 0

    async def publish(self, run_id: str, seq: int, data: bytes) -> None:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((run_id, seq, data, future))
        self._ready.set()
        await future

    async def _flush(self) -> None:
        while True:
            await self._ready.wait()
            batch, self._pending = self._pending, []
            self._ready.clear()
            if not batch:
                continue
            self.batches += 1
            try:
                await self._pool.execute(
                    RAW_BATCH_INSERT_NOTIFY,
                    [one[0] for one in batch],
                    [one[1] for one in batch],
                    [one[2] for one in batch],
                    RAW_CHANNEL,
                    [base64.b64encode(one[2]).decode("ascii") for one in batch],
                )
            except Exception as exc:
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for *_, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def redis_worker(
    config: ChildConfig, mine: list[tuple[int, str]], stack: contextlib.AsyncExitStack
) -> tuple[dict[int, Publish], Callable[[], Awaitable[None]]]:
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        config.redis_url, max_connections=config.pool_size
    )
    client = redis.asyncio.Redis(connection_pool=pool)
    stack.push_async_callback(pool.aclose)
    stack.push_async_callback(client.aclose)
    streams = config.variant == "redis-streams"

    def publisher(run_id: str) -> Publish:
        channel = redis_channel(run_id)

        async def publish(_seq: int, data: bytes) -> None:
            if streams:
                await client.xadd(channel, {"d": data})
            else:
                await client.publish(channel, data)

        return publish

    async def finish() -> None:
        # an empty chunk ends a run's stream
        for _, run_id in mine:
            if streams:
                await client.xadd(redis_channel(run_id), {"d": b""})
            else:
                await client.publish(redis_channel(run_id), b"")

    return {number: publisher(run_id) for number, run_id in mine}, finish


async def subscriber_main(config: ChildConfig, reader: asyncio.StreamReader) -> None:
    mine = [run_id for _, run_id in config.my_runs()]
    window = Window()
    receipts = Receipts(window)
    async with contextlib.AsyncExitStack() as stack:
        followers: list[Coroutine[Any, Any, None]]
        if config.variant == "ours":
            followers = await ours_subscriber(config, mine, receipts, stack)
        elif config.variant in ("raw", "raw-batched"):
            followers = await raw_subscriber(config, mine, receipts, stack)
        elif config.variant == "redis-pubsub":
            followers = await pubsub_subscriber(config, mine, receipts, stack)
        else:
            followers = await streams_subscriber(config, mine, receipts, stack)
        tasks = [asyncio.create_task(follower) for follower in followers]
        say("ready")
        go = await read_go(reader)
        window.start, window.measure, window.end = go.start, go.measure, go.end
        profiled = Profiled(config.profile)
        cpu = asyncio.create_task(cpu_over(window))
        profiling = asyncio.create_task(profiled.over(window))
        await sleep_until(window.end)
        # every follower ends with its run's stream; the ones still going after the drain
        # are cancelled (their undelivered chunks are counted by the parent)
        done, pending = await asyncio.wait(tasks, timeout=DRAIN)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a failed follower fails the benchmark
        drained = max(0.0, (time.time_ns() - window.end) / 1e9)
        await profiling
        write_results(
            config.results,
            {
                "total": receipts.total,
                "in_window": receipts.in_window,
                "out_of_order": receipts.out_of_order,
                "cpu": await cpu,
                "drained": drained,
                "unfinished": len(pending),
            },
            receipts.latencies,
        )
        say("done")
        await reader.read()


async def ours_subscriber(
    config: ChildConfig, mine: list[str], receipts: Receipts, stack: contextlib.AsyncExitStack
) -> list[Coroutine[Any, Any, None]]:
    settings = RegistrySettings(pool_size=SUBSCRIBER_POOL_SIZE)
    registry = await RunRegistry.connect(
        config.url, worker_id=f"fleet-{config.tag}-subscriber-{config.index}", settings=settings
    )
    stack.push_async_callback(registry.close)

    async def follow(subscription: StreamSubscription) -> None:
        previous = 0
        async for one in subscription:
            received = time.time_ns()
            receipts.record(one.data, received, one.seq, previous)
            previous = one.seq

    followers = []
    for run_id in mine:
        subscription = await registry.subscribe_thread_run_stream(run_id, after_seq=0)
        if subscription is None:
            raise RuntimeError(f"run {run_id} has no stream")
        followers.append(follow(subscription))
    return followers


async def queued(
    queue: asyncio.Queue[bytes | None], receipts: Receipts, decode: Callable[[bytes], bytes]
) -> None:
    """One baseline subscriber: stamp on taking a message from its queue; ``None`` ends it."""
    previous = 0
    while True:
        message = await queue.get()
        received = time.time_ns()
        if message is None:
            return
        data = decode(message)
        _, seq = HEADER.unpack_from(data)
        receipts.record(data, received, seq, previous)
        previous = seq


def as_is(message: bytes) -> bytes:
    return message


async def raw_subscriber(
    config: ChildConfig, mine: list[str], receipts: Receipts, stack: contextlib.AsyncExitStack
) -> list[Coroutine[Any, Any, None]]:
    queues: dict[str, asyncio.Queue[bytes | None]] = {run_id: asyncio.Queue() for run_id in mine}

    def on_notification(_connection: Any, _pid: int, _channel: str, payload: Any) -> None:
        message = json.loads(payload)
        queue = queues.get(message["id"])
        if queue is None:
            return  # another subscriber process's run
        if message["kind"] == "ended":
            queue.put_nowait(None)
        else:
            queue.put_nowait(message["data"].encode("ascii"))

    connection = await asyncpg.connect(asyncpg_dsn(config.url))
    stack.push_async_callback(connection.close)
    await connection.add_listener(RAW_CHANNEL, on_notification)
    return [queued(queue, receipts, base64.b64decode) for queue in queues.values()]


async def pubsub_subscriber(
    config: ChildConfig, mine: list[str], receipts: Receipts, stack: contextlib.AsyncExitStack
) -> list[Coroutine[Any, Any, None]]:
    queues = {redis_channel(run_id).encode(): asyncio.Queue[bytes | None]() for run_id in mine}
    client = redis.asyncio.Redis.from_url(config.redis_url)
    stack.push_async_callback(client.aclose)
    pubsub = client.pubsub()
    stack.push_async_callback(pubsub.aclose)
    await pubsub.subscribe(*queues)
    confirmed = 0
    while confirmed < len(queues):
        message = await pubsub.get_message(timeout=5.0)
        if message is None:
            raise RuntimeError("no SUBSCRIBE confirmation from Redis")
        confirmed += message["type"] == "subscribe"

    async def pump() -> None:
        left = len(queues)
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            data = message["data"]
            queue = queues[message["channel"]]
            queue.put_nowait(data if data else None)
            if not data:
                left -= 1
                if not left:
                    return

    return [pump(), *(queued(queue, receipts, as_is) for queue in queues.values())]


async def streams_subscriber(
    config: ChildConfig, mine: list[str], receipts: Receipts, stack: contextlib.AsyncExitStack
) -> list[Coroutine[Any, Any, None]]:
    queues = {redis_channel(run_id).encode(): asyncio.Queue[bytes | None]() for run_id in mine}
    keys = list(queues)
    groups = [keys[at : at + STREAMS_PER_READER] for at in range(0, len(keys), STREAMS_PER_READER)]

    async def read(group: list[bytes]) -> None:
        client = redis.asyncio.Redis.from_url(config.redis_url)
        try:
            positions: dict[KeyT, StreamIdT] = dict.fromkeys(group, b"0-0")
            while positions:
                # [[key, [(entry id, {field: value})]]] for the streams that had entries
                answer: Any = await client.xread(positions, count=1000, block=1000)
                for key, entries in answer or []:
                    queue = queues[key]
                    for entry_id, fields in entries:
                        data = fields[b"d"]
                        queue.put_nowait(data if data else None)
                        positions[key] = entry_id
                        if not data:
                            del positions[key]
                            break
        finally:
            await client.aclose()

    return [
        *(read(group) for group in groups),
        *(queued(queue, receipts, as_is) for queue in queues.values()),
    ]


async def child_main(config: ChildConfig) -> None:
    reader = await stdin_reader()
    if config.mode == "worker":
        await worker_main(config, reader)
    else:
        await subscriber_main(config, reader)


# --- the parent process -------------------------------------------------------------------------


class FleetChild(Child):
    """A child whose last line may come later than the shared child timeout allows."""

    async def expect_within(self, word: str, timeout: float) -> list[str]:
        stdout = self._process.stdout
        assert stdout is not None
        line = await asyncio.wait_for(stdout.readline(), timeout)
        words = line.decode().split()
        if not words or words[0] != word:
            raise RuntimeError(f"child said {line!r}, expected {word!r}")
        return words[1:]


@dataclass(frozen=True)
class Plan:
    """The shape of the benchmark, from the command line."""

    runs: int
    workers: int
    subscribers: int
    duration: float
    warmup: float
    interval: float
    pool_size: int
    notify_window: float | None
    variants: tuple[str, ...]
    profile_dir: str | None


@contextlib.asynccontextmanager
async def child_groups(
    start: Callable[[str, int], Awaitable[FleetChild]], groups: Sequence[tuple[str, int]]
) -> AsyncIterator[list[list[FleetChild]]]:
    """Start each group of child processes in turn (``mode``, ``count``), each group's
    children at once; all of them are killed on any failure and closed at the end."""
    started: list[FleetChild] = []
    children: list[list[FleetChild]] = []
    try:
        for mode, count in groups:
            outcomes = await asyncio.gather(
                *(start(mode, index) for index in range(count)), return_exceptions=True
            )
            group = [outcome for outcome in outcomes if isinstance(outcome, FleetChild)]
            started.extend(group)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            children.append(group)
        yield children
    except BaseException:
        for child in started:
            await child.kill()
        raise
    for child in started:
        await child.close()


@contextlib.asynccontextmanager
async def fleet(
    plan: Plan, variant: str, tag: str, url: str, redis_url: str, results: Path
) -> AsyncIterator[tuple[list[FleetChild], list[FleetChild]]]:
    """The workers, then (once their runs exist) the subscribers; killed on any failure."""

    def start(mode: str, index: int) -> Awaitable[FleetChild]:
        profile = None
        if plan.profile_dir and index == 0:
            profile = str(Path(plan.profile_dir) / f"fleet-{variant}-{mode}-0.pstats")
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
            "--workers",
            str(plan.workers),
            "--subscribers",
            str(plan.subscribers),
            "--pool-size",
            str(plan.pool_size),
            "--interval-ms",
            str(plan.interval * 1000),
            "--results",
            str(results / f"{variant}-{mode}-{index}.json"),
        ]
        if profile:
            arguments += ["--profile", profile]
        if plan.notify_window is not None:
            arguments += ["--notify-window-ms", str(plan.notify_window * 1000)]
        return FleetChild.start(
            __file__, arguments, {"REGISTRY_DATABASE_URL": url, "BENCH_REDIS_URL": redis_url}
        )

    async with child_groups(
        start, [("worker", plan.workers), ("subscriber", plan.subscribers)]
    ) as groups:
        workers, subscribers = groups
        yield workers, subscribers


def read_results(path: Path) -> tuple[dict[str, Any], array[int]]:
    figures = json.loads(path.read_text())
    values = array("q")
    binary = path.with_name(path.name + ".bin")
    values.frombytes(binary.read_bytes())
    return figures, values


@dataclass
class Bench:
    """What every variant needs: the database, Redis, the server's processes, a tag."""

    plan: Plan
    url: str
    redis_url: str
    connection: asyncpg.Connection
    #: a second connection, for sampling wait events while the first takes the other samples
    sampler: asyncpg.Connection
    version_num: int
    server: ServerProcesses | None
    redis: redis.asyncio.Redis | None
    tag: str

    async def checkpoints(self) -> int:
        query = CHECKPOINTS_17 if self.version_num >= 170000 else CHECKPOINTS
        return int(await self.connection.fetchval(query))

    async def runs_updates(self) -> tuple[int, int]:
        row = await self.connection.fetchrow(RUNS_UPDATES)
        return (0, 0) if row is None else (int(row["n_tup_upd"]), int(row["n_tup_hot_upd"]))

    async def sample_waits(self, outcome: Outcome, end: int) -> None:
        """Count the wait events of the database's active backends until ``end``."""
        while time.time_ns() < end:
            for row in await self.sampler.fetch(WAITS):
                outcome.waits[row["what"]] = outcome.waits.get(row["what"], 0) + row["n"]
            outcome.wait_samples += 1
            await asyncio.sleep(WAIT_SAMPLE)

    async def server_sample(self, variant: str) -> tuple[float | None, float | None, str | None]:
        """CPU seconds of the server (ours, whole tree) and the WAL position, now."""
        if variant in REDIS_VARIANTS:
            assert self.redis is not None
            info = await self.redis.info("cpu")
            used = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
            return used, None, None
        wal = await self.connection.fetchval(WAL_POSITION)
        if self.server is None:
            return None, None, str(wal)
        mine, tree = self.server.sample()
        return mine, tree, str(wal)

    async def variant(self, variant: str) -> Outcome:
        plan = self.plan
        print(
            f"{VARIANT_NAMES[variant]}: {plan.runs:,} runs on {plan.workers} worker processes, "
            f"{plan.subscribers} subscriber processes, {plan.warmup:g} s warm-up + "
            f"{plan.duration:g} s ...",
            flush=True,
        )
        outcome = Outcome(variant, plan.duration, load=os.getloadavg()[0])
        updates_before = await self.runs_updates()
        with tempfile.TemporaryDirectory(prefix="fleet") as directory:
            results = Path(directory)
            async with fleet(plan, variant, self.tag, self.url, self.redis_url, results) as (
                workers,
                subscribers,
            ):
                start = time.time_ns() + int(GO_DELAY * 1e9)
                measure = start + int(plan.warmup * 1e9)
                end = measure + int(plan.duration * 1e9)
                for child in [*workers, *subscribers]:
                    await child.send("go", str(start), str(measure), str(end))
                await sleep_until(measure)
                before = await self.server_sample(variant)
                checkpoints = await self.checkpoints()
                sampling = None
                if variant not in REDIS_VARIANTS:
                    sampling = asyncio.create_task(self.sample_waits(outcome, end))
                await sleep_until(end)
                after = await self.server_sample(variant)
                outcome.checkpoints = await self.checkpoints() - checkpoints
                if sampling is not None:
                    await sampling
                for child in workers:
                    await child.expect_within("done", 60.0)
                for child in subscribers:
                    await child.expect_within("done", DRAIN + 60.0)
            if before[0] is not None and after[0] is not None:
                outcome.server_cpu = after[0] - before[0]
            if before[1] is not None and after[1] is not None:
                outcome.server_tree_cpu = after[1] - before[1]
            if before[2] is not None and after[2] is not None:
                outcome.wal_bytes = await self.connection.fetchval(WAL_BYTES, after[2], before[2])
            for index in range(plan.workers):
                figures, values = read_results(results / f"{variant}-worker-{index}.json")
                outcome.committed_total += figures["total"]
                outcome.committed_window += figures["in_window"]
                outcome.worker_cpu += figures["cpu"]
                outcome.batches += figures["batches"]
                for name, count in figures["errors"].items():
                    outcome.errors[name] = outcome.errors.get(name, 0) + count
                outcome.publish.extend(values)
            for index in range(plan.subscribers):
                figures, values = read_results(results / f"{variant}-subscriber-{index}.json")
                outcome.delivered_total += figures["total"]
                outcome.delivered_window += figures["in_window"]
                outcome.out_of_order += figures["out_of_order"]
                outcome.subscriber_cpu += figures["cpu"]
                outcome.drained_in = max(outcome.drained_in, figures["drained"])
                outcome.end_to_end.extend(values)
        # the statistics reach pg_stat_user_tables within a second of the commits
        await asyncio.sleep(1.0)
        updates_after = await self.runs_updates()
        outcome.runs_updates = (
            updates_after[0] - updates_before[0],
            updates_after[1] - updates_before[1],
        )
        if variant in REDIS_VARIANTS and self.redis is not None:
            keys = [redis_channel(run_id) for run_id in run_ids(self.tag, variant, plan.runs)]
            for at in range(0, len(keys), 500):
                await self.redis.delete(*keys[at : at + 500])
        return outcome


async def connect_redis(url: str) -> tuple[redis.asyncio.Redis | None, str]:
    """A Redis client if one answers at ``url``, and a line describing it (or the skip)."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        info = await asyncio.wait_for(client.info("server"), 2.0)
    except (OSError, redis.RedisError, TimeoutError) as exc:
        await client.aclose()
        return None, f"Redis:    skipped, nothing answered at {url} ({type(exc).__name__}: {exc})"
    return client, f"Redis:    {info.get('redis_version', '?')} at {url}"


async def run_benchmark(
    plan: Plan, server_url: str, where: str, redis_url: str, summary: str | None = None
) -> None:
    async with benchmark_database(server_url) as database:
        url, name = database.url, database.name
        connection = await asyncpg.connect(asyncpg_dsn(url))
        sampler = await asyncpg.connect(asyncpg_dsn(url))
        redis_client, redis_line = await connect_redis(redis_url)
        try:
            version = await connection.fetchval("SELECT version()")
            settings = await connection.fetch(SERVER_SETTINGS)
            backend = await connection.fetchval("SELECT pg_backend_pid()")
            server = ServerProcesses.find(int(backend), name)
            print(f"server:   {version}")
            print(f"          {where}, database {name}")
            print("          " + ", ".join(f"{row['name']}={row['setting']}" for row in settings))
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
                f"SQLAlchemy {sqlalchemy.__version__}, redis-py {redis.__version__}, "
                f"{type(asyncio.get_running_loop()).__name__}, {os.cpu_count()} CPUs"
            )
            print(redis_line)
            offered = plan.runs / plan.interval
            print(
                f"shape:    {plan.runs:,} runs x 1 chunk of {CHUNK_BYTES} bytes every "
                f"{plan.interval * 1000:g} ms = {offered:,.0f} chunks/s offered; "
                f"{plan.workers} worker processes with {plan.pool_size} connections each, "
                f"{plan.subscribers} subscriber processes"
            )
            defaults = RegistrySettings()
            window = plan.notify_window
            if window is None:
                window = defaults.stream_notify_window
            print(
                f"ours:     workers' RegistrySettings(pool_size={plan.pool_size}), "
                f"stream_notify_window {window * 1000:g} ms"
                + (" (the default)" if plan.notify_window is None else " (NOT the default)")
                + f", inline_chunk_bytes {defaults.inline_chunk_bytes}; subscriber processes' "
                f"pool_size {SUBSCRIBER_POOL_SIZE}"
            )
            print()
            variants = [
                variant
                for variant in plan.variants
                if redis_client is not None or variant not in REDIS_VARIANTS
            ]
            bench = Bench(
                plan,
                url,
                redis_url,
                connection,
                sampler,
                database.version_num,
                server,
                redis_client,
                secrets.token_hex(4),
            )
            started = time.monotonic()
            load_before = os.getloadavg()[0]
            outcomes = {variant: await bench.variant(variant) for variant in variants}
            load_after = os.getloadavg()[0]
        finally:
            await connection.close()
            await sampler.close()
            if redis_client is not None:
                await redis_client.aclose()
    print()
    header = ["measure", *(VARIANT_NAMES[name] for name in outcomes), "ours ÷ raw", "goal"]
    if "ours" in outcomes:
        print_table(header, result_rows(outcomes))
        write_summary(summary, headlines("fleet", header[1:], result_rows(outcomes)))
    print()
    print(
        "ours ÷ raw: ratio of the figures themselves (rates: higher is better; latencies, CPU, "
        "WAL: lower is\nbetter). Figures in parentheses: CPU seconds per second of the window "
        "(how many CPUs were busy)."
    )
    print(
        f"(*)   chunks committed (warm-up and window) that no subscriber had received "
        f"{DRAIN:g} s after the window\n      ended; latency percentiles cover only delivered "
        "chunks. Longest drain: "
        + ", ".join(f"{name} {one.drained_in:.1f} s" for name, one in outcomes.items())
    )
    print(
        "(**)  PostgreSQL: the benchmark database's backends plus the server's background "
        "processes (WAL\n      writer, checkpointer, ...); the whole tree counts every "
        "database on the server (other work on\n      this machine too). Redis: INFO cpu of "
        "redis-server (used_cpu_sys + used_cpu_user)."
    )
    print(
        "(***) pg_current_wal_lsn() over the window, and checkpoints made by the server "
        "meanwhile: server-wide,\n      so another database's writes count too (and each "
        "checkpoint makes the next write of every\n      page log a full-page image)."
    )
    print(
        f"(****) what the benchmark database's active backends were doing, sampled from "
        f"pg_stat_activity every\n      {WAIT_SAMPLE * 1000:g} ms over the window (share of "
        "samples; 'running' = no wait event: on a CPU or waiting for one):"
    )
    for name, one in outcomes.items():
        if not one.wait_samples:
            continue
        seen = sum(one.waits.values())
        top = sorted(one.waits.items(), key=lambda item: -item[1])[:6]
        print(
            f"      {name}: {seen / one.wait_samples:.1f} active on average; "
            + ", ".join(f"{what} {count / seen:.0%}" for what, count in top)
        )
    for name, one in outcomes.items():
        updated, hot = one.runs_updates
        if updated:
            print(
                f"runs rows updated during {name} (stream seq per publish, leases): "
                f"{updated:,}, of which HOT {hot / updated:.0%}"
            )
    batched = outcomes.get("raw-batched")
    if batched is not None:
        per = batched.committed_total / batched.batches if batched.batches else 0.0
        print(
            "(diag.) raw batched: a diagnostic baseline, the floor of a publisher that batches "
            "across runs: each\n      worker process puts the chunks of all its runs pending "
            "when one of its connections is free\n      into one statement (INSERT ... unnest "
            "and one pg_notify per chunk, as raw), so one commit and\n      one notification "
            f"lock carry many chunks; each publish returns once its batch committed.\n      "
            f"{batched.batches:,} statements, {per:,.1f} chunks each on average."
        )
    problems = [
        f"{name}: {count:,} {error}"
        for name, one in outcomes.items()
        for error, count in sorted(one.errors.items())
    ] + [
        f"{name}: {one.out_of_order:,} chunks out of order"
        for name, one in outcomes.items()
        if one.out_of_order
    ]
    print("publish errors, order: " + ("; ".join(problems) if problems else "none"))
    if plan.profile_dir:
        print(f"profiles: {plan.profile_dir}/fleet-<variant>-<worker|subscriber>-0.pstats")
    print(
        f"measured in {time.monotonic() - started:.1f} s; 1-minute load average "
        f"{load_before:.2f} before, {load_after:.2f} after"
    )


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark streaming at fleet scale (see the module docstring)."
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("REGISTRY_DATABASE_URL"),
        help="PostgreSQL server to benchmark on; a fresh database is created there "
        "(default: $REGISTRY_DATABASE_URL, else an embedded PostgreSQL)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis for the pub/sub and Streams baselines, skipped if none answers "
        f"(default: $BENCH_REDIS_URL, else {DEFAULT_REDIS_URL})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK_RUNS} runs for {QUICK_DURATION:g} s "
        f"(after {QUICK_WARMUP:g} s of warm-up) unless given otherwise",
    )
    parser.add_argument("--runs", type=int, help=f"active runs (default {DEFAULT_RUNS:,})")
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"publishing processes (default {DEFAULT_WORKERS})",
    )
    parser.add_argument(
        "--subscribers",
        type=int,
        default=DEFAULT_SUBSCRIBERS,
        help=f"subscriber processes (default {DEFAULT_SUBSCRIBERS})",
    )
    parser.add_argument(
        "--duration", type=float, help=f"measured seconds (default {DEFAULT_DURATION:g})"
    )
    parser.add_argument("--warmup", type=float, help=f"seconds (default {DEFAULT_WARMUP:g})")
    parser.add_argument(
        "--interval-ms",
        type=float,
        default=DEFAULT_INTERVAL_MS,
        help=f"ms between a run's chunks (default {DEFAULT_INTERVAL_MS:g})",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=DEFAULT_POOL_SIZE,
        help=f"connections per worker process, every variant (default {DEFAULT_POOL_SIZE})",
    )
    parser.add_argument(
        "--notify-window-ms",
        type=float,
        help="ours only, for diagnosis: the workers' RegistrySettings.stream_notify_window "
        "(default: the registry's default)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)",
    )
    parser.add_argument(
        "--profile-dir",
        help="run the first worker and subscriber process of each variant under cProfile "
        "over the window and write .pstats files here",
    )
    add_summary_option(parser)
    parser.add_argument("--child", choices=CHILD_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    quick = arguments.quick
    if arguments.runs is None:
        arguments.runs = QUICK_RUNS if quick else DEFAULT_RUNS
    if arguments.duration is None:
        arguments.duration = QUICK_DURATION if quick else DEFAULT_DURATION
    if arguments.warmup is None:
        arguments.warmup = QUICK_WARMUP if quick else DEFAULT_WARMUP
    variants = tuple(name.strip() for name in arguments.variants.split(",") if name.strip())
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "ours" not in variants:
        parser.error("--variants must include ours")
    arguments.variants = variants
    for name in ("runs", "workers", "subscribers", "pool_size"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if arguments.duration <= 0 or arguments.warmup < 0 or arguments.interval_ms <= 0:
        parser.error("--duration and --interval-ms must be positive, --warmup not negative")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    window = None if arguments.notify_window_ms is None else arguments.notify_window_ms / 1000
    if arguments.child:
        config = ChildConfig(
            mode=arguments.child,
            variant=arguments.variant,
            index=arguments.index,
            tag=arguments.tag,
            runs=arguments.runs,
            workers=arguments.workers,
            subscribers=arguments.subscribers,
            pool_size=arguments.pool_size,
            interval=arguments.interval_ms / 1000,
            notify_window=window,
            results=arguments.results,
            profile=arguments.profile,
            url=os.environ["REGISTRY_DATABASE_URL"],
            redis_url=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        )
        asyncio.run(child_main(config))
        return 0
    plan = Plan(
        runs=arguments.runs,
        workers=arguments.workers,
        subscribers=arguments.subscribers,
        duration=arguments.duration,
        warmup=arguments.warmup,
        interval=arguments.interval_ms / 1000,
        pool_size=arguments.pool_size,
        notify_window=window,
        variants=arguments.variants,
        profile_dir=arguments.profile_dir,
    )
    with benchmark_server(arguments.database_url) as (server_url, where):
        asyncio.run(run_benchmark(plan, server_url, where, arguments.redis_url, arguments.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
