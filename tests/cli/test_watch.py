"""``registry runs --watch``: the table redrawn until Ctrl-C or ``--count`` draws."""

from __future__ import annotations

import asyncio
import signal

from registry import RunRegistry
from tests.cli.runner import DEADLINE, assert_error, killed_unless_done, registry, start

#: how long the watch sleeps between draws: the test registers a run within it
INTERVAL = "2"


async def test_watch_redraws_what_changed(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    process = await start(
        "runs", "--watch", "--count", "2", "--interval", INTERVAL,
        "--database-url", registry_database_url,
    )  # fmt: skip
    async with killed_unless_done(process):
        assert process.stdout is not None
        first: list[str] = []
        while not any(line.startswith("run-1") for line in first):
            line = await asyncio.wait_for(process.stdout.readline(), DEADLINE)
            assert line, f"the watch ended before its first draw: {first!r}"
            first.append(line.decode())
        # between the draws: the second one reads the table again
        await run_registry.register("run-2", "agent-a", "thread-2")
        rest, err = await asyncio.wait_for(process.communicate(), DEADLINE)
    assert process.returncode == 0, err.decode()
    output = "".join(first) + rest.decode()
    assert "\x1b" not in output  # not a terminal: no escape codes
    frames = output.strip("\n").split("\n\n")
    assert len(frames) == 2, repr(output)
    runs = [[line.split()[0] for line in frame.splitlines()[2:]] for frame in frames]
    assert runs == [["run-1"], ["run-2", "run-1"]], repr(output)


async def test_watch_ends_at_ctrl_c(registry_database_url: str) -> None:
    process = await start(
        "runs", "--watch", "--interval", "0.1", "--database-url", registry_database_url
    )
    async with killed_unless_done(process):
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), DEADLINE)
        assert line.strip() == b"no runs match"
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), DEADLINE)
    assert process.returncode == 0, err.decode()
    assert err == b""


async def test_watch_refuses_a_bad_interval(registry_database_url: str) -> None:
    url = ("--database-url", registry_database_url)
    for interval in ("0", "-1", "nan", "inf"):
        result = await registry("runs", "--watch", "--interval", interval, *url)
        assert_error(result, 2, "--interval")
    both = await registry("runs", "--watch", "--json", *url)
    assert_error(both, 2, "--watch")
    alone = await registry("runs", "--count", "2", *url)
    assert_error(alone, 2, "--count goes with --watch")
