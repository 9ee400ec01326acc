"""Engines, URLs, driver connections, and the one place that classifies driver errors.

Statements run on asyncpg connections (see ``connections``, ``listener``); SQLAlchemy provides
URL handling and the engine that Alembic migrates through (see ``schema``). Every driver or
SQLAlchemy error that means "the server is not there" becomes
:class:`~registry.errors.DatabaseUnavailableError` in :func:`translate_errors`, and nowhere else.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from registry.errors import DatabaseUnavailableError, InvalidInputError

if TYPE_CHECKING:
    #: A driver connection, the one kind of connection statements run on.
    DriverConnection: TypeAlias = asyncpg.Connection[asyncpg.Record]
else:
    DriverConnection = asyncpg.Connection

#: A row a driver connection returns (read by column name).
Row = asyncpg.Record

#: ``application_name`` of the query connections.
APPLICATION_NAME = "registry"

_DRIVERS = {"postgres", "postgresql", "postgresql+asyncpg", "asyncpg"}


def async_url(url: str | URL) -> URL:
    """Return ``url`` as a SQLAlchemy URL for the asyncpg driver.

    Accepts ``postgres://``, ``postgresql://`` and ``postgresql+asyncpg://`` forms, including
    a Unix socket given as ``?host=/path``. Raises :class:`InvalidInputError` for anything else.
    """
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError as exc:
        raise InvalidInputError("url", f"not a database URL: {exc}") from exc
    if parsed.drivername not in _DRIVERS:
        raise InvalidInputError(
            "url", f"unsupported scheme {parsed.drivername!r}; use postgresql://..."
        )
    return parsed.set(drivername="postgresql+asyncpg")


def asyncpg_dsn(url: str | URL) -> str:
    """Return ``url`` as a DSN that ``asyncpg.connect`` accepts."""
    return async_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(url: str | URL, *, pool_size: int = 1, **kwargs: Any) -> AsyncEngine:
    """A SQLAlchemy engine for Alembic and the schema check (never for the hot path)."""
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=kwargs.pop("max_overflow", 0),
        connect_args={"server_settings": {"application_name": APPLICATION_NAME}},
        **kwargs,
    )


async def connect(
    dsn: str, *, application_name: str = APPLICATION_NAME, connect_timeout: float = 60.0
) -> DriverConnection:
    """Open one driver connection to ``dsn`` (raises the driver's errors; wrap the call in
    :func:`translate_errors`)."""
    connection: DriverConnection = await asyncpg.connect(
        dsn, timeout=connect_timeout, server_settings={"application_name": application_name}
    )
    return connection


@contextlib.asynccontextmanager
async def admin_connection(
    url: str | URL, *, connect_timeout: float = 60.0
) -> AsyncIterator[DriverConnection]:
    """One short-lived autocommit driver connection, for maintenance statements (creating
    test databases, grants, the server version). Errors are translated; it is always closed.
    """
    with translate_errors():
        connection = await connect(asyncpg_dsn(url), connect_timeout=connect_timeout)
    try:
        with translate_errors():
            yield connection
    finally:
        with contextlib.suppress(Exception):
            await close_quietly(connection)


async def close_quietly(connection: DriverConnection) -> None:
    """Close a driver connection politely, or terminate it if the server does not answer
    within 5 seconds."""
    try:
        await connection.close(timeout=5.0)
    except Exception:
        connection.terminate()


async def driver_connection(connection: AsyncConnection) -> DriverConnection:
    """The asyncpg connection under a SQLAlchemy connection (to run a statement of
    ``repository`` on the connection Alembic migrates through)."""
    raw = await connection.get_raw_connection()
    driver: DriverConnection | None = raw.driver_connection
    if driver is None:  # pragma: no cover - a checked-out connection always has one
        raise RuntimeError("the SQLAlchemy connection has no driver connection")
    return driver


# --- error classification ---------------------------------------------------------------------


def driver_error(exc: BaseException) -> asyncpg.PostgresError | None:
    """The asyncpg error behind an exception (itself, its cause, or SQLAlchemy's ``orig``)."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, asyncpg.PostgresError):
            return current
        current = current.__cause__ or getattr(current, "orig", None)
    return None


def constraint_name(exc: BaseException) -> str | None:
    """The name of the constraint a driver error reports, mapped by name, never by message."""
    name = getattr(driver_error(exc), "constraint_name", None)
    return name if isinstance(name, str) else None


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE code of a driver error, if there is one."""
    code = getattr(driver_error(exc), "sqlstate", None)
    return code if isinstance(code, str) else None


#: SQLSTATEs that mean "the server is not there right now" besides class 08 (connection
#: exception): 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now.
_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03")

#: Exceptions that mean the server could not be reached or the connection broke.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    socket.gaierror,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    # what a connection the server already ended can raise before its EOF is read
    asyncpg.InternalClientError,
    InterfaceError,
    OperationalError,
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is unreachable rather than the statement wrong."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    code = sqlstate(exc)
    if code is not None:
        return code.startswith("08") or code in _UNAVAILABLE_STATES
    return isinstance(exc, UNREACHABLE)


def connection_survives(exc: BaseException) -> bool:
    """Whether a connection is still usable after ``exc`` escaped a block that used it.

    A server answer with a SQLSTATE leaves the session fine (unless it says the server is going
    away); a driver failure without an answer leaves the protocol state unknown; anything else
    is the caller's own error, raised between statements.
    """
    if sqlstate(exc) is not None:
        return not is_unavailable(exc)
    return not isinstance(exc, (*UNREACHABLE, DBAPIError, asyncpg.PostgresError))


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Raise :class:`DatabaseUnavailableError` for any error that means the server cannot be
    reached; let every other error through unchanged."""
    try:
        yield
    except DatabaseUnavailableError:
        raise
    except Exception as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailableError(f"cannot reach the database: {_describe(exc)}") from exc
        raise


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
