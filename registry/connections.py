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
sit out an outage and transient errors). Every error of the driver leaves as a
:class:`~registry.errors.DatabaseError` chosen by its SQLSTATE (see ``database``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from registry.database import (
    POOLER_STATES,
    RETIRE_STATES,
    DriverConnection,
    close_quietly,
    connect,
    connection_survives,
    is_unavailable,
    sqlstate,
    translate_errors,
)
from registry.errors import (
    DatabaseError,
    DatabaseUnavailableError,
    OutcomeUnknownError,
    RegistryClosedError,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class ConnectionLane:
    """At most ``size`` driver connections to ``dsn``, each used by one caller at a time.

    A caller that finds every connection busy waits for one. Every borrow has a deadline of
    ``call_timeout`` seconds (waiting for a connection, connecting, and the statements): past
    it the connection is discarded and :class:`~registry.errors.DatabaseUnavailableError`
    raised, so a silent server (a half-open socket) never blocks a caller. A connection on
    which the server became unreachable is discarded, and so is every idle one (after a server
    restart or a failover they are all dead). A connection whose session answered with a state
    that will not heal (a standby, a lost prepared statement) is retired alone. A connection
    whose caller was cancelled mid-statement is terminated, its protocol state being unknown,
    and the caller gets its ``CancelledError`` back, never a database error.
    ``statement_cache_size`` is asyncpg's prepared statement cache (0 behind pgbouncer in
    transaction mode).
    """

    def __init__(
        self,
        dsn: str,
        size: int,
        *,
        call_timeout: float = 5.0,
        connect_timeout: float | None = None,
        statement_cache_size: int = 100,
    ) -> None:
        self._dsn = dsn
        self._call_timeout = call_timeout
        self._connect_timeout = call_timeout if connect_timeout is None else connect_timeout
        self._statement_cache_size = statement_cache_size
        self._slots = asyncio.Semaphore(size)
        # last in, first out: the warmest connection is reused and the others may idle
        self._idle: list[DriverConnection] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def autocommit(
        self, *, write: bool = False
    ) -> contextlib.AbstractAsyncContextManager[DriverConnection]:
        """A connection for single statements, each its own transaction (one round trip).

        With ``write``, losing the connection once a statement may have been sent raises
        :class:`~registry.errors.OutcomeUnknownError`: the statement may have committed.
        """
        return self._borrow(transaction=False, write=write)

    def transaction(self) -> contextlib.AbstractAsyncContextManager[DriverConnection]:
        """A connection inside ``BEGIN`` ... ``COMMIT``; rolled back if the block raises.

        Losing the connection during the ``COMMIT`` raises
        :class:`~registry.errors.OutcomeUnknownError`; before it, nothing was written.
        """
        return self._borrow(transaction=True, write=True)

    async def retry_once(self, operation: Callable[[DriverConnection], Awaitable[_T]]) -> _T:
        """Run a repeatable statement; once more on a fresh connection if the server went away
        or the session was retired.

        After a server restart every open connection is broken; the first failure discards
        them all, so the repeat connects anew.
        """
        try:
            async with self.autocommit() as connection:
                return await operation(connection)
        except DatabaseError as exc:
            if not (isinstance(exc, DatabaseUnavailableError) or exc.sqlstate in RETIRE_STATES):
                raise
            logger.debug("retrying a repeatable statement on a fresh connection")
        async with self.autocommit() as connection:
            return await operation(connection)

    async def retry_until_available(
        self, operation: Callable[[DriverConnection], Awaitable[_T]], *, max_delay: float
    ) -> _T:
        """Run a repeatable statement, retrying transient errors (an outage, a timeout, a lock
        or statement timeout, too many connections) with backoff up to ``max_delay`` seconds
        apart; only :meth:`close` ends the wait, with
        :class:`~registry.errors.RegistryClosedError`. Errors a retry would repeat (a
        permission, a missing table) are raised."""
        delay = 0.05
        while True:
            try:
                return await self.retry_once(operation)
            except DatabaseError as exc:
                if not exc.is_transient:
                    raise
                logger.warning("database error (%s); retrying in %.2fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)

    async def close(self) -> None:
        """Close every idle connection; borrowed ones close when given back. Idempotent.

        Bounded in time: a connection whose server does not answer the polite close within
        a second is terminated.
        """
        self._closed = True
        idle, self._idle = self._idle, []
        # side by side, each terminated if cancelled meanwhile
        await asyncio.gather(*(close_quietly(connection, grace=1.0) for connection in idle))

    @contextlib.asynccontextmanager
    async def _borrow(self, *, transaction: bool, write: bool) -> AsyncIterator[DriverConnection]:
        if self._closed:
            raise RegistryClosedError()
        connection: DriverConnection | None = None
        reusable = False
        deadline = asyncio.timeout(self._call_timeout)
        # whether a lost connection leaves the outcome unknown: a single write once handed
        # its connection, a transaction once its COMMIT is on the way
        exposed: _Exposure = _Exposure()
        try:
            async with deadline:
                with translate_errors():
                    async with self._slots:
                        connection = await self._take()
                        try:
                            if transaction:
                                async with _Transaction(connection, exposed):
                                    yield connection
                            else:
                                exposed.sent = write
                                yield connection
                            reusable = True
                        except Exception as exc:
                            if not connection_survives(exc):
                                if is_unavailable(exc):
                                    self._discard_idle()
                                elif sqlstate(exc) in POOLER_STATES:
                                    self._stop_caching_statements()
                            else:
                                reusable = True
                            raise
                        finally:
                            self._give_back(connection, reusable=reusable)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            message = f"the database did not answer within {self._call_timeout:g} s"
            if exposed.sent:
                raise OutcomeUnknownError(f"{message}; the write may have committed") from exc
            raise DatabaseUnavailableError(message) from exc
        except DatabaseUnavailableError as exc:
            if not exposed.sent or isinstance(exc, OutcomeUnknownError):
                raise
            raise OutcomeUnknownError(f"{exc}; the write may have committed") from exc

    def _give_back(self, connection: DriverConnection, *, reusable: bool) -> None:
        # a cancelled statement (BaseException) may leave the protocol mid-reply: terminate
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
        # The connect runs in a task of its own that the caller's cancellation (or deadline)
        # does not reach: asyncpg cancelled mid-handshake leaves a future whose exception
        # nobody retrieves. A connection that arrives after its caller left joins the idle ones.
        opening = asyncio.ensure_future(
            connect(
                self._dsn,
                connect_timeout=self._connect_timeout,
                statement_cache_size=self._statement_cache_size,
            )
        )
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(self._opened_late)
            raise

    def _opened_late(self, opening: asyncio.Future[DriverConnection]) -> None:
        if opening.cancelled() or opening.exception() is not None:
            return  # the exception is retrieved, and nobody waits for it
        connection = opening.result()
        if self._closed:
            connection.terminate()
        else:
            self._idle.append(connection)

    def _discard_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.terminate()

    def _stop_caching_statements(self) -> None:
        # a prepared statement vanished between two statements of one session: a pooler in
        # transaction mode hands each transaction another server connection
        if self._statement_cache_size:
            logger.warning(
                "prepared statements do not outlive a transaction on this database (pgbouncer "
                "in transaction mode?); caching none from now on: set "
                "RegistrySettings(statement_cache_size=0)"
            )
            self._statement_cache_size = 0
        self._discard_idle()

    def terminate(self) -> None:
        """Close every idle connection at once, without a goodbye to the server; borrowed
        ones are terminated when given back. Idempotent; for a shutdown that must not wait."""
        self._closed = True
        self._discard_idle()


class _Exposure:
    """Whether a write has been sent whose commit is not confirmed yet."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


class _Transaction:
    """``BEGIN`` ... ``COMMIT``, rolled back when the block raises an exception.

    Unlike asyncpg's own, it never replaces the block's exception: when the block was
    cancelled, or the rollback fails, the connection is left for the lane to terminate (the
    server rolls back a transaction whose connection ends) and the original exception leaves.
    """

    __slots__ = ("_connection", "_exposed")

    def __init__(self, connection: DriverConnection, exposed: _Exposure) -> None:
        self._connection = connection
        self._exposed = exposed

    async def __aenter__(self) -> None:
        await self._connection.execute("BEGIN")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: object,
    ) -> None:
        if exc is None:
            self._exposed.sent = True
            await self._connection.execute("COMMIT")
            self._exposed.sent = False
        elif isinstance(exc, Exception) and connection_survives(exc):
            try:
                await self._connection.execute("ROLLBACK")
            except Exception:
                self._connection.terminate()
        # otherwise (cancelled, or the connection broke) the lane terminates the connection


async def converge(call: Callable[[], Awaitable[_T]]) -> _T:
    """Run a write whose retry converges (it is idempotent), once more if its connection
    broke before the reply (:class:`~registry.errors.OutcomeUnknownError`); not after a
    missed deadline, where a silent server would make the caller wait a second deadline."""
    try:
        return await call()
    except OutcomeUnknownError as exc:
        if isinstance(exc.__cause__, TimeoutError):
            raise
        logger.info("retrying a write whose outcome is unknown (%s)", exc)
        return await call()


def refused_by_server(error: Exception) -> bool:
    """Whether the server refused a statement for what it held (a constraint, a trigger): a
    :class:`DatabaseError` that is not transient, so another statement may well succeed."""
    return isinstance(error, DatabaseError) and not error.is_transient
