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
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import URL, Connection

from registry import repository
from registry.database import (
    admin_connection,
    asyncpg_dsn,
    create_engine,
    translate_errors,
)
from registry.errors import SchemaNotReadyError
from registry.urls import schema_of


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


async def migrate(url: str | URL, revision: str = "head", *, schema: str | None = None) -> None:
    """Upgrade the registry's schema in the database at ``url`` to ``revision`` (default: the
    newest), in one transaction.

    Every object, the Alembic version table included, lives in ``schema`` (default: the URL's
    ``schema`` parameter, else ``REGISTRY_SCHEMA``, else ``registry``), created if missing; an
    application's own tables and Alembic history elsewhere are left alone. An install of an
    earlier version with its tables in ``public`` (our revision in ``public.alembic_version``)
    is moved into the schema, rows and all. Safe to call from several processes at once: a
    transaction-level advisory lock serialises them, and a database already at ``revision`` is
    left alone. Raises :class:`~registry.errors.InvalidInputError` for a bad URL or schema name
    (nothing created), :class:`~registry.errors.SchemaNotReadyError` when the schema's version
    table holds a revision this registry does not know, and
    :class:`~registry.errors.DatabaseUnavailableError` if the server cannot be reached.
    """
    await _run_alembic(url, _upgrade, revision, schema)


async def downgrade(url: str | URL, revision: str, *, schema: str | None = None) -> None:
    """Downgrade the registry's schema at ``url`` to ``revision`` (``"base"`` drops every
    table but the version table); ``schema`` as for :func:`migrate`."""
    await _run_alembic(url, _downgrade, revision, schema)


async def _run_alembic(url: str | URL, step: Any, revision: str, schema: str | None) -> None:
    dsn = asyncpg_dsn(url, schema=schema)
    engine = create_engine(dsn)
    config = alembic_config()
    config.attributes["schema"] = schema_of(dsn)
    try:
        with translate_errors():
            async with engine.connect() as connection:
                try:
                    await connection.run_sync(step, config, revision)
                except CommandError as exc:  # a revision that is not ours, in our version table
                    raise SchemaNotReadyError(
                        f"cannot migrate schema {config.attributes['schema']!r}: {exc}"
                    ) from None
                await connection.commit()
    finally:
        await engine.dispose()


async def current_revision(url: str | URL, *, schema: str | None = None) -> str | None:
    """The revision of the registry's schema (its own version table only; ``schema`` as for
    :func:`migrate`), or ``None`` before the first migration."""
    async with admin_connection(asyncpg_dsn(url, schema=schema)) as connection:
        return await repository.schema_revision(connection)


async def check_schema(url: str | URL, *, schema: str | None = None) -> None:
    """Raise :class:`~registry.errors.SchemaNotReadyError` unless the database is at head
    (and :class:`~registry.errors.DatabaseUnavailableError` if it cannot be reached)."""
    check_revision(await current_revision(url, schema=schema))


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


async def schema_status(url: str | URL, *, schema: str | None = None) -> SchemaStatus:
    """The revision (of the registry's own version table), head and server version of the
    database at ``url``.

    Raises :class:`~registry.errors.DatabaseUnavailableError` if it cannot be reached.
    """
    async with admin_connection(asyncpg_dsn(url, schema=schema)) as connection:
        revision = await repository.schema_revision(connection)
        version = await repository.server_version(connection)
    return SchemaStatus(revision, head_revision(), version)
