"""A caller's cancellation (a timeout, ``task.cancel()``) is the caller's, never an outage.

Cancelled at any point of a call, the caller gets its ``CancelledError`` (or ``TimeoutError``
from ``asyncio.timeout``) back, never a :class:`RegistryError`; no future is left with an
exception nobody retrieves; and the registry and the tables are as if the call had either
happened whole or not at all.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from registry import RunRegistry, RunStatus, ToolCallDecision
from tests.helpers.database import fetch
from tests.helpers.proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)

SEED = 20240611
THREAD = "same-thread"


@pytest.fixture
async def run_registry(registry_database_url: str) -> AsyncIterator[RunRegistry]:
    """A registry whose connections are TCP on every backend (the embedded server has only a
    Unix socket): asyncpg negotiates TLS over TCP, and a cancel can land in that exchange."""
    async with (
        TcpProxy.in_front_of(registry_database_url) as proxy,
        await RunRegistry.connect(proxy.url(registry_database_url)) as registry,
    ):
        yield registry


@contextmanager
def loop_errors_observed(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Collect what reaches the event loop's exception handler ("Future exception was never
    retrieved", "Task exception was never retrieved") or the ``asyncio`` logger meanwhile."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(
        lambda _loop, context: errors.append(
            f"{context.get('message')}: {{exception: {context.get('exception')!r}}}"
        )
    )
    caplog.set_level(logging.DEBUG, logger="asyncio")
    try:
        yield errors
        gc.collect()  # an unretrieved exception is reported when its future is collected
    finally:
        loop.set_exception_handler(previous)
    errors.extend(
        f"asyncio log: {record.getMessage()}"
        for record in caplog.records
        if record.name == "asyncio" and record.levelno >= logging.WARNING
    )


async def _active_runs_of(url: str, thread_id: str) -> list[str]:
    rows = await fetch(
        url,
        "SELECT run_id FROM registry.runs WHERE thread_id = $1 AND status = 'active'",
        thread_id,
    )
    return [row["run_id"] for row in rows]


async def _still_works(registry: RunRegistry, url: str, thread_id: str) -> None:
    """Register, find, forward to and remove a run on ``thread_id``; one active run at most."""
    assert len(await _active_runs_of(url, thread_id)) <= 1
    handle = await registry.register("final", "a", thread_id)
    found = await registry.handle_by_thread(thread_id)
    assert found is not None
    assert found.run_id == "final"
    decision = ToolCallDecision.resume("call", True, 1, decision_id="d")
    forwarded = await registry.forward_decisions_by_run_id("final", [decision])
    assert forwarded is not None
    assert forwarded.run_id == "final"
    assert await _active_runs_of(url, thread_id) == ["final"]
    assert await handle.remove()


def _describe_loop_errors(outcomes: Counter[str], errors: list[str]) -> str:
    kinds = Counter(error.split(": {")[0] for error in errors)
    return f"{len(errors)} errors reached the event loop {dict(kinds)}: {errors[:2]}; " + (
        f"outcomes {dict(outcomes)} (seed {SEED})"
    )


def _describe(outcomes: Counter[str], others: list[str]) -> str:
    return f"outcomes {dict(outcomes)}; unexpected (first 5): {others[:5]} (seed {SEED})"


#: "new-connection": as in the issue, each call after a cancelled one opens a connection (a
#: cancelled call's connection is terminated), so the cancel mostly lands while connecting;
#: "warm-connection": an uncancelled read first leaves a connection idle, so it lands in the
#: statements (the transaction, its commit)
CONNECTIONS = pytest.mark.parametrize("connection", ["new-connection", "warm-connection"])


@CONNECTIONS
async def test_register_under_random_timeouts_fails_only_with_timeout_error_and_keeps_one_run(
    run_registry: RunRegistry,
    registry_database_url: str,
    caplog: pytest.LogCaptureFixture,
    connection: str,
) -> None:
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    others: list[str] = []
    with loop_errors_observed(caplog) as loop_errors:
        for i in range(600):
            if connection == "warm-connection":
                await run_registry.handle_by_thread(THREAD)
            try:
                async with asyncio.timeout(rng.uniform(0.0005, 0.006)):
                    await run_registry.register(f"r{i}", "a", THREAD)
                outcomes["registered"] += 1
            except TimeoutError:
                outcomes["TimeoutError"] += 1
            except BaseException as exc:
                outcomes[type(exc).__name__] += 1
                others.append(f"r{i}: {type(exc).__module__}.{exc!r}")
    assert not others, _describe(outcomes, others)
    assert not loop_errors, _describe_loop_errors(outcomes, loop_errors)
    await _still_works(run_registry, registry_database_url, THREAD)


async def _cancel_soon(
    rng: random.Random,
    start: Callable[[], Coroutine[Any, Any, object]],
    outcomes: Counter[str],
    others: list[str],
) -> None:
    """Start a call in a task, cancel it a random moment later, and check how it ended."""
    task = asyncio.create_task(start())
    await asyncio.sleep(rng.uniform(0, 0.004))
    requested = task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            others.append(f"CancelledError raised but the task is not cancelled: {task!r}")
        outcomes["cancelled"] += 1
        return
    except BaseException as exc:
        outcomes[type(exc).__name__] += 1
        others.append(f"{type(exc).__module__}.{exc!r}")
        return
    if requested:
        others.append(f"the cancel was swallowed: the task returned {task.result()!r}")
    outcomes["completed before the cancel"] += 1


@CONNECTIONS
async def test_cancelled_register_tasks_end_cancelled_never_as_registry_errors(
    run_registry: RunRegistry,
    registry_database_url: str,
    caplog: pytest.LogCaptureFixture,
    connection: str,
) -> None:
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    others: list[str] = []
    with loop_errors_observed(caplog) as loop_errors:
        for i in range(300):
            if connection == "warm-connection":
                await run_registry.handle_by_thread(THREAD)
            register = functools.partial(run_registry.register, f"t{i}", "a", THREAD)
            await _cancel_soon(rng, register, outcomes, others)
    assert not others, _describe(outcomes, others)
    assert not loop_errors, _describe_loop_errors(outcomes, loop_errors)
    await _still_works(run_registry, registry_database_url, THREAD)


async def test_cancelled_remove_tasks_end_cancelled_never_as_registry_errors(
    run_registry: RunRegistry, registry_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    others: list[str] = []
    with loop_errors_observed(caplog) as loop_errors:
        for i in range(300):
            # uncancelled: the remove then finds this call's connection idle
            await run_registry.register(f"m{i}", "a", f"thread-m{i}")
            remove = functools.partial(run_registry.remove_by_run_id, f"m{i}")
            await _cancel_soon(rng, remove, outcomes, others)
    assert not others, _describe(outcomes, others)
    assert not loop_errors, _describe_loop_errors(outcomes, loop_errors)
    # each run was removed whole or not at all, and a remove now finishes what is left
    rows = await fetch(registry_database_url, "SELECT run_id, status FROM registry.runs")
    assert {row["status"] for row in rows} <= {RunStatus.ACTIVE, RunStatus.COMPLETED}
    for row in rows:
        assert await run_registry.remove_by_run_id(row["run_id"]) is (
            row["status"] == RunStatus.ACTIVE
        )
    await _still_works(run_registry, registry_database_url, THREAD)
