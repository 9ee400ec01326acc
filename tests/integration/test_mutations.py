"""Tests that fail when one line of the registry is broken (issue 16: each changed a line that
every other test let through).

Each test names the behaviour it pins; the comment above it says which one-line change makes it
fail. Latency tests run with the safety re-check far away (``safety_interval=60``) and, where a
notification could also explain a quick result, without a listener: only the code under test
can then wake the waiter within the deadline. Races are made deterministic with row locks held
from an admin connection, never with sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import asyncpg
import pytest

from registry import (
    DatabaseUnavailableError,
    LeaseLostError,
    RegistrySettings,
    RunRegistry,
    RunStatus,
    ToolCallDecision,
)
from registry.connections import ConnectionLane
from registry.database import APPLICATION_NAME, asyncpg_dsn
from tests.helpers.database import fetch, session_pids
from tests.helpers.proxy import target_of

_T = TypeVar("_T")

#: only the code under test (not the periodic re-check) can wake a waiter within a deadline
QUIET = RegistrySettings(safety_interval=60)
#: how long something that should take milliseconds may take here
DEADLINE = 3.0


def _decision(name: str) -> ToolCallDecision:
    return ToolCallDecision.resume(f"call-{name}", {"name": name}, 1, decision_id=name)


async def _sql(url: str, query: str, *args: Any) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.execute(query, *args)
    finally:
        await connection.close()


async def _status(url: str, run_id: str) -> str:
    [row] = await fetch(url, "SELECT status FROM registry.runs WHERE run_id = $1", run_id)
    return str(row["status"])


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` under :data:`DEADLINE`; fail with ``what`` if it never holds."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not await condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"not within {DEADLINE} s: {what}")


async def _within(step: Awaitable[_T], what: str, seconds: float = DEADLINE) -> _T:
    """Await ``step`` for at most ``seconds``; fail with ``what`` if it takes longer."""
    try:
        async with asyncio.timeout(seconds):
            return await step
    except TimeoutError:
        pytest.fail(f"not within {seconds} s: {what}")


async def _still_waiting(waiter: asyncio.Future[_T], seconds: float = 0.2) -> None:
    """Assert that ``waiter`` is parked: it does not finish within ``seconds``."""
    done, _ = await asyncio.wait({waiter}, timeout=seconds)
    if done:
        pytest.fail(f"the waiter did not park: {waiter.exception() or waiter.result()!r}")


# --- 1. the orphan sweep keeps its grace period ----------------------------------------------


# breaks if: the sweep's ``lease_expires_at < now() - grace`` loses its grace
async def test_the_sweep_spares_a_cancelled_run_whose_owner_may_still_renew(
    registry_database_url: str,
) -> None:
    url = registry_database_url
    # the owner renews every 30 s: within this test only the SQL below moves its lease
    owner_settings = RegistrySettings(lease_seconds=60, heartbeat_interval=30, safety_interval=60)
    async with (
        await RunRegistry.connect(url, worker_id="owner", settings=owner_settings) as owner,
        await RunRegistry.connect(url, worker_id="sweeper", settings=QUIET) as sweeper,
    ):
        late = await owner.register("run-late", "agent", "thread-late")
        await owner.register("run-gone", "agent", "thread-gone")
        for run_id in ("run-late", "run-gone"):
            assert await sweeper.cancel_active_run_by_id(run_id)
        # a heartbeat one second late (lease expired 1 s ago, the grace is one lease, 15 s),
        # and an owner silent for longer than lease plus grace
        await _sql(
            url,
            "UPDATE registry.runs SET lease_expires_at = now() - make_interval(secs => CASE run_id"
            " WHEN 'run-late' THEN 1 ELSE 30 END)",
        )
        assert await sweeper.sweep_cancelled_orphans() == ["run-gone"]
        assert await _status(url, "run-late") == "active"
        # its owner is still there: it winds the run down itself
        assert await late.remove()
        record = await owner.run("run-late")
        assert record is not None
        assert record.status is RunStatus.CANCELLED
        assert record.end_reason != "cancelled while its owner was gone"


# --- 2. the heartbeat sweeps ------------------------------------------------------------------


# breaks if: the heartbeat's ``await self.sweep_cancelled_orphans()`` is dropped
async def test_the_heartbeat_finishes_cancelled_orphans_without_a_sweep_call(
    registry_database_url: str,
) -> None:
    url = registry_database_url
    async with await RunRegistry.connect(url, worker_id="dead") as dead:
        await dead.register("run-orphan", "agent", "thread-orphan")
        assert await dead.cancel_active_run_by_id("run-orphan")
    # the owner died long ago: its lease expired more than a lease plus the grace ago
    await _sql(url, "UPDATE registry.runs SET lease_expires_at = now() - interval '60 seconds'")
    keeper = RegistrySettings(lease_seconds=1.0, heartbeat_interval=0.1, safety_interval=60)
    async with await RunRegistry.connect(url, worker_id="keeper", settings=keeper) as alive:
        await alive.register("run-mine", "agent", "thread-mine")  # starts its heartbeat
        watched = await alive.handle_by_run_id("run-orphan")
        assert watched is not None
        inbox = watched.decisions()
        # nobody calls sweep_cancelled_orphans(): the heartbeat must
        await _until(lambda: _is(url, "run-orphan", "cancelled"), "the heartbeat swept the orphan")
        # its inbox ends, woken by the sweep's notification
        with pytest.raises(StopAsyncIteration):
            await _within(anext(inbox), "the swept orphan's inbox ended")
        assert await _status(url, "run-mine") == "active"


async def _is(url: str, run_id: str, status: str) -> bool:
    return await _status(url, run_id) == status


# --- 3 and 4. a server restart whose goodbye never arrived -------------------------------------


class LostGoodbyeProxy:
    """A TCP relay to PostgreSQL whose connections can miss the server's goodbye.

    After :meth:`lose_goodbyes`, the connections relayed so far never hear from the server
    again (its bytes and its end are dropped), and a client that writes on one gets a TCP
    reset: what a client sees of a server restarted while the packets of its goodbye were lost
    (a failover, a host restart, a NAT that forgot its state). Its connections look alive
    until used, one by one. Connections made later are relayed as usual.
    """

    def __init__(self, database_url: str) -> None:
        self._target = target_of(database_url)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._severed: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()
        self._relays: set[asyncio.Task[None]] = set()

    def url(self, database_url: str) -> str:
        """``database_url`` through the proxy."""
        from sqlalchemy.engine import make_url

        parsed = make_url(database_url).difference_update_query(["host", "port"])
        return parsed.set(host="127.0.0.1", port=self._port).render_as_string(hide_password=False)

    def lose_goodbyes(self) -> None:
        """From now on the current connections hear nothing and reset when written to."""
        self._severed |= self._clients

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for client in list(self._clients):
            _reset(client)
        await asyncio.gather(*self._relays, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        self._relays.add(relay)
        self._clients.add(client_w)
        server_w: asyncio.StreamWriter | None = None
        try:
            host, port = self._target
            if host.startswith("/"):
                server_r, server_w = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                server_r, server_w = await asyncio.open_connection(host, port)
            down = asyncio.create_task(self._down(server_r, client_w))
            try:
                await self._up(client_r, client_w, server_w)
            finally:
                down.cancel()
                await asyncio.gather(down, return_exceptions=True)
        except OSError:
            pass
        finally:
            for writer in (client_w, server_w):
                if writer is not None:
                    _reset(writer)
            self._clients.discard(client_w)
            self._severed.discard(client_w)
            self._relays.discard(relay)

    async def _up(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        server_w: asyncio.StreamWriter,
    ) -> None:
        while data := await client_r.read(65536):
            if client_w in self._severed:
                return  # the relay resets the client: a restarted host knows no such connection
            server_w.write(data)
            await server_w.drain()

    async def _down(self, server_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await server_r.read(65536):
                if client_w not in self._severed:
                    client_w.write(data)
                    await client_w.drain()
        if client_w in self._severed:
            return  # the goodbye is lost: the client's socket stays open, silent
        client_w.close()  # the server's end reaches the client


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.fixture
async def proxy(registry_database_url: str) -> AsyncIterator[LostGoodbyeProxy]:
    async with LostGoodbyeProxy(registry_database_url) as relay:
        yield relay


async def _restart_without_goodbye(proxy: LostGoodbyeProxy, url: str) -> list[int]:
    """Terminate every query backend of the registry (what a restart does to them) while
    their clients never hear it; return the pids that were terminated."""
    pids = await session_pids(url, APPLICATION_NAME)
    assert pids, "the registry has no query connection to lose"
    proxy.lose_goodbyes()
    await _sql(url, "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)
    await _until(lambda: _none_of(url, pids), f"the server ended the terminated backends {pids}")
    return pids


async def _none_of(url: str, pids: list[int]) -> bool:
    return not set(pids) & set(await session_pids(url, APPLICATION_NAME))


async def _pid_or_error(lane: ConnectionLane) -> int | DatabaseUnavailableError:
    """One statement that is not retried: the server pid that ran it, or the error."""
    try:
        async with lane.autocommit() as connection:
            pid: int = await connection.fetchval("SELECT pg_backend_pid()")
            return pid
    except DatabaseUnavailableError as exc:
        return exc


# breaks if: a connection that broke no longer discards its idle siblings (``_discard_idle``)
async def test_after_a_restart_one_call_fails_and_the_next_reconnect_at_once(
    registry_database_url: str, proxy: LostGoodbyeProxy
) -> None:
    url = registry_database_url
    lane = ConnectionLane(asyncpg_dsn(proxy.url(url)), 4, call_timeout=DEADLINE)
    try:
        # four connections held at once, so four distinct ones, all idle afterwards
        together = asyncio.Barrier(4)

        async def hold() -> int:
            async with lane.autocommit() as connection:
                pid: int = await connection.fetchval("SELECT pg_backend_pid()")
                await together.wait()
                return pid

        before = set(await asyncio.gather(*(hold() for _ in range(4))))
        assert len(before) == 4
        assert set(await _restart_without_goodbye(proxy, url)) == before
        outcomes = [await _pid_or_error(lane) for _ in range(4)]
        # the first call meets a dead connection, and its failure condemns the other three
        assert isinstance(outcomes[0], DatabaseUnavailableError), outcomes
        fresh = outcomes[1:]
        assert all(isinstance(outcome, int) for outcome in fresh), (
            f"calls after the first failure failed too, one dead connection each: {outcomes}"
        )
        assert len(set(fresh)) == 1
        assert not set(fresh) & before
    finally:
        await lane.close()


# breaks if: ``retry_once`` no longer repeats a read on a fresh connection
async def test_a_lookup_right_after_a_restart_succeeds_on_a_fresh_connection(
    registry_database_url: str, proxy: LostGoodbyeProxy
) -> None:
    url = registry_database_url
    async with await RunRegistry.connect(proxy.url(url), listen=False, settings=QUIET) as runs:
        await runs.register("run-1", "agent-a", "thread-1")
        await _restart_without_goodbye(proxy, url)
        # a repeatable read: its first attempt meets the dead connection, the retry a new one
        handle = await runs.handle_by_run_id("run-1")
        assert handle is not None
        assert handle.thread_id == "thread-1"
        await _restart_without_goodbye(proxy, url)
        assert await runs.active_run_id_for_thread("agent-a", "thread-1") == "run-1"


# --- 5. the coalesced chunk notification is sent ---------------------------------------------


# breaks if: ChunkPublisher._flush no longer sends its NOTIFY
async def test_a_chunk_published_inside_the_notify_window_wakes_subscribers_when_it_closes(
    registry_database_url: str,
) -> None:
    window = 1.0
    settings = RegistrySettings(safety_interval=60, stream_notify_window=window)
    async with await RunRegistry.connect(registry_database_url, settings=settings) as runs:
        handle = await runs.register("run-1", "agent-a", "thread-1")
        assert await handle.bind_stream_fanout()
        subscription = await runs.subscribe_thread_run_stream("run-1", after_seq=0)
        assert subscription is not None
        loop = asyncio.get_running_loop()
        opened = loop.time()
        assert await handle.publish(b"first") == 1  # notifies at once, and opens the window
        assert (await asyncio.wait_for(anext(subscription), DEADLINE)).data == b"first"
        # the subscriber has nothing to read now: only a notification can wake it
        assert await handle.publish(b"second") == 2
        assert loop.time() - opened < window, "the second publish was not inside the window"
        chunk = await _within(
            anext(subscription), "the window's notification woke the subscriber", window + DEADLINE
        )
        assert (chunk.seq, chunk.data) == (2, b"second")


# --- 6. a handle takes the row's cancel --------------------------------------------------------


# breaks if: RunHandle.__init__ no longer applies the record's cancel_requested_at
async def test_runs_cancelled_while_nobody_watched_come_back_with_tripped_tokens(
    registry_database_url: str,
) -> None:
    url = registry_database_url
    async with await RunRegistry.connect(url, worker_id="w1") as first:
        for name in ("resumed-by-call", "resumed-by-sql"):
            await first.register(name, "agent", f"thread-{name}")
    async with await RunRegistry.connect(url, worker_id="dead") as dead:
        for name in ("adopted-by-call", "adopted-by-sql"):
            await dead.register(name, "agent", f"thread-{name}")
    # cancelled from another registry, and by SQL alone (no notification at all), while no
    # registry that will hold the runs was connected to hear of it
    async with await RunRegistry.connect(url, worker_id="steerer") as steerer:
        for name in ("resumed-by-call", "adopted-by-call"):
            assert await steerer.cancel_active_run_by_id(name)
    await _sql(
        url, "UPDATE registry.runs SET cancel_requested_at = now() WHERE run_id LIKE '%-by-sql'"
    )
    await _sql(url, "UPDATE registry.runs SET lease_expires_at = now() - interval '1 second'")

    async with (
        await RunRegistry.connect(url, worker_id="w1", settings=QUIET) as again,
        await RunRegistry.connect(url, worker_id="heir", settings=QUIET) as heir,
    ):
        resumed = await again.resume_owned_runs()
        adopted = await heir.adopt_orphaned_runs()
        assert sorted(handle.run_id for handle in resumed) == ["resumed-by-call", "resumed-by-sql"]
        assert sorted(handle.run_id for handle in adopted) == ["adopted-by-call", "adopted-by-sql"]
        # at once: no notification will come, and the safety re-check is a minute away
        not_tripped = [
            handle.run_id
            for handle in resumed + adopted
            if not handle.cancellation_token().is_cancelled()
        ]
        assert not_tripped == []
        # a handle looked up is a view of the same row
        looked_up = await heir.handle_by_run_id("resumed-by-sql")
        assert looked_up is not None
        assert looked_up.cancellation_token().is_cancelled()


# --- 7 and 8. the inbox wakes itself ---------------------------------------------------------


# breaks if: DecisionInbox.aclose() no longer sets the inbox's wake-up
async def test_closing_a_parked_inbox_ends_its_consumer_at_once(
    registry_database_url: str,
) -> None:
    # no listener and no re-check within the test: nothing else could wake the inbox
    async with await RunRegistry.connect(
        registry_database_url, listen=False, settings=QUIET
    ) as runs:
        handle = await runs.register("run-1", "agent-a", "thread-1")
        inbox = handle.decisions()
        waiting = asyncio.ensure_future(anext(inbox))
        try:
            await _still_waiting(waiting)  # claimed nothing, parked
            await inbox.aclose()
            with pytest.raises(StopAsyncIteration):
                await _within(waiting, "the closed inbox woke and ended")
        finally:
            waiting.cancel()


# breaks if: the inbox no longer wakes itself after a full batch (``if claim.full``)
async def test_decisions_past_one_batch_arrive_without_a_wake_up(
    registry_database_url: str,
) -> None:
    settings = RegistrySettings(safety_interval=60, inbox_batch=2)
    # no listener: the forwards' notifications cannot wake the inbox
    async with await RunRegistry.connect(
        registry_database_url, listen=False, settings=settings
    ) as runs:
        handle = await runs.register("run-1", "agent-a", "thread-1")
        names = [f"d{i}" for i in range(5)]
        await runs.forward_decisions_by_run_id("run-1", [_decision(name) for name in names])
        async with handle.decisions() as inbox:
            got = [await _within(anext(inbox), f"decision {name} arrived") for name in names]
        assert [delivery.decision.decision_id for delivery in got] == names


# --- 9. the claim locks what it claims ---------------------------------------------------------


async def _lock_waiters(url: str) -> int:
    """Sessions of the test's database waiting for a lock (asked on a connection of its own:
    a transaction sees one snapshot of ``pg_stat_activity``)."""
    [row] = await fetch(
        url,
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    return int(row["n"])


# breaks if: the claim's candidates are read without ``FOR UPDATE``
async def test_a_decision_acked_while_another_inbox_claims_is_not_delivered_again(
    registry_database_url: str,
) -> None:
    url = registry_database_url
    admin = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with await RunRegistry.connect(url, settings=QUIET) as runs:
            handle = await runs.register("run-1", "agent-a", "thread-1")
            await runs.forward_decisions_by_run_id("run-1", [_decision("d1")])
            first = handle.decisions()
            delivery = await asyncio.wait_for(anext(first), DEADLINE)
            # a second inbox of the run (a consumer restarted while the first one still acks)
            second = handle.decisions()
            # the row lock orders the race: the ack takes the row first, the claim after it
            async with _racing() as race:
                async with admin.transaction():
                    await admin.execute(
                        "SELECT 1 FROM registry.decisions WHERE id = $1 FOR UPDATE",
                        delivery.delivery_id,
                    )
                    acking = race(first.ack(delivery))
                    await _until(lambda: _waiting_for(url, 1), "the ack waits for the row")
                    claiming = race(anext(second))
                    await _until(lambda: _waiting_for(url, 2), "the claim waits behind it")
                assert await asyncio.wait_for(acking, DEADLINE)
                await runs.forward_decisions_by_run_id("run-1", [_decision("d2")])
                claimed = await asyncio.wait_for(claiming, DEADLINE)
            assert claimed.decision.decision_id == "d2", (
                f"decision {claimed.decision.decision_id} was delivered again after its ack"
            )
        rows = await fetch(
            url, "SELECT decision_id, status, attempts FROM registry.decisions ORDER BY id"
        )
        assert [(row["decision_id"], row["status"], row["attempts"]) for row in rows] == [
            ("d1", "acked", 1),
            ("d2", "delivered", 1),
        ]
    finally:
        await admin.close()


async def _waiting_for(url: str, count: int) -> bool:
    return await _lock_waiters(url) >= count


@contextlib.asynccontextmanager
async def _racing() -> AsyncIterator[Callable[[Awaitable[_T]], asyncio.Task[_T]]]:
    """Start tasks with the callable it gives; those still running at the end are cancelled."""
    tasks: list[asyncio.Task[Any]] = []

    def start(step: Awaitable[_T]) -> asyncio.Task[_T]:
        async def run() -> _T:
            return await step

        task = asyncio.create_task(run())
        tasks.append(task)
        return task

    try:
        yield start
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- survivors of `make mutate MODULE=upkeep` that were real gaps ------------------------------


# breaks if: SafetyNet.refresh ends the watch of a run it found, or applies the row without
# its cancel (``if not states`` inverted, ``cancel_requested=None``, ``apply(None, ...)``)
async def test_a_token_refresh_applies_the_row_and_leaves_an_active_run_open(
    registry_database_url: str,
) -> None:
    async with await RunRegistry.connect(
        registry_database_url, listen=False, settings=QUIET
    ) as runs:
        handle = await runs.register("run-1", "agent-a", "thread-1")
        token = handle.cancellation_token()
        assert not await token.refresh()
        await _sql(registry_database_url, "UPDATE registry.runs SET cancel_requested_at = now()")
        assert not token.is_cancelled()  # nothing told it: no listener, no re-check yet
        assert await token.refresh()
        # cancelled is not ended: the run's inbox still waits for decisions
        async with handle.decisions() as inbox:
            waiting = asyncio.ensure_future(anext(inbox))
            try:
                await _still_waiting(waiting)
            finally:
                waiting.cancel()


# breaks if: the periodic re-check no longer wakes subscribers behind the table
# (``if state.stream_seq is None`` inverted, or ``continue`` turned into ``break``)
async def test_a_subscriber_whose_chunk_notification_is_lost_is_woken_by_the_recheck(
    registry_database_url: str,
) -> None:
    url = registry_database_url
    # no listener: every notification is lost to this registry; only the re-check remains
    recheck = RegistrySettings(safety_interval=0.1)
    async with (
        await RunRegistry.connect(url, listen=False, settings=recheck) as watching,
        await RunRegistry.connect(url, settings=QUIET) as owner,
    ):
        # a watched run without a stream, registered first, and the one that streams
        await owner.register("run-a-quiet", "agent-a", "thread-a")
        streaming = await owner.register("run-b-streams", "agent-a", "thread-b")
        assert await streaming.bind_stream_fanout()
        quiet = await watching.handle_by_run_id("run-a-quiet")
        assert quiet is not None
        subscription = await watching.subscribe_thread_run_stream("run-b-streams")
        assert subscription is not None
        waiting = asyncio.ensure_future(anext(subscription))
        try:
            await _still_waiting(waiting)  # replayed the empty stream, parked
            assert await streaming.publish(b"unannounced") == 1
            chunk = await _within(waiting, "the re-check woke the subscriber")
        finally:
            waiting.cancel()
        assert (chunk.seq, chunk.data) == (1, b"unannounced")


# breaks if: LeaseKeeper.lease_for gives a looked-up handle a lease without the record's epoch
async def test_a_looked_up_handle_is_fenced_at_the_epoch_it_was_read_at(
    registry_database_url: str,
) -> None:
    url = registry_database_url
    async with (
        await RunRegistry.connect(url, worker_id="w1", settings=QUIET) as owner,
        await RunRegistry.connect(url, worker_id="reader", settings=QUIET) as reader,
    ):
        await owner.register("run-1", "agent-a", "thread-1")
        looked_up = await reader.handle_by_run_id("run-1")
        assert looked_up is not None
        # the same worker id restarted elsewhere takes the run over: its epoch moves on
        async with await RunRegistry.connect(url, worker_id="w1", settings=QUIET) as again:
            [resumed] = await again.resume_owned_runs()
            assert resumed.record.owner_epoch > looked_up.record.owner_epoch
            with pytest.raises(LeaseLostError):
                await looked_up.remove()
            record = await again.run("run-1")
            assert record is not None
            assert record.status is RunStatus.ACTIVE, "a stale handle ended a run taken over"
