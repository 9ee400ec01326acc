"""Engines, driver connections, and the one place that classifies driver errors.

Statements run on asyncpg connections (see ``connections``, ``listener``), opened from a URL
as :mod:`registry.urls` reads it; SQLAlchemy provides the engine that Alembic migrates
through (see ``schema``). Every driver or
SQLAlchemy error that means "the server is not there" becomes
:class:`~registry.errors.DatabaseUnavailableError` in :func:`translate_errors`, and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
from sqlalchemy.engine import URL
from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from registry.errors import (
    DatabaseError,
    DatabaseUnavailableError,
    RegistryError,
)
from registry.urls import APPLICATION_NAME as APPLICATION_NAME
from registry.urls import DEFAULT_SCHEMA as DEFAULT_SCHEMA
from registry.urls import async_url as async_url
from registry.urls import asyncpg_dsn as asyncpg_dsn
from registry.urls import connect_arguments, schema_of

if TYPE_CHECKING:
    #: A driver connection, the one kind of connection statements run on.
    DriverConnection: TypeAlias = asyncpg.Connection[asyncpg.Record]
else:
    DriverConnection = asyncpg.Connection

#: A row a driver connection returns (read by column name).
Row = asyncpg.Record


class SchemaConnection(asyncpg.Connection):
    """A driver connection that knows the schema holding the registry's objects.

    Statements name their tables qualified (see ``repository``) rather than through
    ``search_path``: a session setting does not survive a pooler in transaction mode.
    """

    __slots__ = ()
    #: the schema of this connection's URL (see :func:`registry.urls.schema_of`)
    registry_schema: str = DEFAULT_SCHEMA


@functools.cache
def schema_connection_class(schema: str) -> type[SchemaConnection]:
    """The connection class whose connections work in ``schema`` (one class per schema)."""
    return type(
        "SchemaConnection", (SchemaConnection,), {"__slots__": (), "registry_schema": schema}
    )


def connection_schema(connection: DriverConnection) -> str:
    """The schema a driver connection works in (:data:`DEFAULT_SCHEMA` for one opened
    elsewhere than :func:`connect` or :func:`create_engine`)."""
    # not isinstance: asyncpg's metaclass makes every Connection an instance of each subclass
    schema: str = getattr(connection, "registry_schema", DEFAULT_SCHEMA)
    return schema


def create_engine(url: str | URL, *, pool_size: int = 1, **kwargs: Any) -> AsyncEngine:
    """A SQLAlchemy engine for Alembic and the schema check (never for the hot path).

    Its connections are made from :func:`connect_arguments`, like every other connection:
    the URL handed to SQLAlchemy names only the driver, so that none of the URL's parameters
    reaches asyncpg as a keyword argument it does not take.
    """
    dsn, arguments = connect_arguments(url)
    return create_async_engine(
        URL.create("postgresql+asyncpg"),
        pool_size=pool_size,
        max_overflow=kwargs.pop("max_overflow", 0),
        connect_args={
            "dsn": dsn,
            "connection_class": schema_connection_class(schema_of(url)),
            **arguments,
        },
        **kwargs,
    )


async def connect(
    dsn: str,
    *,
    application_name: str = APPLICATION_NAME,
    connect_timeout: float = 60.0,
    statement_cache_size: int = 100,
) -> DriverConnection:
    """Open one driver connection to ``dsn`` (a URL, or :func:`asyncpg_dsn`'s DSN of one)
    within ``connect_timeout`` seconds (raises the driver's errors; wrap the call in
    :func:`translate_errors`). The DSN's own ``connect_timeout`` and ``application_name``
    win over the arguments (see :func:`connect_arguments`). ``statement_cache_size`` is
    asyncpg's prepared statement cache; 0 makes every statement an unnamed one, which a pooler
    in transaction mode can route."""
    target, arguments = connect_arguments(
        dsn, application_name=application_name, timeout=connect_timeout
    )
    connection: DriverConnection = await asyncpg.connect(
        target,
        statement_cache_size=statement_cache_size,
        connection_class=schema_connection_class(schema_of(dsn)),
        **arguments,
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


async def close_quietly(connection: DriverConnection, *, grace: float = 5.0) -> None:
    """Close a driver connection politely, or terminate it if the server does not answer
    within ``grace`` seconds; never raises but the caller's own cancellation (after which the
    connection is terminated too)."""
    try:
        await connection.close(timeout=grace)
    except Exception:
        connection.terminate()
    except asyncio.CancelledError:
        connection.terminate()
        raise


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
#: exception): 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now, 57P05 idle
#: session timeout (PostgreSQL 14+).
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03", "57P05"})

#: SQLSTATE classes whose errors a later retry may not meet: 40 transaction rollback
#: (serialization failure, deadlock), 53 insufficient resources (too many connections, disk full,
#: out of memory), 58 system error (I/O on the server).
_TRANSIENT_CLASSES = frozenset({"40", "53", "58"})
#: Single transient SQLSTATEs: 55P03 lock not available (lock_timeout), 57014 query canceled
#: (statement_timeout, a cancel request), 25006 read-only transaction (a standby after a
#: failover), 26000 invalid statement name (a pooler moved the session), 0A000 a cached plan
#: that must not change its result type (the schema changed under a prepared statement).
_TRANSIENT_STATES = frozenset({"55P03", "57014", "25006", "26000", "42P05", "0A000"})

#: SQLSTATEs after which the session itself is wrong, not the statement: the connection is
#: retired so the next call gets a fresh one (to the new primary, a new pooled server, a fresh
#: statement cache).
RETIRE_STATES = frozenset({"25006", "26000", "42P05", "0A000"})

#: SQLSTATEs that say prepared statements do not outlive a transaction (a pooler in
#: transaction mode): 26000 invalid statement name, 42P05 duplicate prepared statement.
POOLER_STATES = frozenset({"26000", "42P05"})

#: Exceptions that mean the server could not be reached or the connection broke.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    socket.gaierror,
    TimeoutError,
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
    if isinstance(exc, asyncpg.DataError):  # a value the driver could not encode
        return False
    return isinstance(exc, UNREACHABLE)


def is_transient(code: str) -> bool:
    """Whether an error with SQLSTATE ``code`` may not recur when the call is retried later."""
    return (
        code[:2] in _TRANSIENT_CLASSES
        or code in _TRANSIENT_STATES
        or code.startswith("08")
        or code in _UNAVAILABLE_STATES
    )


def connection_survives(exc: BaseException) -> bool:
    """Whether a connection is still usable after ``exc`` escaped a block that used it.

    A server answer with a SQLSTATE leaves the session fine unless it says the server is going
    away or the session itself is wrong (a standby, a lost prepared statement); a driver failure
    without an answer leaves the protocol state unknown; a :class:`RegistryError` or any other
    exception is the caller's own, raised between statements.
    """
    code = sqlstate(exc)
    if code is not None:
        return not is_unavailable(exc) and code not in RETIRE_STATES
    if isinstance(exc, RegistryError):
        return True
    return not isinstance(exc, (*UNREACHABLE, DBAPIError, asyncpg.PostgresError))


# what the server refuses at connect, before any statement: said as such
_LOGIN_REFUSALS = {
    "3D000": "does not exist (no database of that name on the server)",
    "28": "refused the login (role, password or pg_hba.conf)",
}


def database_error(exc: BaseException) -> DatabaseError | None:
    """The :class:`DatabaseError` a driver or SQLAlchemy error stands for, chosen by SQLSTATE
    (``None`` when ``exc`` is neither, such as a programming error of ours)."""
    if isinstance(exc, DatabaseError):
        return exc
    code = sqlstate(exc)
    if is_unavailable(exc):
        return DatabaseUnavailableError(
            f"cannot reach the database: {_describe(exc)}", sqlstate=code
        )
    if code is not None:
        refused = _LOGIN_REFUSALS.get(code[:2], _LOGIN_REFUSALS.get(code, "refused the statement"))
        return DatabaseError(
            f"the database {refused}: {_describe(exc)} (SQLSTATE {code})",
            sqlstate=code,
            is_transient=is_transient(code),
        )
    if isinstance(exc, (asyncpg.PostgresError, asyncpg.DataError, DBAPIError)):
        return DatabaseError(f"database error: {_describe(exc)}")
    return None


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Raise the :class:`DatabaseError` a driver or SQLAlchemy error stands for (see
    :func:`database_error`); let :class:`RegistryError`, cancellation and other exceptions
    through unchanged."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as exc:
        error = database_error(exc)
        if error is None:
            raise
        raise error from exc


def _describe(exc: BaseException) -> str:
    error = driver_error(exc) or exc
    text = " ".join(str(error).split())
    return text or type(error).__name__
