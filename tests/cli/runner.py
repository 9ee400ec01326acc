"""Run the ``registry`` console script as a subprocess, with a deadline, and check its output."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the console script installed next to the interpreter running the tests
REGISTRY = Path(sys.executable).with_name("registry")

#: how long one command may take here (a process start imports SQLAlchemy and Alembic)
DEADLINE = 60.0

#: the variables that choose a database: never inherited from the developer's shell
_SELECTION = ("REGISTRY_DATABASE_URL", "REGISTRY_DATA_DIR")


@dataclass(frozen=True)
class Completed:
    """What one command did."""

    args: tuple[str, ...]
    code: int
    output: bytes
    stderr: str

    @property
    def stdout(self) -> str:
        """Standard output as text."""
        return self.output.decode("utf-8", "replace")

    def json(self) -> Any:
        """Standard output parsed as one JSON document."""
        return json.loads(self.stdout)

    def json_lines(self) -> list[Any]:
        """Standard output parsed as one JSON document per line."""
        return [json.loads(line) for line in self.stdout.splitlines() if line]

    def __str__(self) -> str:
        return (
            f"registry {' '.join(self.args)} -> exit {self.code}\n"
            f"stdout: {self.stdout[-2000:]!r}\nstderr: {self.stderr[-2000:]!r}"
        )


#: where a command that falls back to the embedded server fails (it cannot create a directory
#: under a file), unless the test gives a REGISTRY_DATA_DIR of its own
NO_EMBEDDED_SERVER = "/dev/null/no-embedded-server-unless-the-test-asks"


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without database selection, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if key not in _SELECTION}
    env["REGISTRY_DATA_DIR"] = NO_EMBEDDED_SERVER
    env["COLUMNS"] = "200"
    env.update(extra or {})
    return env


async def start(*args: str, env: Mapping[str, str] | None = None) -> asyncio.subprocess.Process:
    """Start ``registry *args`` with pipes on all three streams."""
    assert REGISTRY.exists(), f"the console script is not installed at {REGISTRY}"
    return await asyncio.create_subprocess_exec(
        str(REGISTRY),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment(env),
    )


@contextlib.asynccontextmanager
async def killed_unless_done(process: asyncio.subprocess.Process) -> AsyncIterator[None]:
    """Kill and reap ``process`` when the block exits before it ended (a failed check)."""
    try:
        yield
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


async def registry(
    *args: str,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    deadline: float = DEADLINE,
) -> Completed:
    """Run ``registry *args`` to completion; fail the test if it outlives ``deadline``."""
    process = await start(*args, env=env)
    try:
        out, err = await asyncio.wait_for(
            process.communicate(None if stdin is None else stdin.encode()), deadline
        )
    except TimeoutError:
        process.kill()
        await process.communicate()
        raise AssertionError(f"registry {' '.join(args)} ran longer than {deadline} s") from None
    assert process.returncode is not None
    return Completed(args, process.returncode, out, err.decode())


def assert_error(result: Completed, code: int, *fragments: str) -> str:
    """The command failed with ``code`` and exactly one line on stderr containing
    ``fragments``, and no traceback; returns that line."""
    assert result.code == code, str(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, str(result)
    assert "Traceback" not in result.stderr, str(result)
    line = lines[0]
    assert line.startswith("registry: error: "), str(result)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line
