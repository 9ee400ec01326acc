"""Engines, URLs, migrations and driver-error mapping.

The application connects with SQLAlchemy's asyncio engine over asyncpg; the listener uses a raw
asyncpg connection built from the same URL. Alembic owns the schema: :func:`migrate` runs it.
"""

from __future__ import annotations

import logging
import socket
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from registry import repository
from registry.errors import DatabaseUnavailableError, InvalidInputError, SchemaNotReadyError

logger = logging.getLogger(__name__)

#: ``application_name`` of the pooled query connections.
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
    """Return ``url`` as a DSN that ``asyncpg.connect`` accepts (for the listener connection)."""
    return async_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(url: str | URL, *, pool_size: int = 10, **kwargs: Any) -> AsyncEngine:
    """Create the pooled asyncpg engine that serves queries (never the LISTEN connection).

    Instead of a ping per checkout (a round trip), a pooled connection that the driver already
    knows is closed (the server restarted or ended it) is replaced at checkout, for free.
    """
    engine = create_async_engine(
        async_url(url),
        pool_size=pool_size,
        # no overflow: overflow connections are closed on return, so a burst of waiters
        # (50 inboxes draining at once) would reconnect over and over; callers queue instead
        max_overflow=kwargs.pop("max_overflow", 0),
        pool_pre_ping=False,
        connect_args={"server_settings": {"application_name": APPLICATION_NAME}},
        **kwargs,
    )
    event.listen(engine.sync_engine, "checkout", _replace_closed_connection)
    return engine


def _replace_closed_connection(dbapi_connection: Any, _record: object, _proxy: object) -> None:
    driver = getattr(dbapi_connection, "driver_connection", None)
    if driver is not None and driver.is_closed():
        # the documented way to make the pool discard this one and hand out another
        raise DisconnectionError("pooled connection was closed by the server")


def migrations_directory() -> Path:
    """Where the Alembic scripts live: inside the installed wheel, or the source checkout."""
    packaged = Path(str(resources.files("registry"))) / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def alembic_config() -> Config:
    """An Alembic config pointing at registry's migrations, independent of the working dir."""
    config = Config()
    config.set_main_option("script_location", str(migrations_directory()))
    return config


def head_revision() -> str:
    """The newest schema revision this version of registry knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise SchemaNotReadyError("registry ships no migrations")
    return head


def _upgrade(connection: Connection, config: Config, revision: str) -> None:
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def _downgrade(connection: Connection, config: Config, revision: str) -> None:
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def migrate(url: str | URL, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the newest).

    Safe to call from several processes at once: a transaction-level advisory lock serialises
    them, and a database already at ``revision`` is left alone.
    """
    await _run_alembic(url, _upgrade, revision)


async def downgrade(url: str | URL, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` (``"base"`` drops everything)."""
    await _run_alembic(url, _downgrade, revision)


async def _run_alembic(url: str | URL, step: Any, revision: str) -> None:
    engine = create_engine(url, pool_size=1)
    config = alembic_config()
    try:
        async with engine.connect() as connection:
            await repository.lock_migrations(connection)
            await connection.run_sync(step, config, revision)
            await connection.commit()
    except Exception as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailableError(
                f"cannot reach the database to migrate it: {exc}"
            ) from exc
        raise
    finally:
        await engine.dispose()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The schema revision the database is at, or ``None`` before the first migration."""
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


def driver_error(exc: BaseException) -> asyncpg.PostgresError | None:
    """The asyncpg error behind a SQLAlchemy exception, if there is one."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, asyncpg.PostgresError):
            return current
        current = current.__cause__ or getattr(current, "orig", None)
    return None


def constraint_name(exc: DBAPIError) -> str | None:
    """The name of the constraint a driver error reports, mapped by name, never by message."""
    error = driver_error(exc)
    name = getattr(error, "constraint_name", None)
    return name if isinstance(name, str) else None


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE code of a driver error, if there is one."""
    error = driver_error(exc)
    code = getattr(error, "sqlstate", None)
    return code if isinstance(code, str) else None


#: SQLSTATEs that mean "the server is not there right now": connection exceptions (class 08)
#: and operator intervention (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot
#: connect now, e.g. while it starts or stops).
_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03")


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is unreachable rather than the statement wrong."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    code = sqlstate(exc)
    if code is not None:
        return code.startswith("08") or code in _UNAVAILABLE_STATES
    return isinstance(exc, UNREACHABLE)


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
