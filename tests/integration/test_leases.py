"""Leases held per registry instance, and fencing by owner epoch.

Each registry holds its runs under the run's owner epoch; the epoch moves on when another
registry resumes (same worker id) or adopts the run, and from then on the old holder's claims,
acks, publishes and removes are refused in SQL (:class:`LeaseLostError`) and its heartbeat
trips its tokens. A registry's close releases only the leases it holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from registry import (
    DecisionDelivery,
    DecisionInbox,
    LeaseLostError,
    RegistrySettings,
    RunHandle,
    RunRegistry,
    ToolCallDecision,
    repository,
)
from registry.database import asyncpg_dsn
from tests.helpers.database import decisions_of_run, fetch

#: a heartbeat every 0.2 s: the heartbeat notices a lost run within about that
FAST = RegistrySettings(lease_seconds=2.0, heartbeat_interval=0.2, safety_interval=0.2)
#: a heartbeat not due within a test: only the database's refusals can tell of a lost run
SLOW_HEARTBEAT = RegistrySettings(lease_seconds=30.0, heartbeat_interval=10.0, safety_interval=0.2)
#: about one heartbeat of FAST, with room for a loaded machine
WITHIN_A_HEARTBEAT = 1.0
#: deadline for what must happen, but not within a heartbeat
DEADLINE = 5.0


def decision(decision_id: str) -> ToolCallDecision:
    return ToolCallDecision.resume(
        f"call-{decision_id}", {"ok": decision_id}, 1, decision_id=decision_id
    )


async def next_delivery(inbox: DecisionInbox, timeout: float = DEADLINE) -> DecisionDelivery:
    return await asyncio.wait_for(anext(inbox), timeout)


async def run_row(url: str, run_id: str) -> dict[str, Any]:
    [row] = await fetch(
        url,
        "SELECT status, owner_id, owner_epoch, lease_expires_at,"
        " lease_expires_at > now() AS fresh FROM registry.runs WHERE run_id = $1",
        run_id,
    )
    return row


async def expire_lease(url: str, run_id: str) -> None:
    """What an owner that stalled past its lease leaves behind (its heartbeat not yet due)."""
    await fetch(
        url,
        "UPDATE registry.runs SET lease_expires_at = now() - interval '1 second' WHERE run_id = $1",
        run_id,
    )


async def adopt(registry: RunRegistry, run_id: str) -> RunHandle:
    """Adopt ``run_id`` (retrying while a claim in flight holds its row: adoption skips it)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            handles = await registry.adopt_orphaned_runs()
            if handles:
                [handle] = handles
                assert handle.run_id == run_id
                return handle
            await asyncio.sleep(0.02)


async def until(condition: Callable[[], bool], timeout: float) -> bool:
    """Whether ``condition`` came true within ``timeout`` seconds (polled)."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        pass
    return condition()


# --- issue input 7: two live registries of one worker id (a rolling restart overlaps) --------


async def test_close_releases_only_the_leases_of_the_runs_the_closing_registry_holds(
    registry_database_url: str,
) -> None:
    url = registry_database_url
    async with await RunRegistry.connect(url, worker_id="W", settings=FAST) as b:
        await b.register("run-b", "agent", "thread-b")
        async with await RunRegistry.connect(url, worker_id="W", settings=FAST) as a2:
            await a2.register("run-a2", "agent", "thread-a2")
        # A2 closed (a rolling restart retires it); B of the same worker id still runs

        closed, live = await run_row(url, "run-a2"), await run_row(url, "run-b")
        assert not closed["fresh"], "the closing registry released its own run"
        assert live["fresh"], "the other registry's run of the same worker id kept its lease"
        assert (live["status"], live["owner_id"], live["owner_epoch"]) == ("active", "W", 1)


async def test_an_adopter_takes_only_the_closed_registrys_run_and_the_live_one_keeps_its_run(
    registry_database_url: str,
) -> None:
    url = registry_database_url
    async with (
        await RunRegistry.connect(url, worker_id="W", settings=FAST) as b,
        await RunRegistry.connect(url, worker_id="C", settings=FAST) as c,
        await RunRegistry.connect(url, worker_id="sender", listen=False) as sender,
    ):
        b_handle = await b.register("run-b", "agent", "thread-b")
        b_token = b_handle.cancellation_token()
        async with await RunRegistry.connect(url, worker_id="W", settings=FAST) as a2:
            await a2.register("run-a2", "agent", "thread-a2")
        # A2 closed (a rolling restart retires it); B of the same worker id still runs

        adopted = await c.adopt_orphaned_runs()
        assert [handle.run_id for handle in adopted] == ["run-a2"]

        before = await run_row(url, "run-b")
        assert before["fresh"]
        assert (before["owner_id"], before["owner_epoch"]) == ("W", 1)
        # B's heartbeat goes on renewing its run, and nothing tells B it lost it
        async with asyncio.timeout(DEADLINE):
            while (await run_row(url, "run-b"))["lease_expires_at"] <= before["lease_expires_at"]:
                await asyncio.sleep(0.05)
        assert not b_token.is_cancelled()
        assert not b_token.lease_lost
        async with b_handle.decisions() as inbox:
            assert await sender.forward_decisions_by_run_id("run-b", [decision("d1")])
            delivery = await next_delivery(inbox)
            assert (delivery.decision.decision_id, delivery.attempts) == ("d1", 1)
            assert await inbox.ack(delivery)


async def test_a_new_registry_of_the_worker_id_resumes_only_the_live_registrys_run_and_fences_it_within_a_heartbeat(  # noqa: E501
    registry_database_url: str,
) -> None:
    url = registry_database_url
    async with (
        await RunRegistry.connect(url, worker_id="W", settings=FAST) as b,
        await RunRegistry.connect(url, worker_id="C", settings=FAST) as c,
        await RunRegistry.connect(url, worker_id="sender", listen=False) as sender,
    ):
        b_handle = await b.register("run-b", "agent", "thread-b")
        assert await b_handle.bind_stream_fanout()
        b_token = b_handle.cancellation_token()
        async with await RunRegistry.connect(url, worker_id="W", settings=FAST) as a2:
            await a2.register("run-a2", "agent", "thread-a2")
        adopted = await c.adopt_orphaned_runs()
        assert [handle.run_id for handle in adopted] == ["run-a2"]
        [c_handle] = adopted

        async with b_handle.decisions() as b_inbox:
            parked = asyncio.create_task(anext(b_inbox))
            async with await RunRegistry.connect(url, worker_id="W", settings=FAST) as a3:
                # taking over the worker id's runs: B's run (A2's is C's now)
                [a3_handle] = await a3.resume_owned_runs()
                assert (a3_handle.run_id, a3_handle.record.owner_epoch) == ("run-b", 2)

                # B's heartbeat sees the epoch moved on: its token trips, its inbox ends
                try:
                    await asyncio.wait_for(b_token.wait(), WITHIN_A_HEARTBEAT)
                except TimeoutError:
                    parked.cancel()
                    raise AssertionError(
                        f"B's token did not trip within {WITHIN_A_HEARTBEAT}s of the resume"
                    ) from None
                assert b_token.lease_lost
                assert b_token.is_cancelled()
                with pytest.raises(LeaseLostError):
                    await asyncio.wait_for(parked, WITHIN_A_HEARTBEAT)
                with pytest.raises(LeaseLostError):
                    await b_handle.publish(b"from the old holder")
                with pytest.raises(LeaseLostError):
                    await b_handle.remove()

                row = await run_row(url, "run-b")
                assert (row["status"], row["owner_id"], row["owner_epoch"]) == ("active", "W", 2)
                assert await fetch(url, "SELECT seq FROM registry.stream_chunks") == []
                # the new holder works on the run, and C keeps A2's run
                assert await a3_handle.publish(b"from the new holder") == 1
                async with a3_handle.decisions() as a3_inbox:
                    assert await sender.forward_decisions_by_run_id("run-b", [decision("d1")])
                    delivery = await next_delivery(a3_inbox)
                    assert (delivery.decision.decision_id, delivery.attempts) == ("d1", 1)
                    assert await a3_inbox.ack(delivery)
                assert not a3_handle.cancellation_token().is_cancelled()
                assert not c_handle.cancellation_token().is_cancelled()
                row = await run_row(url, "run-a2")
                assert (row["status"], row["owner_id"], row["owner_epoch"]) == ("active", "C", 2)


# --- each fenced statement is refused by the database itself ---------------------------------


@pytest.mark.parametrize("operation", ["claim", "ack", "publish", "remove"])
async def test_a_stale_epochs_statement_is_refused_by_the_database_before_the_heartbeat_notices(
    registry_database_url: str, operation: str
) -> None:
    url = registry_database_url
    async with (
        await RunRegistry.connect(url, worker_id="W", settings=SLOW_HEARTBEAT) as old,
        await RunRegistry.connect(url, worker_id="sender", listen=False) as sender,
    ):
        handle = await old.register("run-1", "agent", "thread-1")
        assert await handle.bind_stream_fanout()
        token = handle.cancellation_token()
        async with handle.decisions() as inbox:
            assert await sender.forward_decisions_by_run_id("run-1", [decision("d1")])
            d1 = await next_delivery(inbox)  # delivered, not acknowledged
            async with await RunRegistry.connect(
                url, worker_id="W", settings=SLOW_HEARTBEAT
            ) as new:
                [taken] = await new.resume_owned_runs()
                assert taken.record.owner_epoch == 2
                assert not token.is_cancelled(), "the old holder's heartbeat is not due yet"

                if operation == "claim":
                    assert await sender.forward_decisions_by_run_id("run-1", [decision("d2")])
                attempts: dict[str, Callable[[], Awaitable[object]]] = {
                    "claim": lambda: next_delivery(inbox),
                    "ack": lambda: inbox.ack(d1),
                    "publish": lambda: handle.publish(b"chunk"),
                    "remove": handle.remove,
                }
                with pytest.raises(LeaseLostError):
                    await attempts[operation]()
                assert token.lease_lost, "the refused statement tells the old holder at once"
                assert token.is_cancelled()

                rows = await decisions_of_run(url, "run-1")
                statuses = {row["decision_id"]: (row["status"], row["attempts"]) for row in rows}
                assert statuses.pop("d1") == ("delivered", 1), "the old holder's ack wrote nothing"
                assert statuses in ({}, {"d2": ("pending", 0)}), "the old holder claimed nothing"
                assert await fetch(url, "SELECT seq FROM registry.stream_chunks") == []
                row = await run_row(url, "run-1")
                assert (row["status"], row["owner_epoch"]) == ("active", 2)


# --- a claim that races the adoption ---------------------------------------------------------


async def test_a_parked_inbox_raises_lease_lost_and_never_yields_a_decision_forwarded_after_an_adoption(  # noqa: E501
    registry_database_url: str,
) -> None:
    url = registry_database_url
    async with (
        await RunRegistry.connect(url, worker_id="old", settings=SLOW_HEARTBEAT) as old,
        await RunRegistry.connect(url, worker_id="new", settings=SLOW_HEARTBEAT) as new,
        await RunRegistry.connect(url, worker_id="sender", listen=False) as sender,
    ):
        old_handle = await old.register("run-1", "agent", "thread-1")
        async with old_handle.decisions() as old_inbox:
            assert await sender.forward_decisions_by_run_id("run-1", [decision("d0")])
            assert await old_inbox.ack(await next_delivery(old_inbox))
            parked = asyncio.create_task(anext(old_inbox))  # nothing queued: it parks

            await expire_lease(url, "run-1")  # the old owner stalled past its lease
            new_handle = await adopt(new, "run-1")
            assert new_handle.record.owner_epoch == 2
            assert await sender.forward_decisions_by_run_id("run-1", [decision("d1")])

            # woken by the forward, the old inbox's claim is refused (its heartbeat is not due)
            try:
                outcome = await asyncio.wait_for(parked, DEADLINE)
            except LeaseLostError:
                pass
            else:
                raise AssertionError(f"the old owner's inbox yielded {outcome} after the adoption")
            assert old_handle.cancellation_token().lease_lost

        async with new_handle.decisions() as new_inbox:
            delivery = await next_delivery(new_inbox)
            assert (delivery.decision.decision_id, delivery.attempts) == ("d1", 1)
            assert await new_inbox.ack(delivery)


async def test_a_claim_waiting_on_an_uncommitted_adoption_is_refused_once_the_adoption_commits(
    registry_database_url: str,
) -> None:
    url = registry_database_url
    async with (
        await RunRegistry.connect(url, worker_id="old", settings=SLOW_HEARTBEAT) as old,
        await RunRegistry.connect(url, worker_id="sender", listen=False) as sender,
    ):
        old_handle = await old.register("run-1", "agent", "thread-1")
        assert await sender.forward_decisions_by_run_id("run-1", [decision("d1")])
        await expire_lease(url, "run-1")

        adopter = await asyncpg.connect(asyncpg_dsn(url))
        try:
            adoption = adopter.transaction()
            await adoption.start()
            [record] = await repository.adopt_orphans(adopter, "new", timedelta(seconds=30), 1)
            assert (record.run_id, record.owner_epoch) == ("run-1", 2)
            adopter_pid = adopter.get_server_pid()

            async with old_handle.decisions() as old_inbox:
                claim = asyncio.create_task(anext(old_inbox))
                # the claim waits on the row the uncommitted adoption locked (or, unfenced,
                # does not wait at all and finishes)
                async with asyncio.timeout(DEADLINE):
                    while not claim.done():
                        [row] = await fetch(
                            url,
                            "SELECT count(*) AS n FROM pg_stat_activity"
                            " WHERE $1 = ANY(pg_blocking_pids(pid))",
                            adopter_pid,
                        )
                        if row["n"]:
                            break
                        await asyncio.sleep(0.01)
                await adoption.commit()
                try:
                    outcome = await asyncio.wait_for(claim, DEADLINE)
                except LeaseLostError:
                    pass
                else:
                    raise AssertionError(f"the old owner's claim yielded {outcome}")
        finally:
            await adopter.close()

    [row] = await decisions_of_run(url, "run-1")
    assert (row["status"], row["attempts"]) == ("pending", 0), "the refused claim wrote nothing"
    async with await RunRegistry.connect(url, worker_id="new", settings=FAST) as new:
        [handle] = await new.resume_owned_runs()
        async with handle.decisions() as inbox:
            delivery = await next_delivery(inbox)
            assert (delivery.decision.decision_id, delivery.attempts) == ("d1", 1)


# --- a registry does not fence itself --------------------------------------------------------


async def test_resume_owned_runs_twice_in_one_registry_keeps_the_epochs_and_the_first_handles_work(
    registry_database_url: str,
) -> None:
    url = registry_database_url
    async with await RunRegistry.connect(url, worker_id="W", settings=FAST) as earlier:
        await earlier.register("run-1", "agent", "thread-1")
    async with (
        await RunRegistry.connect(url, worker_id="W", settings=FAST) as registry,
        await RunRegistry.connect(url, worker_id="sender", listen=False) as sender,
    ):
        await registry.register("run-2", "agent", "thread-2")
        first = await registry.resume_owned_runs()
        # run-1 was taken from the earlier registry (epoch moves on), run-2 was held already
        assert {h.run_id: h.record.owner_epoch for h in first} == {"run-1": 2, "run-2": 1}
        [first_run_1] = [handle for handle in first if handle.run_id == "run-1"]
        token = first_run_1.cancellation_token()
        async with first_run_1.decisions() as inbox:
            second = await registry.resume_owned_runs()
            assert {h.run_id: h.record.owner_epoch for h in second} == {"run-1": 2, "run-2": 1}
            rows = await fetch(url, "SELECT run_id, owner_epoch FROM registry.runs ORDER BY run_id")
            assert [(row["run_id"], row["owner_epoch"]) for row in rows] == [
                ("run-1", 2),
                ("run-2", 1),
            ]
            # a heartbeat after the second resume renews the run and trips nothing
            [after] = await fetch(url, "SELECT now() AS at")
            async with asyncio.timeout(DEADLINE):
                while (await run_row(url, "run-1"))["lease_expires_at"] <= after["at"] + (
                    timedelta(seconds=FAST.lease_seconds)
                ):
                    await asyncio.sleep(0.05)
            assert not token.is_cancelled()
            assert not token.lease_lost
            assert await sender.forward_decisions_by_run_id("run-1", [decision("d1")])
            delivery = await next_delivery(inbox)
            assert (delivery.decision.decision_id, delivery.attempts) == ("d1", 1)
            assert await inbox.ack(delivery)
        assert registry._parts.leases.held() == {"run-1": 2, "run-2": 1}


# --- what the lease keeper keeps is bounded by the runs it holds -----------------------------

RUNS = 200


async def test_the_held_leases_are_forgotten_after_removal_here_removal_elsewhere_and_supersede(
    registry_database_url: str,
) -> None:
    url = registry_database_url
    async with (
        await RunRegistry.connect(url, worker_id="W", settings=FAST) as registry,
        await RunRegistry.connect(url, worker_id="other", settings=FAST) as other,
    ):
        handles = [
            await registry.register(f"run-{index}", "agent", f"thread-{index}")
            for index in range(RUNS)
        ]
        held = registry._parts.leases.held
        assert len(held()) == RUNS
        removed_here, removed_elsewhere, superseded = (
            handles[:70],
            handles[70:140],
            handles[140:],
        )
        for handle in removed_here:
            assert await handle.remove()
        assert not set(held()) & {handle.run_id for handle in removed_here}, "let go at once"
        for handle in removed_elsewhere:
            assert await other.remove_by_run_id(handle.run_id)
        for handle in superseded:
            await other.register(f"next-{handle.run_id}", "agent", handle.thread_id)

        # the heartbeat sees the runs ended elsewhere and lets them go
        assert await until(lambda: not held(), WITHIN_A_HEARTBEAT), (
            f"{len(held())} runs still held a heartbeat after they all ended"
        )
        # a superseded run is cancelled, not lost to another owner
        token = superseded[0].cancellation_token()
        assert token.is_cancelled()
        assert not token.lease_lost
        assert len(other._parts.leases.held()) == len(superseded)


async def test_token_refresh_sees_a_takeover_before_the_heartbeat(
    registry_database_url: str,
) -> None:
    async with (
        await RunRegistry.connect(
            registry_database_url, worker_id="W", settings=SLOW_HEARTBEAT
        ) as old,
        await RunRegistry.connect(
            registry_database_url, worker_id="W", settings=SLOW_HEARTBEAT
        ) as new,
    ):
        token = (await old.register("run-1", "agent", "thread-1")).cancellation_token()
        assert not await token.refresh()
        [taken] = await new.resume_owned_runs()
        assert taken.record.owner_epoch == 2
        assert await token.refresh()
        assert token.lease_lost


async def test_a_registry_never_adopts_a_run_it_holds_itself(registry_database_url: str) -> None:
    async with await RunRegistry.connect(
        registry_database_url, worker_id="W", settings=SLOW_HEARTBEAT
    ) as registry:
        handle = await registry.register("run-1", "agent", "thread-1")
        await expire_lease(registry_database_url, "run-1")  # its heartbeat fell behind
        assert await registry.adopt_orphaned_runs() == []
        assert not handle.cancellation_token().lease_lost
        assert (await run_row(registry_database_url, "run-1"))["owner_epoch"] == 1
        await registry.forward_decisions_by_run_id("run-1", [decision("d1")])
        async with handle.decisions() as inbox:
            assert (await next_delivery(inbox)).decision.decision_id == "d1"
