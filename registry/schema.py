"""The schema's life: Alembic migrations, the revision a database is at, and the one check
that it is at this version's head.

Alembic owns the schema (``migrations/``; ``tables.py`` is what it is checked against). It runs
on a SQLAlchemy engine; everything else in the registry runs on driver connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Connection

from registry import repository
from registry.database import (
    admin_connection,
    create_engine,
    driver_connection,
    translate_errors,
)
from registry.errors import SchemaNotReadyError


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
    them, and a database already at ``revision`` is left alone. Raises
    :class:`~registry.errors.DatabaseUnavailableError` if the server cannot be reached.
    """
    await _run_alembic(url, _upgrade, revision)


async def downgrade(url: str | URL, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` (``"base"`` drops everything)."""
    await _run_alembic(url, _downgrade, revision)


async def _run_alembic(url: str | URL, step: Any, revision: str) -> None:
    engine = create_engine(url)
    config = alembic_config()
    try:
        with translate_errors():
            async with engine.connect() as connection:
                await repository.lock_migrations(await driver_connection(connection))
                await connection.run_sync(step, config, revision)
                await connection.commit()
    finally:
        await engine.dispose()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(url: str | URL) -> str | None:
    """The schema revision the database is at, or ``None`` before the first migration."""
    engine = create_engine(url)
    try:
        with translate_errors():
            async with engine.connect() as connection:
                return await connection.run_sync(_current)
    finally:
        await engine.dispose()


async def check_schema(url: str | URL) -> None:
    """Raise :class:`~registry.errors.SchemaNotReadyError` unless the database is at head
    (and :class:`~registry.errors.DatabaseUnavailableError` if it cannot be reached)."""
    check_revision(await current_revision(url))


def check_revision(revision: str | None) -> None:
    """Raise :class:`~registry.errors.SchemaNotReadyError` unless ``revision`` is head."""
    head = head_revision()
    if revision != head:
        raise SchemaNotReadyError(
            f"database schema is at {revision or 'no revision'}, this registry needs {head}; "
            "run `registry migrate` or `await registry.migrate(url)`"
        )


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a database stands: its revision against this version's head, and its server."""

    revision: str | None
    head: str
    #: the server's ``server_version_num`` (for example 150019)
    server_version_num: int

    @property
    def ready(self) -> bool:
        """Whether the schema is at head, so that a registry can connect."""
        return self.revision == self.head


async def schema_status(url: str | URL) -> SchemaStatus:
    """The revision, head and server version of the database at ``url``.

    Raises :class:`~registry.errors.DatabaseUnavailableError` if it cannot be reached.
    """
    revision = await current_revision(url)
    async with admin_connection(url) as connection:
        version = await repository.server_version(connection)
    return SchemaStatus(revision, head_revision(), version)
