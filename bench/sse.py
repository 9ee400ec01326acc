"""Benchmark the HTTP streams of ``registry.contrib.asgi`` against a bare sse-starlette endpoint.

Run it from the checkout, with the project installed (``pip install -e '.[dev]'``)::

    python bench/sse.py [--database-url URL] [--clients 1000]

The server is ``--database-url``, else ``$REGISTRY_DATABASE_URL``, else an embedded PostgreSQL
started in a temporary directory; a fresh ``registry_bench_<hex>`` database is created,
migrated and dropped at the end. Each figure is measured against a uvicorn server process (one
per phase) that serves both the registry's routes and the baseline: an sse-starlette
``EventSourceResponse`` streaming the same 200-byte chunks from memory, with the same ``id:``
lines. ``ratio = ours / baseline`` in cost (time, memory, CPU): higher is costlier.

1. Reconnect to the first replayed chunk: a client reconnects with ``Last-Event-ID: 500`` to a
   stream of 1,000 stored chunks (ours: the run's record is read, a subscription made, the
   table read; the baseline slices a list); from the request's start to the first ``data:``
   line, on a new connection each time; p50 and p99 of 200.
2. Chunks per second through one SSE stream: 20,000 stored chunks of an ended run, read to
   the end by one client that counts ``data:`` lines.
3. ``--clients`` concurrent SSE clients on one server process: all follow one live run while
   20 chunks are published, 0.1 s apart (the baseline sleeps 0.1 s between chunks). The
   server's resident memory with every client connected (``VmRSS``, less its idle figure
   before the clients) and the CPU seconds it spent from the first connection to the last
   chunk received by every client (``/proc/<pid>/stat``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import httpx
from _shared import benchmark_database, benchmark_server

from registry import RunHandle, RunRegistry

CHUNK = 200
RECONNECTS = 200
STORED = 1_000
RESUME_AFTER = 500
THROUGHPUT_CHUNKS = 20_000
LIVE_CHUNKS = 20
LIVE_INTERVAL = 0.1
SERVER_START = 30.0
AGENT = "bench-agent"


def payload(seq: int) -> bytes:
    """A 200-byte chunk naming its seq."""
    head = f"chunk {seq:08d} "
    return (head + "x" * (CHUNK - len(head))).encode()


# --- the server process --------------------------------------------------------------------------


def server_app(url: str) -> object:
    """The benchmark's app: the registry's routes under /registry, the baseline under /baseline."""
    from sse_starlette import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Mount, Route

    from registry.contrib.asgi import EXCEPTION_HANDLERS, RegistryLifespan, registry_routes

    chunks = [payload(seq).decode() for seq in range(1, THROUGHPUT_CHUNKS + 1)]

    async def stored(request: Request) -> Response:
        count = int(request.query_params["count"])
        after = int(request.headers.get("last-event-id", "0"))

        async def events() -> AsyncIterator[ServerSentEvent]:
            for seq in range(after + 1, count + 1):
                yield ServerSentEvent(data=chunks[seq - 1], id=str(seq))
            yield ServerSentEvent(event="end", data="{}")

        return EventSourceResponse(events(), ping=15)

    async def live(request: Request) -> Response:
        async def events() -> AsyncIterator[ServerSentEvent]:
            for seq in range(1, LIVE_CHUNKS + 1):
                await asyncio.sleep(LIVE_INTERVAL)
                yield ServerSentEvent(data=chunks[seq - 1], id=str(seq))
            yield ServerSentEvent(event="end", data="{}")

        return EventSourceResponse(events(), ping=15)

    return Starlette(
        routes=[
            Mount("/registry", registry_routes()),
            Route("/baseline/stored", stored),
            Route("/baseline/live", live),
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=RegistryLifespan(url, worker_id="bench-server"),
    )


def serve(port: int) -> None:
    import logging

    import uvicorn

    # a client that read its first chunk and left: asyncio warns of each write after that
    logging.getLogger("asyncio").setLevel(logging.ERROR)

    app = server_app(os.environ["BENCH_SSE_URL"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", backlog=4096)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def server_process(url: str) -> AsyncIterator[tuple[int, int]]:
    """A server process on a free port; yields its pid and port once it answers."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", str(port), env={**os.environ, "BENCH_SSE_URL": url}
    )
    try:
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + SERVER_START
            while True:
                try:
                    await client.get(f"http://127.0.0.1:{port}/registry/runs/none")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or process.returncode is not None:
                        raise RuntimeError("the benchmark server did not start") from None
                    await asyncio.sleep(0.05)
        yield process.pid, port
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- clients -------------------------------------------------------------------------------------


async def first_chunk(port: int, path: str, last_event_id: int) -> float:
    """Seconds from connecting to the first ``data:`` line, on a new connection (a raw socket:
    an HTTP client's own costs would hide the server's)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n"
            f"Last-Event-ID: {last_event_id}\r\nConnection: close\r\n\r\n".encode()
        )
        received = b""
        while b"data:" not in received:
            piece = await reader.read(65536)
            if not piece:
                raise RuntimeError(f"{path}: no chunk")
            received += piece
        return time.perf_counter() - started
    finally:
        writer.close()
        await writer.wait_closed()


async def count_chunks(
    client: httpx.AsyncClient, url: str, connected: Callable[[], None] | None = None
) -> int:
    """The ``data:`` lines of a whole stream (the end event's included)."""
    count = 0
    async with client.stream("GET", url) as response:
        response.raise_for_status()
        if connected is not None:
            connected()
        tail = b""
        async for piece in response.aiter_bytes():
            joined = tail + piece
            count += joined.count(b"data:")
            tail = joined[-4:] if not joined.endswith(b"data:") else b""
    return count


def quantile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def row(name: str, ours: float, baseline: float, unit: str) -> None:
    print(f"{name:<50} {ours:>12.3f} {baseline:>12.3f} {unit:<10} {ours / baseline:>7.2f}x")


async def stored_run(runs: RunRegistry, run_id: str, count: int, *, end: bool) -> RunHandle:
    handle = await runs.register(run_id, AGENT, f"thread-{run_id}")
    await handle.bind_stream_fanout()
    for start in range(1, count + 1, 1000):
        await handle.publish_many(
            [payload(seq) for seq in range(start, min(count, start + 999) + 1)]
        )
    if end:
        await handle.remove()
    return handle


async def reconnects(runs: RunRegistry, port: int) -> None:
    await stored_run(runs, "reconnect", STORED, end=False)
    targets = {
        "ours": "/registry/runs/reconnect/events",
        "baseline": f"/baseline/stored?count={STORED}",
    }
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for target in targets.values():  # warm up
        await first_chunk(port, target, RESUME_AFTER)
    for _ in range(RECONNECTS):  # alternate, so both see the same machine
        for name, target in targets.items():
            samples[name].append(await first_chunk(port, target, RESUME_AFTER))
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        ours, baseline = (quantile(samples[name], fraction) * 1000 for name in targets)
        row(f"reconnect to first replayed chunk, {label}", ours, baseline, "ms")


async def throughput(runs: RunRegistry, port: int) -> None:
    await stored_run(runs, "throughput", THROUGHPUT_CHUNKS, end=True)
    base = f"http://127.0.0.1:{port}"
    targets = {
        "ours": f"{base}/registry/runs/throughput/events",
        "baseline": f"{base}/baseline/stored?count={THROUGHPUT_CHUNKS}",
    }
    rates: dict[str, list[float]] = {name: [] for name in targets}
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(3):
            for name, target in targets.items():
                started = time.perf_counter()
                count = await count_chunks(client, target)
                elapsed = time.perf_counter() - started
                assert count == THROUGHPUT_CHUNKS + 1, (name, count)
                rates[name].append(THROUGHPUT_CHUNKS / elapsed)
    ours, baseline = (statistics.median(rates[name]) for name in targets)
    # a rate: the cost ratio is baseline / ours
    print(
        f"{'chunks/s through one SSE stream (median of 3)':<50} {ours:>12,.0f} {baseline:>12,.0f} "
        f"{'chunks/s':<10} {baseline / ours:>7.2f}x"
    )


async def crowd(url: str, runs: RunRegistry, clients: int, ours: bool) -> dict[str, float]:
    """Memory and CPU of one server process with ``clients`` SSE clients on one live stream."""
    async with server_process(url) as (pid, port):
        idle = rss_mib(pid)
        base = f"http://127.0.0.1:{port}"
        handle = None
        if ours:
            handle = await stored_run(runs, "crowd", 0, end=False)
            target = f"{base}/registry/runs/crowd/events"
        else:
            target = f"{base}/baseline/live"
        connected = 0
        everyone = asyncio.Event()

        def one_more() -> None:
            nonlocal connected
            connected += 1
            if connected == clients:
                everyone.set()

        limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            cpu_before = cpu_seconds(pid)
            readers = [
                asyncio.create_task(count_chunks(client, target, one_more)) for _ in range(clients)
            ]
            await asyncio.wait_for(everyone.wait(), 120)
            if handle is not None:
                seq = 0
                for number in range(1, LIVE_CHUNKS + 1):
                    await asyncio.sleep(LIVE_INTERVAL)
                    seq = await handle.publish(payload(number), after_seq=seq)
                rss = rss_mib(pid)
                await handle.remove()
            else:
                await asyncio.sleep(LIVE_CHUNKS * LIVE_INTERVAL * 0.9)
                rss = rss_mib(pid)
            counts = await asyncio.wait_for(asyncio.gather(*readers), 120)
            cpu = cpu_seconds(pid) - cpu_before
        assert counts == [LIVE_CHUNKS + 1] * clients, sorted(set(counts))
        return {"rss": rss - idle, "cpu": cpu}


async def run_benchmark(server_url: str, where: str, clients: int) -> None:
    async with benchmark_database(server_url) as database:
        print(f"PostgreSQL {database.version_num} {where}; chunks of {CHUNK} bytes")
        print(f"{'':<50} {'ours':>12} {'baseline':>12} {'unit':<10} {'ratio':>8}")
        async with (
            RunRegistry.connect(database.url, worker_id="bench-publisher") as runs,
            server_process(database.url) as (_, port),
        ):
            await reconnects(runs, port)
            await throughput(runs, port)
        async with RunRegistry.connect(database.url, worker_id="bench-crowd") as runs:
            baseline = await crowd(database.url, runs, clients, ours=False)
            ours = await crowd(database.url, runs, clients, ours=True)
        row(f"{clients:,} SSE clients: server memory", ours["rss"], baseline["rss"], "MiB")
        row(
            f"{clients:,} SSE clients: server CPU, connect + 20 chunks",
            ours["cpu"],
            baseline["cpu"],
            "s",
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("REGISTRY_DATABASE_URL"))
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.serve:
        serve(arguments.serve)
        return 0
    with benchmark_server(arguments.database_url) as (server_url, where):
        asyncio.run(run_benchmark(server_url, where, arguments.clients))
    return 0


if __name__ == "__main__":
    sys.exit(main())
