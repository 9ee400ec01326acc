"""User mistakes and unreachable servers: exit 1 or 2 and one line on stderr, never a traceback.

Exit 1: not found, refused, unreachable. Exit 2: usage, including bad input such as a
malformed decision, URL or duration (checked before anything is written).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from registry import RunRegistry
from registry.cli import main
from tests.cli.runner import assert_error, registry

COMMANDS = (
    *("alembic-ini", "audit", "cancel", "check", "db", "demo", "doctor", "forward", "migrate"),
    *("prune", "run", "runs", "status", "tail"),
)

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/x"


async def test_help_lists_every_command() -> None:
    result = await registry("--help")
    assert result.code == 0, str(result)
    assert result.stderr == ""
    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line}
    assert listed == set(COMMANDS)


@pytest.mark.parametrize(
    "command",
    [
        *([name] for name in COMMANDS if name not in ("db", "run")),
        ["run", "show"],
        *(["db", name] for name in ("start", "stop", "status", "url")),
    ],
)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # in-process: the console script itself is covered by the test above
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: registry {' '.join(command)}")


async def test_a_bad_url_is_a_usage_error() -> None:
    option, variable, no_server = await asyncio.gather(
        registry("runs", "--database-url", "mysql://user@localhost/agents"),
        registry("status", env={"REGISTRY_DATABASE_URL": "http://example.invalid/"}),
        registry("status"),  # no URL, and the embedded server cannot start where it would
    )
    assert_error(option, 2, "--database-url", "'mysql'", "postgresql://")
    assert_error(variable, 2, "REGISTRY_DATABASE_URL", "postgresql://")
    assert_error(no_server, 1, "the embedded PostgreSQL did not start", "Not a directory")


async def test_an_unreachable_server_is_one_line() -> None:
    # ``runs`` reads on a plain connection, ``tail --follow`` connects a listening registry
    results = await asyncio.gather(
        registry("runs", "--database-url", UNREACHABLE),
        registry("tail", "run-1", "--follow", "--database-url", UNREACHABLE),
    )
    for result in results:
        assert_error(result, 1, "cannot reach the database at postgresql://nobody@127.0.0.1:1/x")


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP port on the loopback that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_server_that_never_answers_gives_up_after_the_connect_timeout() -> None:
    async with silent_server() as port:
        url = f"postgresql://nobody@127.0.0.1:{port}/x"
        started = time.monotonic()
        results = await asyncio.gather(
            registry("--connect-timeout", "0.5", "status", "--database-url", url, deadline=20),
            registry("--connect-timeout", "0.5", "cancel", "r", "--database-url", url, deadline=20),
        )
        elapsed = time.monotonic() - started
    for result in results:
        assert_error(result, 1, f"the database at {url} did not answer within 0.5 s")
    assert elapsed < 15, "the short connect timeout, not the driver's 60 s, decided"


async def test_a_malformed_decision_is_a_usage_error_and_writes_nothing(
    run_registry: RunRegistry, registry_database_url: str
) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    batch = (
        '[{"target_id": "c1", "action": "resume", "updated_at": 1},'
        ' {"target_id": "c2", "action": "maybe", "updated_at": 1}]'
    )
    result = await registry(
        "forward", "run-1", "--decision", batch, "--database-url", registry_database_url
    )
    assert_error(result, 2, "decisions[1].action: must be 'resume' or 'cancel'")
    inbox = handle.decisions()
    await run_registry.forward_decisions_by_run_id(
        "run-1", [{"target_id": "probe", "action": "cancel", "updated_at": 2}]
    )
    first = await asyncio.wait_for(anext(inbox), 5)
    assert first.decision.target_id == "probe", "the valid first decision was not stored either"
    await inbox.aclose()


async def test_unknown_runs_exit_1(registry_database_url: str) -> None:
    url = ("--database-url", registry_database_url)
    decision = '{"target_id": "c", "action": "resume", "updated_at": 1}'
    show, forward, cancel, tail = await asyncio.gather(
        registry("run", "show", "nope", *url),
        registry("forward", "nope", "--decision", decision, *url),
        registry("cancel", "--thread", "nope", *url),
        registry("tail", "nope", *url),
    )
    assert_error(show, 1, "no run 'nope'")
    assert_error(forward, 1, "run 'nope' is not active")
    assert_error(cancel, 1, "thread 'nope' has no active run")
    assert_error(tail, 1, "no run 'nope'")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("prune", "--older-than", "7x"), "'7x' is not a duration"),
        (("forward", "--decision", "{}"), "give either RUN or --thread THREAD --agent AGENT"),
        (("audit", "--since", "yesterday"), "neither a duration"),
        (("runs", "--status", "sleeping"), "--status"),
        (("forward", "r", "--decision", "{not json"), "--decision: not JSON"),
        (
            ("forward", "r", "--decision", '{"target_id": "c", "updated_at": 1}'),
            "decisions[0].action",
        ),
        (("forward", "r", "--decision", "[]"), "expected a JSON object or a non-empty array"),
        (("forward", "r", "--decision", "@/nonexistent.json"), "cannot read /nonexistent.json"),
        (("frobnicate",), "No such command 'frobnicate'"),
        (("tail", "r", "--json", "--separator", ""), "--separator goes with bytes"),
    ],
)
def test_usage_errors_exit_2(
    args: tuple[str, ...], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # in-process (fast): every one fails before it would contact the (unreachable) database
    assert main([*args, "--database-url", UNREACHABLE]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("registry: error: ")
    assert fragment in lines[0]
