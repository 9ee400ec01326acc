"""The one LISTEN connection of a process.

The listener owns a dedicated asyncpg connection outside the query pool, LISTENs on the fixed
channel, parses each payload into a typed :class:`Notification` and hands it to a callback. It
knows nothing of runs. It probes its connection with a round trip every ``health_interval`` (a
dead or half-open socket fails the probe), reconnects with backoff, and then calls
``on_reconnect`` so that every waiter re-reads the tables: notifications sent while it was away
are lost, and the tables are the truth.

The connection must reach PostgreSQL directly or through a session-pooling proxy: a
transaction-pooling proxy (pgbouncer ``pool_mode=transaction``) does not keep LISTEN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from registry.notifications import CHANNEL, Notification, parse

logger = logging.getLogger(__name__)

#: ``application_name`` of the LISTEN connection, to find it in ``pg_stat_activity``.
LISTENER_APPLICATION_NAME = "registry-listener"

#: A round trip on the LISTEN connection that a half-open socket cannot complete.
HealthProbe = Callable[[Any], Awaitable[object]]


class Listener:
    """A supervised LISTEN connection that turns payloads into callbacks.

    ``on_notification`` runs inside the driver's callback and must only set events or enqueue.
    """

    def __init__(
        self,
        dsn: str,
        on_notification: Callable[[Notification], None],
        on_reconnect: Callable[[], None],
        *,
        probe: HealthProbe,
        health_interval: float = 2.0,
        connect_timeout: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._on_notification = on_notification
        self._on_reconnect = on_reconnect
        self._probe = probe
        self._health_interval = health_interval
        self._connect_timeout = connect_timeout
        self._max_backoff = max_backoff
        self._connection: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        #: How many times the connection was re-established after a loss.
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """Whether the LISTEN connection is currently up."""
        return self._connection is not None and not self._connection.is_closed()

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection (for operators and fault tests)."""
        if self._connection is None or self._connection.is_closed():
            return None
        pid: int = self._connection.get_server_pid()
        return pid

    async def start(self) -> None:
        """Connect and LISTEN; raises if the first connection fails."""
        await self._connect()
        self._supervisor = asyncio.create_task(self._supervise(), name="registry-listener")

    async def stop(self) -> None:
        """Stop supervising and close the connection."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._close()

    async def _connect(self) -> None:
        connection = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            server_settings={"application_name": LISTENER_APPLICATION_NAME},
        )
        try:
            await connection.add_listener(CHANNEL, self._deliver)
        except BaseException:
            await connection.close()
            raise
        connection.add_termination_listener(self._terminated)
        self._lost.clear()
        self._connection = connection
        logger.debug("listening on %s (backend %s)", CHANNEL, connection.get_server_pid())

    async def _close(self, *, graceful: bool = True) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.remove_termination_listener(self._terminated)
        if connection.is_closed():
            return
        if not graceful:
            connection.terminate()  # a dead or frozen peer would not answer a goodbye
            return
        try:
            await asyncio.wait_for(connection.close(), self._connect_timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            connection.terminate()

    def _deliver(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        notification = parse(str(payload))
        if notification is None:
            logger.debug("ignoring notification payload %r", str(payload)[:200])
        else:
            self._on_notification(notification)

    def _terminated(self, _connection: object) -> None:
        self._lost.set()

    async def _healthy(self) -> bool:
        # a round trip, not the socket state: a half-open socket still looks open
        connection = self._connection
        if connection is None or connection.is_closed():
            return False
        try:
            await asyncio.wait_for(self._probe(connection), self._health_interval)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False
        return True

    async def _supervise(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._health_interval)
            if not self._lost.is_set() and await self._healthy():
                continue
            logger.warning("listener connection lost; reconnecting")
            await self._close(graceful=False)
            await self._reconnect()

    async def _reconnect(self) -> None:
        delay = 0.05
        while not self._stopping:
            try:
                await self._connect()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                logger.info("listener reconnect failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
                continue
            self.reconnects += 1
            logger.info("listener reconnected after loss")
            # after LISTEN is back: whatever changed meanwhile is only in the tables
            self._on_reconnect()
            return
