"""The registry's query connections: a lane of driver connections kept open between statements.

Every statement of the registry is short, so what it costs around the round trip matters. The
lane keeps at most ``size`` asyncpg connections open and hands each, whole, to one caller at a
time: no per-statement checkout bookkeeping, no reset round trip on return. ``bench/core.py``
measures it against asyncpg's own pool (with its reset disabled) in the same run; that figure is
why this module exists rather than ``asyncpg.create_pool``.

The four ways in say what they do: :meth:`ConnectionLane.autocommit` (one statement, which
PostgreSQL makes one transaction), :meth:`~ConnectionLane.transaction` (``BEGIN`` ... ``COMMIT``),
:meth:`~ConnectionLane.retry_once` (a repeatable statement, once more on a fresh connection
after the server went away) and :meth:`~ConnectionLane.retry_until_available` (waiters that
sit out an outage). Errors that mean the server is unreachable leave as
:class:`~registry.errors.DatabaseUnavailableError`; server errors leave as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from registry.database import (
    DriverConnection,
    close_quietly,
    connect,
    connection_survives,
    translate_errors,
)
from registry.errors import DatabaseUnavailableError, RegistryClosedError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class ConnectionLane:
    """At most ``size`` driver connections to ``dsn``, each used by one caller at a time.

    A caller that finds every connection busy waits for one. A connection on which the server
    became unreachable is discarded, and so is every idle one (after a server restart or a
    failover they are all dead); the next caller opens a fresh connection. A connection whose
    caller was cancelled mid-statement is discarded too: its protocol state is unknown.
    """

    def __init__(self, dsn: str, size: int, *, connect_timeout: float = 60.0) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(size)
        # last in, first out: the warmest connection is reused and the others may idle
        self._idle: list[DriverConnection] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def autocommit(self) -> contextlib.AbstractAsyncContextManager[DriverConnection]:
        """A connection for single statements, each its own transaction (one round trip)."""
        return self._borrow(transaction=False)

    def transaction(self) -> contextlib.AbstractAsyncContextManager[DriverConnection]:
        """A connection inside ``BEGIN`` ... ``COMMIT``; rolled back if the block raises."""
        return self._borrow(transaction=True)

    async def retry_once(self, operation: Callable[[DriverConnection], Awaitable[_T]]) -> _T:
        """Run a repeatable statement; once more on a fresh connection if the server went away.

        After a server restart every open connection is broken; the first failure discards
        them all, so the repeat connects anew.
        """
        try:
            async with self.autocommit() as connection:
                return await operation(connection)
        except DatabaseUnavailableError:
            logger.debug("retrying a repeatable statement on a fresh connection")
        async with self.autocommit() as connection:
            return await operation(connection)

    async def retry_until_available(
        self, operation: Callable[[DriverConnection], Awaitable[_T]], *, max_delay: float
    ) -> _T:
        """Run a repeatable statement, retrying with backoff (up to ``max_delay`` seconds
        apart) until the database answers; only :meth:`close` ends the wait, with
        :class:`~registry.errors.RegistryClosedError`."""
        delay = 0.05
        while True:
            try:
                return await self.retry_once(operation)
            except DatabaseUnavailableError as exc:
                logger.warning("database unavailable (%s); retrying in %.2fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)

    async def close(self) -> None:
        """Close every idle connection; borrowed ones close when given back. Idempotent."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await close_quietly(connection)

    @contextlib.asynccontextmanager
    async def _borrow(self, *, transaction: bool) -> AsyncIterator[DriverConnection]:
        if self._closed:
            raise RegistryClosedError()
        with translate_errors():
            async with self._slots:
                connection = await self._take()
                reusable = False
                try:
                    if transaction:
                        async with connection.transaction():
                            yield connection
                    else:
                        yield connection
                    reusable = True
                except Exception as exc:
                    reusable = connection_survives(exc)
                    if not reusable:
                        self._discard_idle()
                    raise
                finally:
                    # a cancelled statement (BaseException) may leave the protocol mid-reply
                    if reusable and not self._closed and not connection.is_closed():
                        self._idle.append(connection)
                    else:
                        connection.terminate()

    async def _take(self) -> DriverConnection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.is_closed():
                return connection
        if self._closed:
            raise RegistryClosedError()
        return await connect(self._dsn, connect_timeout=self._connect_timeout)

    def _discard_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.terminate()
