"""Drive ``tests.helpers.worker`` processes from a test: start, read lines with deadlines, kill.

Always start workers through :func:`workers` (an async context manager), which kills and
reaps every process it started when the block exits, however it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

#: the project root, so ``-m tests.helpers.worker`` resolves whatever the test's working dir
PROJECT_ROOT = Path(__file__).resolve().parents[2]

#: default deadline for one line from a worker (a process start imports SQLAlchemy & co.)
LINE_TIMEOUT = 20.0


class WorkerError(AssertionError):
    """A worker said something other than what the test expected, or nothing in time."""


class Worker:
    """One worker process; read its lines with :meth:`line`, :meth:`expect`, :meth:`delivery`."""

    def __init__(self, process: asyncio.subprocess.Process, args: tuple[str, ...]) -> None:
        self.process = process
        #: the role and its arguments, for messages
        self.name = " ".join(args)
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.process.pid

    async def line(self, timeout: float = LINE_TIMEOUT) -> str:
        """The worker's next line; raises :class:`WorkerError` at EOF or after ``timeout``."""
        assert self.process.stdout is not None
        try:
            raw = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            raise WorkerError(
                f"no line from worker {self.name!r} within {timeout}s; so far {self.lines}"
            ) from None
        if not raw:
            raise WorkerError(
                f"worker {self.name!r} closed stdout (exit {self.process.returncode}); "
                f"so far {self.lines}; stderr: {await self._stderr()}"
            )
        text = raw.decode().rstrip("\n")
        self.lines.append(text)
        return text

    async def expect(self, expected: str, timeout: float = LINE_TIMEOUT) -> None:
        """Read one line and require it to be ``expected``."""
        got = await self.line(timeout)
        if got != expected:
            raise WorkerError(f"expected {expected!r} from worker {self.name!r}, got {got!r}")

    async def delivery(self, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        """Read one delivery line of the ``inbox`` role."""
        got = await self.line(timeout)
        if not got.startswith("{"):
            raise WorkerError(f"expected a delivery line from worker {self.name!r}, got {got!r}")
        data: dict[str, Any] = json.loads(got)
        return data

    async def send(self, text: str) -> None:
        """Write one line to the worker's stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()

    async def exit_code(self, timeout: float = LINE_TIMEOUT) -> int:
        """Wait for the worker to exit and return its status (``-9`` after SIGKILL)."""
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise WorkerError(f"worker {self.name!r} did not exit within {timeout}s") from None

    def kill(self) -> None:
        """SIGKILL the worker (no cleanup runs in it: a crash, as far as the database knows)."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    async def _stderr(self) -> str:
        assert self.process.stderr is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 5)
            data = await asyncio.wait_for(self.process.stderr.read(), 5)
            return data.decode(errors="replace")[-4000:]
        return "(worker still running)"

    async def reap(self) -> None:
        """Kill the worker if it still runs, close its pipes and wait for it."""
        self.kill()
        if self.process.stdin is not None:
            self.process.stdin.close()
        # communicate() drains stdout/stderr to EOF, so the transport closes before the loop does
        await asyncio.wait_for(self.process.communicate(), 30)


class Workers:
    """Starts worker processes and remembers them so that :func:`workers` can reap them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.started: list[Worker] = []

    async def start(self, *args: str, options: tuple[str, ...] = ()) -> Worker:
        """Start ``python -m tests.helpers.worker URL *options *args``.

        ``options`` are the worker's global options (``--barrier``, ``--timeout``...); ``args``
        are the role and its arguments.
        """
        argv = [sys.executable, "-m", "tests.helpers.worker", self.url, *options, *args]
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=PROJECT_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        worker = Worker(process, args)
        self.started.append(worker)
        return worker

    async def start_ready(self, *args: str, options: tuple[str, ...] = ()) -> Worker:
        """Start a worker and wait until it prints ``ready``."""
        worker = await self.start(*args, options=options)
        await worker.expect("ready")
        return worker


@contextlib.asynccontextmanager
async def workers(url: str) -> AsyncIterator[Workers]:
    """Start workers on ``url`` inside the block; every one is killed and reaped at its end."""
    pool = Workers(url)
    try:
        yield pool
    finally:
        for worker in pool.started:
            worker.kill()
        await asyncio.gather(*(worker.reap() for worker in pool.started))
