"""The registry's query connections, kept checked out of SQLAlchemy's pool between statements.

Checking a connection out of SQLAlchemy's async pool and back runs a few hundred microseconds
of Python (a greenlet switch, pool events, isolation-level set and reset): as much as the
round trip of the statement itself on a local server, and more when the process was idle and
its caches are cold. Every statement of the registry is short, so instead of a checkout per
statement the registry borrows connections from this lane: each one is checked out of the
engine (in autocommit mode) once, and handed from statement to statement until it breaks or
the registry closes. SQLAlchemy still creates, configures and finally closes every connection.

A transaction is the driver's own (``BEGIN`` ... ``COMMIT`` on the same connection); with the
SQLAlchemy connection in autocommit mode, SQLAlchemy statements simply run inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from registry.database import UNREACHABLE, is_unavailable, sqlstate
from registry.repository import driver


class ConnectionLane:
    """At most ``size`` autocommit connections of ``engine``, each used by one caller at a time.

    A caller that finds every connection busy waits for one. A connection on which the
    server became unreachable is invalidated, and so is every idle one (after a server
    restart they are all dead); the next caller opens a fresh connection.
    """

    def __init__(self, engine: AsyncEngine, size: int) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._slots = asyncio.Semaphore(size)
        # last in, first out: the warmest connection is reused and the others may idle
        self._idle: list[AsyncConnection] = []
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self, *, transaction: bool = False) -> AsyncIterator[AsyncConnection]:
        """Borrow a connection; with ``transaction``, inside ``BEGIN`` ... ``COMMIT``.

        A transaction is rolled back if the block raises. Errors that mean the server is
        unreachable are raised as they are; callers map them.
        """
        async with self._slots:
            connection = await self._take()
            reusable = False
            try:
                if transaction:
                    async with driver(connection).transaction():
                        yield connection
                else:
                    yield connection
                reusable = True
            except Exception as exc:
                reusable = _survives(exc)
                if not reusable:
                    # after a server restart or failover every idle sibling is dead too
                    await self._invalidate_idle()
                raise
            finally:
                # a cancelled statement (BaseException) may leave the protocol mid-reply
                if reusable and not self._closed and not driver(connection).is_closed():
                    self._idle.append(connection)
                else:
                    await _discard(connection)

    async def close(self) -> None:
        """Give every idle connection back to the engine (its pool then closes them)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _take(self) -> AsyncConnection:
        while self._idle:
            connection = self._idle.pop()
            if not driver(connection).is_closed():
                return connection
            await _discard(connection)  # the server ended it while it idled
        return await self._engine.connect()

    async def _invalidate_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await _discard(connection)


def _survives(exc: Exception) -> bool:
    """Whether a connection is still fine after ``exc`` escaped a block that used it."""
    if sqlstate(exc) is not None:
        # the server answered with an error: the statement failed, the session is fine,
        # unless the answer was that the server is going away
        return not is_unavailable(exc)
    # a driver failure without an answer leaves the protocol state unknown; anything else is
    # the caller's own error, raised between statements
    return not isinstance(exc, (*UNREACHABLE, DBAPIError))


async def _discard(connection: AsyncConnection) -> None:
    # invalidate: the pool must not hand out this DBAPI connection again
    with contextlib.suppress(Exception):
        await connection.invalidate()
    with contextlib.suppress(Exception):
        await connection.close()
