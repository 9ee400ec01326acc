"""The one LISTEN connection of a process.

The listener owns a dedicated asyncpg connection outside the query pool, LISTENs on the fixed
channel, parses each payload into a typed :class:`Notification` and hands it to a callback. It
knows nothing of runs. It probes its connection with a round trip every ``health_interval`` (a
dead or half-open socket fails the probe), reconnects with backoff, and then calls
``on_reconnect`` so that every waiter re-reads the tables: notifications sent while it was away
are lost, and the tables are the truth.

The supervisor that does this never gives up: any failure (a probe meeting the server's goodbye,
a refused connection, a driver error) costs a reconnect, never the task. Only :meth:`stop`
ends it.

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

from registry.notifications import CHANNEL, Notification, NotificationKey, parse

logger = logging.getLogger(__name__)

#: ``application_name`` of the LISTEN connection, to find it in ``pg_stat_activity``.
LISTENER_APPLICATION_NAME = "registry-listener"

#: A round trip on the LISTEN connection that a half-open socket cannot complete.
HealthProbe = Callable[[Any], Awaitable[object]]
#: Opens the LISTEN connection within the given seconds (raising the driver's errors).
Connector = Callable[[float], Awaitable[asyncpg.Connection]]

#: Seconds before the first reconnect attempt after a failure; doubled per failure in a row.
_FIRST_BACKOFF = 0.05
#: A connection that stayed up this long (or one health interval, if shorter) proves the server
#: takes us: its loss is reconnected at once and resets the backoff. Seconds.
_STABLE_AFTER = 1.0
#: The least time a probe is given, in seconds: a slow answer under load is not a dead socket.
_MIN_PROBE_TIMEOUT = 1.0
#: Seconds ``stop`` waits for the supervisor to end, then for a polite goodbye, each.
_STOP_GRACE = 2.0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Listener:
    """A supervised LISTEN connection that turns payloads into callbacks.

    ``on_notification`` runs inside the driver's callback and must only set events or enqueue.
    ``on_reconnect`` runs in the supervisor after each reconnect, once LISTEN is back.
    Only the supervisor task operates on the connection (connect, LISTEN, probe), one operation
    at a time, and :meth:`stop` closes it only once the supervisor has ended, so a probe never
    overlaps another operation. ``health_interval``, ``connect_timeout`` and ``max_backoff``
    (the longest pause between reconnect attempts) are in seconds. ``connect`` opens the
    connection (the registry passes one that applies the URL's parameters, as its query
    connections do); without it, ``dsn`` goes to ``asyncpg.connect`` as it is.
    """

    def __init__(
        self,
        dsn: str,
        on_notification: Callable[[Notification], None],
        on_reconnect: Callable[[], None],
        *,
        key: NotificationKey,
        probe: HealthProbe,
        health_interval: float = 2.0,
        connect_timeout: float = 5.0,
        max_backoff: float = 2.0,
        connect: Connector | None = None,
    ) -> None:
        self._dsn = dsn
        self._open = self._open_dsn if connect is None else connect
        self._on_notification = on_notification
        self._on_reconnect = on_reconnect
        self._key = key
        self._probe = probe
        self._health_interval = health_interval
        self._connect_timeout = connect_timeout
        self._max_backoff = max_backoff
        self._connection: asyncpg.Connection | None = None
        self._connected_at = 0.0
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
    def supervising(self) -> bool:
        """Whether the supervisor task is running (from :meth:`start` until :meth:`stop`)."""
        return self._supervisor is not None and not self._supervisor.done()

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection (for operators and fault tests)."""
        if self._connection is None or self._connection.is_closed():
            return None
        pid: int = self._connection.get_server_pid()
        return pid

    async def start(self) -> None:
        """Connect and LISTEN, then supervise the connection in a background task.

        Raises the driver's error (``OSError``, ``asyncpg`` errors, ``TimeoutError`` after
        ``connect_timeout`` seconds) if the first connection fails; nothing is left running.
        """
        self._stopping = False
        await self._connect()
        supervisor = asyncio.create_task(self._supervise(), name="registry-listener")
        supervisor.add_done_callback(self._supervisor_ended)
        self._supervisor = supervisor

    async def stop(self) -> None:
        """Stop supervising and close the connection; calling it again does nothing.

        Takes about 4 seconds at most: the supervisor is cancelled and given 2 seconds to end,
        and a connection whose server does not answer the goodbye within 2 seconds is
        terminated. Raises
        nothing, except :class:`asyncio.CancelledError` when the calling task is cancelled
        meanwhile: the connection is then terminated at once and the cancellation re-raised.
        """
        self._stopping = True
        supervisor, self._supervisor = self._supervisor, None
        try:
            if supervisor is not None:
                supervisor.cancel()
                # asyncio.wait, not await: the caller's own cancellation must not be mistaken
                # for the supervisor's
                await asyncio.wait({supervisor}, timeout=_STOP_GRACE)
                if not supervisor.done():
                    # it may be mid-operation on the connection: no goodbye on top of that
                    logger.warning("listener supervisor did not end within %.1fs", _STOP_GRACE)
                    self._discard()
            await self._close()
        except asyncio.CancelledError:
            self._discard()
            raise

    def _supervisor_ended(self, task: asyncio.Task[None]) -> None:
        # the loop never ends on an error, but if it did, say so here (not as an unretrieved
        # task exception) and leave stop() with nothing to raise
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("listener supervisor ended: %s", _describe(exc), exc_info=exc)

    async def _open_dsn(self, connect_timeout: float) -> asyncpg.Connection:
        connection: asyncpg.Connection = await asyncpg.connect(
            self._dsn,
            timeout=connect_timeout,
            server_settings={"application_name": LISTENER_APPLICATION_NAME},
        )
        return connection

    async def _connect(self) -> asyncpg.Connection:
        connection = await self._open(self._connect_timeout)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await connection.add_listener(CHANNEL, self._deliver)
        except BaseException:
            # its protocol state is unknown (maybe mid-LISTEN): no goodbye, just drop it
            connection.terminate()
            raise
        connection.add_termination_listener(self._terminated)
        self._lost.clear()
        self._connection = connection
        self._connected_at = asyncio.get_running_loop().time()
        logger.debug("listening on %s (backend %s)", CHANNEL, connection.get_server_pid())
        return connection

    async def _close(self) -> None:
        # politely, but bounded: a dead or frozen peer would never answer the goodbye
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.remove_termination_listener(self._terminated)
        if connection.is_closed():
            connection.terminate()  # releases what the driver still holds; never raises
            return
        try:
            async with asyncio.timeout(_STOP_GRACE):
                await connection.close()
        except asyncio.CancelledError:
            connection.terminate()
            raise
        except Exception as exc:
            logger.debug("listener connection did not close politely (%s)", _describe(exc))
            connection.terminate()

    def _discard(self) -> None:
        """Drop the connection at once, without a goodbye (its state is unknown or dead)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.remove_termination_listener(self._terminated)
            connection.terminate()

    def _deliver(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        notification = parse(str(payload), self._key)
        if notification is None:
            # unsigned or forged (any role may NOTIFY), or not ours: the tables decide
            logger.debug("ignoring notification payload %r", str(payload)[:200])
        else:
            self._on_notification(notification)

    def _terminated(self, connection: object) -> None:
        # the driver calls this soon after the loss, maybe once a new connection replaced the
        # lost one: only the current connection's loss counts
        if connection is self._connection:
            self._lost.set()

    async def _probe_failure(self, connection: asyncpg.Connection) -> str | None:
        """Why a round trip on ``connection`` failed, or ``None`` if it succeeded."""
        # a round trip, not the socket state: a half-open socket still looks open
        if connection.is_closed():
            return "closed"
        try:
            async with asyncio.timeout(max(self._health_interval, _MIN_PROBE_TIMEOUT)):
                await self._probe(connection)
        except asyncio.CancelledError:
            # stop() cut the round trip short: the protocol is mid-query, nothing may follow
            self._discard()
            raise
        except Exception as exc:
            # a timeout is a half-open socket; InternalClientError ("another operation is in
            # progress") is a probe that met the server's FATAL goodbye before its socket
            # closed; either way the connection is gone
            return _describe(exc)
        return None

    async def _until_lost(self, connection: asyncpg.Connection) -> str:
        """Wait until ``connection`` is lost (the server closed it or a probe failed); why."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._health_interval):
                    await self._lost.wait()
            if self._lost.is_set():
                return "the server closed it"
            failure = await self._probe_failure(connection)
            if failure is not None:
                return f"health probe failed: {failure}"

    async def _supervise(self) -> None:
        # only stop()'s cancellation ends this loop: CancelledError is not an Exception
        loop = asyncio.get_running_loop()
        delay = _FIRST_BACKOFF
        failures = 0  # in a row, for the backoff and to log one traceback per streak
        while not self._stopping:
            try:
                connection = self._connection
                if connection is None:
                    connection = await self._connect()
                    self.reconnects += 1
                    logger.info("listener reconnected after loss")
                    self._reconnected()
                reason = await self._until_lost(connection)
            except Exception as exc:
                failures += 1
                self._discard()
                logger.warning(
                    "listener failed (%s); reconnecting in %.2fs",
                    _describe(exc),
                    delay,
                    exc_info=exc if failures == 1 else None,
                )
            else:
                lived = loop.time() - self._connected_at
                self._discard()
                if lived >= min(self._health_interval, _STABLE_AFTER):
                    failures, delay = 0, _FIRST_BACKOFF
                    logger.warning("listener connection lost (%s); reconnecting", reason)
                    continue
                # connections that die young count as failures: back off
                failures += 1
                logger.warning(
                    "listener connection lost after %.2fs (%s); reconnecting in %.2fs",
                    lived,
                    reason,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff)

    def _reconnected(self) -> None:
        # after LISTEN is back: whatever changed meanwhile is only in the tables
        try:
            self._on_reconnect()
        except Exception:
            # the connection is fine; reconnecting would not help the callback
            logger.exception("listener on_reconnect callback failed")
