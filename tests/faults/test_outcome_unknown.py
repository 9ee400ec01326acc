"""A write whose reply is lost after the server committed it: the registry says so, and a
retry converges instead of storing twice.

The proxy cuts each current connection at the server's next answer (or next COMMIT), so the
statement runs and commits while the client only sees its connection reset. Connections
opened afterwards work, so a retry reaches the server. Each test first runs the same call
once, so that the statement is prepared: otherwise the answer cut would be the one to the
prepare, and nothing would have run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from registry import RegistrySettings, RunRegistry, ToolCallDecision
from registry.errors import OutcomeUnknownError, StreamConflictError
from tests.helpers.database import decisions_of_run, fetch
from tests.helpers.proxy import TcpProxy

SETTINGS = RegistrySettings(safety_interval=60, call_timeout=5)


@pytest.fixture
async def proxied(registry_database_url: str) -> AsyncIterator[tuple[RunRegistry, TcpProxy]]:
    async with TcpProxy.in_front_of(registry_database_url) as proxy:
        registry = await RunRegistry.connect(
            proxy.url(registry_database_url), listen=False, settings=SETTINGS
        )
        async with registry:
            yield registry, proxy


async def warm(registry: RunRegistry) -> None:
    """Leave one idle query connection (and the notification key read) behind the proxy."""
    await registry.run("nothing")
    await registry.cancel_active_run_by_id("nothing")


async def test_a_forward_without_decision_id_whose_reply_is_lost_is_stored_once(
    proxied: tuple[RunRegistry, TcpProxy], registry_database_url: str
) -> None:
    registry, proxy = proxied
    await registry.register("run-1", "agent", "thread-1")
    await warm(registry)
    first = ToolCallDecision.resume("call-0", {"approved": True}, 1, decision_id="d0")
    assert await registry.forward_decisions_by_run_id("run-1", [first]) is not None
    proxy.lose_next_replies()
    decision = ToolCallDecision.resume("call-1", {"approved": True}, 1)  # no decision_id
    forwarded = await registry.forward_decisions_by_run_id("run-1", [decision])
    assert forwarded is not None
    rows = await decisions_of_run(registry_database_url, "run-1")
    assert [row["target_id"] for row in rows] == ["call-0", "call-1"]
    assert rows[1]["decision_id"].startswith("registry-")
    assert proxy.accepted >= 2  # the reply was lost, and the retry connected anew


async def test_a_register_whose_reply_is_lost_returns_the_run_it_created(
    proxied: tuple[RunRegistry, TcpProxy], registry_database_url: str
) -> None:
    registry, proxy = proxied
    await warm(registry)
    proxy.lose_next_commit_replies()
    accepted = proxy.accepted
    handle = await registry.register("run-1", "agent", "thread-1")
    assert handle.run_id == "run-1"
    assert proxy.accepted > accepted  # the reply was lost, and the retry connected anew
    rows = await fetch(registry_database_url, "SELECT run_id, status FROM registry.runs")
    assert [(row["run_id"], row["status"]) for row in rows] == [("run-1", "active")]


async def test_a_cancel_whose_reply_is_lost_reports_the_active_run(
    proxied: tuple[RunRegistry, TcpProxy], registry_database_url: str
) -> None:
    registry, proxy = proxied
    await registry.register("run-1", "agent", "thread-1")
    await warm(registry)  # cancels another run: the statement is prepared
    accepted = proxy.accepted
    proxy.lose_next_replies()
    assert await registry.cancel_active_run_by_id("run-1")
    assert proxy.accepted > accepted  # the reply was lost, and the retry connected anew
    [row] = await fetch(
        registry_database_url, "SELECT cancel_requested_at IS NOT NULL AS c FROM registry.runs"
    )
    assert row["c"]


async def test_a_remove_whose_reply_is_lost_raises_outcome_unknown_and_a_retry_reports_it(
    proxied: tuple[RunRegistry, TcpProxy], registry_database_url: str
) -> None:
    registry, proxy = proxied
    await registry.register("run-1", "agent", "thread-1")
    await warm(registry)
    proxy.lose_next_commit_replies()
    with pytest.raises(OutcomeUnknownError):
        await registry.remove_by_run_id("run-1")
    # it did commit; the retry finds the run ended
    assert not await registry.remove_by_run_id("run-1")
    [row] = await fetch(registry_database_url, "SELECT status FROM registry.runs")
    assert row["status"] == "completed"


async def test_a_publish_whose_reply_is_lost_raises_outcome_unknown(
    proxied: tuple[RunRegistry, TcpProxy], registry_database_url: str
) -> None:
    registry, proxy = proxied
    handle = await registry.register("run-1", "agent", "thread-1")
    assert await handle.bind_stream_fanout()
    await warm(registry)
    assert await handle.publish(b"warm") == 1
    proxy.lose_next_replies()
    with pytest.raises(OutcomeUnknownError):
        await handle.publish(b"hello")
    stored = await registry.read_chunks("run-1")
    assert [(chunk.seq, chunk.data) for chunk in stored] == [(1, b"warm"), (2, b"hello")]


async def test_a_read_whose_reply_is_lost_is_retried_not_reported_as_unknown(
    proxied: tuple[RunRegistry, TcpProxy],
) -> None:
    registry, proxy = proxied
    await registry.register("run-1", "agent", "thread-1")
    await warm(registry)
    proxy.lose_next_replies()
    record = await registry.run("run-1")
    assert record is not None


async def test_a_publish_after_a_known_seq_whose_reply_is_lost_is_stored_once(
    proxied: tuple[RunRegistry, TcpProxy],
) -> None:
    registry, proxy = proxied
    handle = await registry.register("run-1", "agent", "thread-1")
    assert await handle.bind_stream_fanout()
    await warm(registry)
    assert await handle.publish(b"warm", after_seq=0) == 1
    accepted = proxy.accepted
    proxy.lose_next_replies()
    assert await handle.publish(b"hello", after_seq=1) == 2  # retried here, converged
    assert proxy.accepted > accepted
    stored = await registry.read_chunks("run-1")
    assert [(chunk.seq, chunk.data) for chunk in stored] == [(1, b"warm"), (2, b"hello")]
    # the caller's own retry converges too, and another chunk at that place is a conflict
    assert await handle.publish(b"hello", after_seq=1) == 2
    with pytest.raises(StreamConflictError) as caught:
        await handle.publish(b"other", after_seq=1)
    assert (caught.value.after_seq, caught.value.last_seq) == (1, 2)
    assert len(await registry.read_chunks("run-1")) == 2
