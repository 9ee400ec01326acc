"""Alembic environment for registry: online migrations over asyncpg.

Called two ways: by the ``alembic`` command (a URL from ``-x url=...``, ``REGISTRY_DATABASE_URL``
or ``alembic.ini``), and by ``registry.migrate()``, which hands over an open connection in
``config.attributes["connection"]`` and the schema in ``config.attributes["schema"]``.

Every object lives in one schema (default ``registry``; the URL's ``schema`` parameter,
``-x schema=...`` or ``REGISTRY_SCHEMA`` name another), the version table included, so that
an application's own tables and Alembic history in ``public`` are never ours. The scripts name
no schema: the whole upgrade runs in one transaction whose ``search_path`` is that schema alone
(``set_config(..., true)``: it ends with the transaction, so a pooler in transaction mode keeps
no trace of it). An install of an earlier version, with our tables and our revision in
``public``, is moved into the schema first, in the same transaction.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from registry.database import create_engine
from registry.models import DEFAULT_SCHEMA, checked_schema
from registry.repository import MIGRATION_LOCK_KEY
from registry.tables import metadata
from registry.urls import schema_of

config = context.config
target_metadata = metadata


#: what an install of an earlier version left in ``public`` (tables, then the view and the
#: trigger function; indexes, constraints, triggers and identity sequences move with a table)
_MOVED_TABLES = ("runs", "decisions", "stream_chunks", "notification_secrets", "alembic_version")
_MOVED = (
    *((f"public.{table}", "TABLE", f"public.{table}") for table in _MOVED_TABLES),
    ("public.decision_audit", "VIEW", "public.decision_audit"),
)
_MOVED_FUNCTION = "public.decisions_guard()"


def _schema() -> str:
    given = config.attributes.get("schema") or context.get_x_argument(as_dictionary=True).get(
        "schema"
    )
    if given:
        return checked_schema(given)
    if context.is_offline_mode():
        return checked_schema(os.environ.get("REGISTRY_SCHEMA") or DEFAULT_SCHEMA)
    return schema_of(_url())


def _own_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}


def _adopt_public_install(connection: Connection, quoted: str, schema: str) -> None:
    """Move an earlier install (our revision in ``public.alembic_version``) into ``schema``.

    Only when the schema has no version table of its own and the revision in ``public`` is
    one of ours: an application's own Alembic history there is never touched.
    """
    if schema == "public" or connection.scalar(
        text("SELECT to_regclass(:name) IS NOT NULL"), {"name": f"{quoted}.alembic_version"}
    ):
        return
    if not connection.scalar(text("SELECT to_regclass('public.alembic_version') IS NOT NULL")):
        return
    revisions = connection.scalars(text("SELECT version_num FROM public.alembic_version")).all()
    if not revisions or not set(revisions) <= _own_revisions():
        return
    for name, kind, qualified in _MOVED:
        if connection.scalar(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": name}):
            connection.execute(text(f"ALTER {kind} {qualified} SET SCHEMA {quoted}"))
    if connection.scalar(
        text("SELECT to_regprocedure(:name) IS NOT NULL"), {"name": _MOVED_FUNCTION}
    ):
        connection.execute(text(f"ALTER FUNCTION {_MOVED_FUNCTION} SET SCHEMA {quoted}"))


def _run(connection: Connection) -> None:
    schema = _schema()
    quoted = f'"{schema}"'  # a checked plain identifier
    # these statements begin the one transaction the whole upgrade runs in (Alembic sees an
    # external transaction), so the lock, the move and search_path all hold until its end
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted}"))
    _adopt_public_install(connection, quoted, schema)
    connection.execute(text("SELECT set_config('search_path', :path, true)"), {"path": quoted})
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        version_table_schema=schema,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_url(url: str) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("REGISTRY_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise SystemExit(
            "no database URL: pass -x url=postgresql://..., or set REGISTRY_DATABASE_URL"
        )
    return url


if context.is_offline_mode():
    offline_schema = _schema()
    context.configure(
        url="postgresql://",
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table_schema=offline_schema,
    )
    with context.begin_transaction():
        # one transaction, as online; a script does not move an earlier install from public
        context.execute(f'CREATE SCHEMA IF NOT EXISTS "{offline_schema}"')
        context.execute(f"SELECT set_config('search_path', '\"{offline_schema}\"', true)")
        context.run_migrations()
else:
    existing = config.attributes.get("connection")
    if existing is not None:
        _run(existing)
    else:
        asyncio.run(_run_with_url(_url()))
