"""Bad input raises a typed error naming the field, before any write."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry import (
    InvalidInputError,
    RegistrySettings,
    RunRegistry,
    RunStatus,
    ToolCallDecision,
    TooManyDecisionsError,
)
from registry.database import asyncpg_dsn

GOOD = ToolCallDecision.resume("call-1", {"ok": True}, 1)


async def _counts(url: str) -> tuple[int, int]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        runs = await connection.fetchval("SELECT count(*) FROM registry.runs")
        decisions = await connection.fetchval("SELECT count(*) FROM registry.decisions")
    finally:
        await connection.close()
    return runs, decisions


BAD_IDS: list[Any] = ["", "x" * 256, "a\x00b", "\udcff", None, 7]

Call = Callable[[RunRegistry, Any], Awaitable[object]]
CALLS: dict[str, tuple[str, Call]] = {
    "register.run_id": ("run_id", lambda r, v: r.register(v, "agent-a", "thread-x")),
    "register.agent_id": ("agent_id", lambda r, v: r.register("run-x", v, "thread-x")),
    "register.thread_id": ("thread_id", lambda r, v: r.register("run-x", "agent-a", v)),
    "handle_by_thread": ("thread_id", lambda r, v: r.handle_by_thread(v)),
    "handle_by_run_id": ("run_id", lambda r, v: r.handle_by_run_id(v)),
    "remove_by_run_id": ("run_id", lambda r, v: r.remove_by_run_id(v)),
    "active_run_id_for_thread": ("agent_id", lambda r, v: r.active_run_id_for_thread(v, "t")),
    "forward_by_thread.agent": (
        "agent_id",
        lambda r, v: r.forward_decisions_by_thread(v, "thread-1", [GOOD]),
    ),
    "forward_by_thread.thread": (
        "thread_id",
        lambda r, v: r.forward_decisions_by_thread("agent-a", v, [GOOD]),
    ),
    "forward_by_run_id": ("run_id", lambda r, v: r.forward_decisions_by_run_id(v, [GOOD])),
    "cancel_by_id": ("run_id", lambda r, v: r.cancel_active_run_by_id(v)),
    "cancel_by_thread": ("thread_id", lambda r, v: r.cancel_active_run_by_thread(v)),
}


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_bad_ids_are_refused_before_any_write(
    run_registry: RunRegistry, registry_database_url: str, name: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    await run_registry.forward_decisions_by_run_id("run-1", [GOOD])
    before = await _counts(registry_database_url)
    field, call = CALLS[name]
    for value in BAD_IDS:
        with pytest.raises(InvalidInputError) as caught:
            await call(run_registry, value)
        assert caught.value.field == field, (name, value)
    assert await _counts(registry_database_url) == before
    assert await run_registry.handle_by_run_id("run-1") is not None


@pytest.mark.parametrize(
    ("decisions", "field"),
    [
        ([GOOD, {"target_id": "t", "action": "maybe", "updated_at": 1}], "decisions[1].action"),
        ([GOOD, {"target_id": "t", "action": "resume"}], "decisions[1].updated_at"),
        (
            [{"target_id": "t", "action": "resume", "updated_at": 1, "result": {1, 2}}],
            "decisions[0].result",
        ),
        (
            [{"target_id": "t", "action": "resume", "updated_at": 1, "result": "\x00"}],
            "decisions[0].result",
        ),
        ([GOOD, "resume"], "decisions[1]"),
        ([GOOD, None], "decisions[1]"),
        ("not a list", "decisions"),
        ({"target_id": "t"}, "decisions"),
    ],
)
async def test_malformed_batches_write_nothing(
    run_registry: RunRegistry, registry_database_url: str, decisions: Any, field: str
) -> None:
    await run_registry.register("run-1", "agent-a", "thread-1")
    with pytest.raises(InvalidInputError) as caught:
        await run_registry.forward_decisions_by_run_id("run-1", decisions)
    assert caught.value.field == field
    with pytest.raises(InvalidInputError):
        await run_registry.forward_decisions_by_thread("agent-a", "thread-1", decisions)
    assert await _counts(registry_database_url) == (1, 0)


async def test_batch_over_the_limit_is_refused(registry_database_url: str) -> None:
    limits = RegistrySettings(max_decisions_per_forward=3, max_result_bytes=100)
    async with await RunRegistry.connect(registry_database_url, settings=limits) as run_registry:
        await run_registry.register("run-1", "agent-a", "thread-1")
        with pytest.raises(TooManyDecisionsError) as caught:
            await run_registry.forward_decisions_by_run_id("run-1", [GOOD] * 4)
        assert caught.value.field == "decisions"
        assert (caught.value.count, caught.value.limit) == (4, 3)
        huge = ToolCallDecision.resume("t", "x" * 200, 1)
        with pytest.raises(InvalidInputError, match="limit is 100") as too_big:
            await run_registry.forward_decisions_by_run_id("run-1", [GOOD, huge])
        assert too_big.value.field == "decisions[1].result"
        assert await run_registry.forward_decisions_by_run_id("run-1", [GOOD] * 3) is not None
    assert await _counts(registry_database_url) == (1, 3)


def test_settings_are_validated() -> None:
    with pytest.raises(InvalidInputError) as caught:
        RegistrySettings(safety_interval=0)
    assert caught.value.field == "safety_interval"
    with pytest.raises(InvalidInputError):
        RegistrySettings(max_decisions_per_forward=0)
    bad_settings: list[tuple[dict[str, Any], str]] = [
        ({"bogus": 1}, "bogus"),
        ({"lease_seconds": "15"}, "lease_seconds"),
        ({"pool_size": 2.5}, "pool_size"),
        ({"pool_size": True}, "pool_size"),
    ]
    for bad, field in bad_settings:
        with pytest.raises(InvalidInputError) as caught:
            RegistrySettings(**bad)
        assert caught.value.field == field


@pytest.mark.parametrize("timeout", ["x", [1], True, float("nan"), -1])
async def test_a_bad_timeout_is_named(run_registry: RunRegistry, timeout: Any) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    async with handle.decisions() as inbox:
        with pytest.raises(InvalidInputError) as caught:
            await inbox.get(timeout=timeout)
        assert caught.value.field == "timeout"
    with pytest.raises(InvalidInputError) as caught:
        await handle.wait_active(timeout=timeout)
    assert caught.value.field == "timeout"


@pytest.mark.parametrize("after_seq", [2**63 - 1, 2**63, 2**100, -1])
async def test_a_seq_past_a_bigint_is_named(run_registry: RunRegistry, after_seq: int) -> None:
    handle = await run_registry.register("run-1", "agent-a", "thread-1")
    await handle.bind_stream_fanout()
    with pytest.raises(InvalidInputError) as caught:
        await handle.publish(b"x", after_seq=after_seq)
    assert caught.value.field == "after_seq"
    with pytest.raises(InvalidInputError) as caught:
        await handle.publish_many([b"x"], after_seq=after_seq)
    assert caught.value.field == "after_seq"
    assert await run_registry.read_chunks("run-1") == []
    if after_seq < 2**63:
        return  # a subscription may start after the largest seq there is
    with pytest.raises(InvalidInputError) as caught:
        await run_registry.subscribe_thread_run_stream("run-1", after_seq=after_seq)
    assert caught.value.field == "after_seq"


async def test_bad_worker_id_is_refused(registry_database_url: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        await RunRegistry.connect(registry_database_url, worker_id="")
    assert caught.value.field == "worker_id"


storable = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
ids = st.text(alphabet=storable, min_size=1, max_size=255)
#: a run id is never reused, so each example's run id ends in a serial number of its own
_SERIAL_WIDTH = 8
_serials = itertools.count()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    run_text=st.text(alphabet=storable, max_size=255 - _SERIAL_WIDTH),
    thread_id=ids,
    target=ids,
    reason=st.text(alphabet=storable, max_size=50),
)
async def test_any_storable_text_round_trips_exactly(
    run_registry: RunRegistry, run_text: str, thread_id: str, target: str, reason: str
) -> None:
    # quotes, SQL fragments, unicode: all travel as bind parameters and come back unchanged.
    # The database outlives the examples, and hypothesis repeats values: a run id of its own
    # makes every example register, look up and round-trip a decision.
    run_id = f"{run_text}{next(_serials):0{_SERIAL_WIDTH}d}"
    assert await run_registry.run(run_id) is None
    handle = await run_registry.register(run_id, "agent", thread_id)
    found = await run_registry.handle_by_thread(thread_id)
    assert found is not None
    assert found.run_id == run_id
    assert found.thread_id == thread_id
    sent = ToolCallDecision.cancel(target, {target: [reason]}, reason, 5, decision_id=target)
    await run_registry.forward_decisions_by_run_id(run_id, [sent])
    async with handle.decisions() as inbox:
        delivery = await anext(inbox)
        assert delivery.decision == sent
        assert await inbox.ack(delivery)
    assert await run_registry.remove_by_run_id(run_id)
    record = await run_registry.run(run_id)
    assert record is not None
    assert (record.run_id, record.thread_id, record.status) == (
        run_id,
        thread_id,
        RunStatus.COMPLETED,
    )
