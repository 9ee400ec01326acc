"""Benchmark the cost of watching: one idle process holding many active runs.

Run it from the checkout, with the project installed (``pip install -e '.[dev]'``)::

    python bench/watching.py [--database-url URL] [--runs N] [--waiters N] [--window S]
                             [--summary PATH]

The server is ``--database-url``, else ``$REGISTRY_DATABASE_URL``, else an embedded PostgreSQL
started in a temporary directory (and shut down at the end). The benchmark creates a fresh
``registry_bench_<hex>`` database, migrates it, and drops it at the end.

The shape (defaults): a child process with one ``RunRegistry`` (listening, default settings)
holds ``--runs`` (10,000) active runs, bulk-inserted as its own and taken with
``resume_owned_runs()``; every run's ``cancellation_token().wait()`` is parked in a task of its
own, and ``--waiters`` (1,000) of the runs also have an open decision inbox and a stream
subscription, each iterated by a task parked for the next item. Nothing changes in the
database meanwhile. Once they all made their first read (``SETTLE`` seconds) and the server's
statistics caught up (``QUIET_BEFORE`` seconds), the parent measures an idle window of
``--window`` seconds (20):

* CPU of the child (``/proc/<pid>/stat``), in percent of one core;
* CPU of the server, when it runs on this machine: the benchmark database's backends plus the
  server's background processes, from ``/proc`` (as ``bench/fleet.py`` reads it);
* transactions per second committed in the benchmark database (``pg_stat_database.xact_commit``:
  each statement of the safety re-check, the heartbeat and the listener's health probe is one),
  rows read per second (``tup_returned + tup_fetched``) and runs rows updated per second
  (``pg_stat_user_tables.n_tup_upd``): the work the watching asks of the server;
* memory per watched run: the child's RSS grown by holding the runs, and the bytes
  ``tracemalloc`` traced while it took them, over the runs;
* LISTEN connections of the registry on the benchmark database (``pg_stat_activity``).

Baseline: the same child holding zero runs (the fixed cost of an idle registry), measured the
same way in the same run; the table prints both and the increment per watched run. Goals: the
holding process under 2% of a core; re-check work (rows read per second) that does not grow
with the runs watched while nothing changes; one LISTEN connection. The statistics views are
flushed by the backends about once a second, so a window's counts are exact to about a second's
worth.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import secrets
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from _shared import (
    Child,
    Headline,
    benchmark_database,
    benchmark_parser,
    benchmark_server,
    print_measured,
    print_table,
    say,
    stdin_reader,
    write_summary,
)
from fleet import ServerProcesses

from registry import RegistrySettings, RunRegistry
from registry.database import asyncpg_dsn
from registry.listener import LISTENER_APPLICATION_NAME

DEFAULT_RUNS = 10_000
DEFAULT_WAITERS = 1_000
DEFAULT_WINDOW = 20.0
#: seconds the child gives its inboxes and subscriptions to make their first reads
SETTLE = 3.0
#: seconds the parent waits before its window: an idle backend flushes its statistics within
#: 10 s, so the child's first reads are all counted before the window starts
QUIET_BEFORE = 11.0
AGENT_ID = "bench-agent"
GOAL_CPU = 2.0
#: rows read per second per watched run while nothing changes: "does not grow" within noise
GOAL_ROWS_PER_RUN = 0.01
GOAL_LISTENERS = 1

BULK_INSERT_RUNS = """
    INSERT INTO runs (run_id, thread_id, agent_id, owner_id, lease_expires_at, stream_seq)
    SELECT $1 || '-' || g, $1 || '-thread-' || g, $2, $1, now() + interval '15 seconds', 0
      FROM generate_series(1, $3::bigint) AS g
"""

DATABASE_COUNTS = """
    SELECT xact_commit, tup_returned + tup_fetched AS rows_read
      FROM pg_stat_database WHERE datname = current_database()
"""

RUNS_UPDATED = "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'runs'"

WAL_POSITION = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"

LISTENERS = """
    SELECT count(*) FROM pg_stat_activity
     WHERE datname = current_database() AND application_name = $1
"""


# --- the child: one registry holding the runs ----------------------------------------------------


def rss_bytes() -> int:
    """This process's resident set size."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


async def child_main(url: str, worker_id: str, waiters: int) -> None:
    reader = await stdin_reader()
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    registry = await RunRegistry.connect(url, worker_id=worker_id, settings=RegistrySettings())
    tasks: list[asyncio.Task[None]] = []
    try:
        handles = await registry.resume_owned_runs()
        tokens = [handle.cancellation_token() for handle in handles]
        tasks += [asyncio.create_task(token.wait()) for token in tokens]

        async def drain_inbox(index: int) -> None:
            async with handles[index].decisions() as inbox:
                async for delivery in inbox:
                    await inbox.ack(delivery)

        async def follow(index: int) -> None:
            subscription = await registry.subscribe_thread_run_stream(handles[index].run_id)
            assert subscription is not None
            async with subscription:
                async for _chunk in subscription:
                    pass

        for index in range(min(waiters, len(handles))):
            tasks.append(asyncio.create_task(drain_inbox(index)))
            tasks.append(asyncio.create_task(follow(index)))
        # let every inbox and subscription make its first read and park
        await asyncio.sleep(SETTLE)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - traced_before
        tracemalloc.stop()  # its bookkeeping would count in the idle window's CPU
        rss_after = rss_bytes()
        say("ready", len(handles), rss_before, rss_after, traced)
        await reader.read()  # the parent closes our stdin when its window is over
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await registry.close()


# --- the parent -----------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    _, _, rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")
    fields = rest.split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Idle:
    """What one idle window measured."""

    runs: int
    window: float
    client_cpu: float
    server_cpu: float | None
    transactions: int
    rows_read: int
    runs_updated: int
    #: server-wide: another database's writes count too
    wal_bytes: int
    listeners: int
    rss_grown: int
    traced: int

    def per_second(self, value: float) -> float:
        return value / self.window


async def idle_window(
    url: str,
    connection: asyncpg.Connection,
    server: ServerProcesses | None,
    *,
    runs: int,
    waiters: int,
    window: float,
) -> Idle:
    """Start a child holding ``runs`` runs (``waiters`` of them with an inbox and a
    subscription) and measure it idle for ``window`` seconds."""
    worker_id = f"watch-{runs}-{secrets.token_hex(3)}"
    if runs:
        await connection.execute(BULK_INSERT_RUNS, worker_id, AGENT_ID, runs)
    arguments = ["--child", "--worker-id", worker_id, "--waiters", str(waiters)]
    child = await Child.start(__file__, arguments, {"REGISTRY_DATABASE_URL": url})
    try:
        held, rss_before, rss_after, traced = (int(word) for word in child.ready)
        assert held == runs, (held, runs)
        await asyncio.sleep(QUIET_BEFORE)
        listeners = int(await connection.fetchval(LISTENERS, LISTENER_APPLICATION_NAME))
        updated = int(await connection.fetchval(RUNS_UPDATED))
        wal = int(await connection.fetchval(WAL_POSITION))
        counts = await connection.fetchrow(DATABASE_COUNTS)
        server_before = server.sample()[0] if server is not None else None
        cpu_before = process_cpu(child.pid)
        started = time.monotonic()
        await asyncio.sleep(window)
        elapsed = time.monotonic() - started
        cpu_after = process_cpu(child.pid)
        server_after = server.sample()[0] if server is not None else None
        counts_after = await connection.fetchrow(DATABASE_COUNTS)
        assert counts is not None
        assert counts_after is not None
        updated_after = int(await connection.fetchval(RUNS_UPDATED))
        wal_after = int(await connection.fetchval(WAL_POSITION))
        await child.close()
    finally:
        await child.kill()
    return Idle(
        runs=runs,
        window=elapsed,
        client_cpu=cpu_after - cpu_before,
        server_cpu=None
        if server_before is None or server_after is None
        else server_after - server_before,
        # the parent's own read of the counters commits too: one transaction
        transactions=counts_after["xact_commit"] - counts["xact_commit"] - 1,
        rows_read=counts_after["rows_read"] - counts["rows_read"],
        runs_updated=updated_after - updated,
        wal_bytes=wal_after - wal,
        listeners=listeners,
        rss_grown=rss_after - rss_before,
        traced=traced,
    )


def percent(cpu: float | None, idle: Idle) -> str:
    return "n/a" if cpu is None else f"{100 * idle.per_second(cpu):.2f}%"


def verdict(goal: str, met: bool) -> str:
    return f"{goal} " + ("met" if met else "MISSED")


def report(fixed: Idle, held: Idle) -> list[Headline]:
    """Print the table; return the headline figures."""
    runs = held.runs

    def per_run(value: float) -> str:
        return f"{value / runs:,.4f}"

    cpu_met = 100 * held.per_second(held.client_cpu) < GOAL_CPU
    rows_increment = held.per_second(held.rows_read) - fixed.per_second(fixed.rows_read)
    rows_met = rows_increment / runs < GOAL_ROWS_PER_RUN
    listeners_met = held.listeners == GOAL_LISTENERS
    rss_per_run = (held.rss_grown - fixed.rss_grown) / runs
    traced_per_run = (held.traced - fixed.traced) / runs
    lines = [
        [
            "holding process CPU, % of a core",
            percent(fixed.client_cpu, fixed),
            percent(held.client_cpu, held),
            per_run(100 * (held.per_second(held.client_cpu) - fixed.per_second(fixed.client_cpu)))
            + " %",
            verdict(f"< {GOAL_CPU:g}%", cpu_met),
        ],
        [
            "server CPU (database backends + background), % of a core",
            percent(fixed.server_cpu, fixed),
            percent(held.server_cpu, held),
            "n/a"
            if held.server_cpu is None or fixed.server_cpu is None
            else per_run(
                100 * (held.per_second(held.server_cpu) - fixed.per_second(fixed.server_cpu))
            )
            + " %",
            "-",
        ],
        [
            "transactions/s (re-check, heartbeat, probe)",
            f"{fixed.per_second(fixed.transactions):,.1f}",
            f"{held.per_second(held.transactions):,.1f}",
            per_run(held.per_second(held.transactions) - fixed.per_second(fixed.transactions)),
            "-",
        ],
        [
            "rows read/s",
            f"{fixed.per_second(fixed.rows_read):,.0f}",
            f"{held.per_second(held.rows_read):,.0f}",
            per_run(rows_increment),
            verdict(f"< {GOAL_ROWS_PER_RUN:g} per run (grows with change, not size)", rows_met),
        ],
        [
            "runs rows updated/s (lease renewals)",
            f"{fixed.per_second(fixed.runs_updated):,.0f}",
            f"{held.per_second(held.runs_updated):,.0f}",
            per_run(held.per_second(held.runs_updated) - fixed.per_second(fixed.runs_updated)),
            "-",
        ],
        [
            "WAL bytes/s (server-wide)",
            f"{fixed.per_second(fixed.wal_bytes):,.0f}",
            f"{held.per_second(held.wal_bytes):,.0f}",
            per_run(held.per_second(held.wal_bytes) - fixed.per_second(fixed.wal_bytes)),
            "-",
        ],
        [
            "RSS grown by holding, bytes",
            f"{fixed.rss_grown:,}",
            f"{held.rss_grown:,}",
            f"{rss_per_run:,.0f}",
            "-",
        ],
        [
            "tracemalloc traced while taking them, bytes",
            f"{fixed.traced:,}",
            f"{held.traced:,}",
            f"{traced_per_run:,.0f}",
            "-",
        ],
        [
            "registry LISTEN connections",
            f"{fixed.listeners}",
            f"{held.listeners}",
            "-",
            verdict(f"== {GOAL_LISTENERS}", listeners_met),
        ],
    ]
    print_table(
        [
            "idle, per second of the window",
            "0 runs (fixed cost)",
            f"{runs:,} runs",
            "per run",
            "goal",
        ],
        lines,
    )

    def headline(name: str, line: list[str], met: bool | None) -> Headline:
        # the ratio column carries the increment per watched run: a ratio to an idle
        # registry's near-zero figure says nothing
        per = "-" if line[3] == "-" else f"+{line[3]} per run"
        goal = line[4].rsplit(" ", 1)[0] if met is not None else ""
        return Headline("watching", name, line[2], f"{line[1]} with 0 runs", per, goal, met)

    return [
        headline(f"idle CPU, % of a core, holding {runs:,} runs", lines[0], cpu_met),
        headline(f"server CPU, % of a core, {runs:,} idle runs", lines[1], None),
        headline(f"rows read/s, {runs:,} idle runs", lines[3], rows_met),
        headline(f"runs rows updated/s, {runs:,} idle runs", lines[4], None),
        Headline(
            "watching",
            "memory per watched run (RSS / tracemalloc)",
            f"{rss_per_run:,.0f} B / {traced_per_run:,.0f} B",
            "-",
            "-",
            "",
            None,
        ),
        headline("LISTEN connections", lines[8], listeners_met),
    ]


async def run_benchmark(
    server_url: str, where: str, runs: int, waiters: int, window: float, summary: str | None
) -> None:
    async with benchmark_database(server_url) as database:
        url = database.url
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            version = await connection.fetchval("SELECT version()")
            backend = await connection.fetchval("SELECT pg_backend_pid()")
            server = ServerProcesses.find(int(backend), database.name)
            print(f"server:   {version}")
            print(f"          {where}, database {database.name}")
            print(
                "          server CPU: "
                + ("read from /proc" if server is not None else "n/a (not visible here)")
            )
            settings = RegistrySettings()
            print(
                f"client:   Python {platform.python_version()}, asyncpg {asyncpg.__version__}, "
                f"{os.cpu_count()} CPUs; safety_interval {settings.safety_interval:g} s, "
                f"heartbeat_interval {settings.heartbeat_interval:g} s, health_interval "
                f"{settings.health_interval:g} s"
            )
            print(
                f"shape:    {runs:,} runs held, each token waited on; {waiters:,} of them with "
                f"an open inbox and a subscription; idle window {window:g} s"
            )
            started = time.monotonic()
            load_before = os.getloadavg()[0]
            fixed = await idle_window(url, connection, server, runs=0, waiters=0, window=window)
            held = await idle_window(
                url, connection, server, runs=runs, waiters=waiters, window=window
            )
            load_after = os.getloadavg()[0]
        finally:
            await connection.close()
    print()
    write_summary(summary, report(fixed, held))
    print()
    print(
        "per run: (figure with the runs - figure with none) / runs. Counters from "
        "pg_stat_database and pg_stat_user_tables\n(the benchmark database only; flushed by "
        "the backends about once a second); the parent's own reads are not counted."
    )
    print_measured(started, load_before, load_after)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(
        "Benchmark the cost of watching idle runs (see the module docstring)."
    )
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help=f"runs held ({DEFAULT_RUNS:,})"
    )
    parser.add_argument(
        "--waiters",
        type=int,
        default=DEFAULT_WAITERS,
        help=f"runs with an open inbox and a subscription ({DEFAULT_WAITERS:,})",
    )
    parser.add_argument(
        "--window", type=float, default=DEFAULT_WINDOW, help=f"idle seconds ({DEFAULT_WINDOW:g})"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.runs < 1 or not 0 <= arguments.waiters <= arguments.runs:
        parser.error("--runs must be at least 1 and --waiters between 0 and --runs")
    if arguments.window <= 0:
        parser.error("--window must be positive")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.child:
        url = os.environ["REGISTRY_DATABASE_URL"]
        asyncio.run(child_main(url, arguments.worker_id, arguments.waiters))
        return 0
    with benchmark_server(arguments.database_url) as (server_url, where):
        asyncio.run(
            run_benchmark(
                server_url,
                where,
                arguments.runs,
                arguments.waiters,
                arguments.window,
                arguments.summary,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
