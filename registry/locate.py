"""Which database to use: a URL given, ``REGISTRY_DATABASE_URL``, or the embedded server.

The command line and library callers who opt in (``await resolve_database_url()``) choose the
same way:

1. the URL passed in (the command line's ``--database-url``);
2. the ``REGISTRY_DATABASE_URL`` environment variable, when set and not empty;
3. otherwise the embedded PostgreSQL (the ``embedded`` extra) whose data lives under the
   user's data directory (``platformdirs.user_data_dir("registry")``, or ``REGISTRY_DATA_DIR``):
   started if it is not running, given a ``registry`` database, migrated to the newest
   schema, and left running for the next process. Its data stays between runs; ``registry db
   stop`` stops it.

A URL given or found in the environment is validated but neither contacted nor migrated here
(run ``registry migrate`` for that). The embedded server is for development and demos.
"""

from __future__ import annotations

import asyncio
import enum
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from registry import repository
from registry.database import admin_connection, async_url, sqlstate
from registry.embedded import embedded_status, start_embedded
from registry.errors import InvalidInputError
from registry.schema import migrate

#: The environment variable that names the database when no URL is given.
DATABASE_URL_VARIABLE = "REGISTRY_DATABASE_URL"
#: The environment variable that overrides where the embedded server keeps its data.
DATA_DIR_VARIABLE = "REGISTRY_DATA_DIR"
#: The database the registry uses inside the embedded server.
EMBEDDED_DATABASE = "registry"

# CREATE DATABASE racing another process: one of these comes back instead of success
_DUPLICATE_DATABASE = {"42P04", "23505"}


class DatabaseSource(enum.StrEnum):
    """Where :func:`locate_database` found the URL."""

    ARGUMENT = "argument"
    ENVIRONMENT = "environment"
    EMBEDDED = "embedded"


@dataclass(frozen=True, slots=True)
class DatabaseLocation:
    """The database chosen, and how."""

    url: str
    source: DatabaseSource
    #: the embedded server's data directory (``None`` for a URL given or from the environment)
    data_dir: Path | None = None
    #: whether this call had to start the embedded server
    started: bool = False

    @property
    def display_url(self) -> str:
        """The URL without its password, for messages."""
        return display_url(self.url)


def data_home() -> Path:
    """Where registry keeps local state: ``$REGISTRY_DATA_DIR`` or the user's data directory."""
    configured = os.environ.get(DATA_DIR_VARIABLE, "").strip()
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(platformdirs.user_data_dir("registry", appauthor=False))


def embedded_data_dir() -> Path:
    """The embedded server's data directory (``postgres`` under :func:`data_home`)."""
    return data_home() / "postgres"


def display_url(url: str) -> str:
    """``url`` with its password hidden; as given if it has none (or does not parse)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return url
    return parsed.render_as_string(hide_password=True) if parsed.password else url


async def locate_database(url: str | None = None) -> DatabaseLocation:
    """Choose the database as the module docstring says; start the embedded one if needed.

    Raises :class:`InvalidInputError` for an empty or unsupported URL, and
    :class:`~registry.errors.DatabaseUnavailableError` if the embedded server is needed but is
    not installed or does not start.
    """
    if url is not None:
        return DatabaseLocation(_checked(url, "url"), DatabaseSource.ARGUMENT)
    configured = os.environ.get(DATABASE_URL_VARIABLE, "").strip()
    if configured:
        return DatabaseLocation(
            _checked(configured, DATABASE_URL_VARIABLE), DatabaseSource.ENVIRONMENT
        )
    return await ensure_embedded()


async def resolve_database_url(url: str | None = None) -> str:
    """The URL to connect to: ``url``, else ``$REGISTRY_DATABASE_URL``, else the embedded server.

    For library callers who want the command line's choice, for example
    ``await RunRegistry.connect(await resolve_database_url())``. The embedded server is
    started, migrated and left running when it is the one chosen (see :mod:`registry.locate`).
    """
    return (await locate_database(url)).url


async def ensure_embedded(data_dir: Path | None = None) -> DatabaseLocation:
    """Start the embedded server if needed, create its ``registry`` database, migrate it.

    Safe to call from several processes at once; the server stays running afterwards.
    """
    directory = data_dir or embedded_data_dir()
    was_running = (await asyncio.to_thread(embedded_status, directory)).running
    server = await asyncio.to_thread(start_embedded, directory, keep_running=True)
    url = server.database_url(EMBEDDED_DATABASE)
    await _create_database(server.url, EMBEDDED_DATABASE)
    await migrate(url)
    return DatabaseLocation(
        url, DatabaseSource.EMBEDDED, data_dir=server.data_dir, started=not was_running
    )


async def _create_database(admin_url: str, name: str) -> None:
    async with admin_connection(admin_url) as connection:
        if await repository.database_exists(connection, name):
            return
        try:
            await repository.create_database(connection, name)
        except Exception as exc:
            # another process created it between the check and here
            if sqlstate(exc) not in _DUPLICATE_DATABASE:
                raise


def _checked(url: str, field: str) -> str:
    url = url.strip()
    if not url:
        raise InvalidInputError(field, "is empty; give a postgresql:// URL")
    try:
        async_url(url)
    except InvalidInputError as exc:
        raise InvalidInputError(field, exc.reason) from exc
    return url
