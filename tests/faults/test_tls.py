"""A PostgreSQL that accepts only TLS: the registry reaches it with the URL's TLS parameters.

The server (``tests.helpers.tls_server``) trusts TLS connections from 127.0.0.1 and rejects
every other one, so a session that exists there is a TLS session; ``pg_stat_ssl`` is read all
the same, to see the query connections and the LISTEN connection among them. Migrations
(SQLAlchemy and Alembic), the query connections and the LISTEN connection all take the same
URL. The registries wait with a safety re-check interval far longer than the deadlines here,
so only LISTEN/NOTIFY can wake them in time.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from registry import (
    DatabaseError,
    DatabaseUnavailableError,
    RegistrySettings,
    RunRegistry,
    ToolCallDecision,
    repository,
)
from registry.database import admin_connection
from registry.listener import LISTENER_APPLICATION_NAME
from registry.schema import migrate, schema_status
from tests.helpers.tls_server import TlsServer, running_tls_server

#: longer than any test: the safety net must not be what wakes a waiter
FAR = RegistrySettings(safety_interval=60)
#: how long a wake-up may take here; it should take milliseconds
WAKE = 5.0


@pytest.fixture(scope="session")
def tls_server() -> Iterator[TlsServer]:
    """A PostgreSQL that accepts only TLS, started once (the tests skip if none starts)."""
    with running_tls_server() as server:
        yield server


@pytest.fixture
async def database(tls_server: TlsServer) -> AsyncIterator[str]:
    """A fresh, empty database on the TLS server (its name), dropped afterwards."""
    name = f"registry_tls_{uuid.uuid4().hex[:12]}"
    async with admin_connection(tls_server.url(query="sslmode=require")) as connection:
        await repository.create_database(connection, name)
    yield name
    async with admin_connection(tls_server.url(query="sslmode=require")) as connection:
        await repository.drop_database(connection, name)


def verify_full(server: TlsServer, database: str, ca: str, *, host: str = "127.0.0.1") -> str:
    return server.url(
        database, host=host, query=f"sslmode=verify-full&sslrootcert={urllib.parse.quote(ca)}"
    )


async def sessions(server: TlsServer, database: str) -> list[tuple[str, bool]]:
    """``(application_name, ssl)`` of every other session on ``database``, sorted."""
    async with admin_connection(server.url(query="sslmode=require")) as connection:
        rows = await connection.fetch(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a"
            " JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 ORDER BY 1, 2",
            database,
        )
    return [(row["application_name"], row["ssl"]) for row in rows]


async def end_to_end(server: TlsServer, database: str, url: str) -> None:
    """Migrate through ``url``, then register, forward, deliver through LISTEN, cancel."""
    await migrate(url)
    assert (await schema_status(url)).ready
    async with (
        await RunRegistry.connect(url, worker_id="holder", settings=FAR) as holder,
        await RunRegistry.connect(url, worker_id="steerer", settings=FAR, listen=False) as steerer,
    ):
        handle = await holder.register("run-1", "agent-a", "thread-1")
        token = handle.cancellation_token()
        inbox = handle.decisions()
        waiting = asyncio.ensure_future(anext(inbox))
        await asyncio.sleep(0.2)  # the inbox has read its (empty) table: only LISTEN wakes it
        decision = ToolCallDecision.resume("call-1", {"ok": True}, decision_id="d-1")
        assert await steerer.forward_decisions_by_thread("agent-a", "thread-1", [decision])
        delivery = await asyncio.wait_for(waiting, WAKE)
        assert delivery.decision == decision
        assert await inbox.ack(delivery)

        # the query connections and the LISTEN connection of both registries: all TLS
        found = await sessions(server, database)
        assert (LISTENER_APPLICATION_NAME, True) in found
        assert ("registry", True) in found
        assert all(encrypted for _, encrypted in found), found

        assert await steerer.cancel_active_run_by_id("run-1")
        async with asyncio.timeout(WAKE):
            await token.wait()
        assert token.is_cancelled()


async def test_a_plain_connection_is_refused_with_a_database_error(
    tls_server: TlsServer, database: str
) -> None:
    url = tls_server.url(database, query="sslmode=disable")
    # the server's own refusal, as the library's error, on every path
    with pytest.raises(DatabaseError, match="no encryption") as refused:
        await migrate(url)
    assert refused.value.sqlstate == "28000"
    with pytest.raises(DatabaseError, match="no encryption") as refused:
        await RunRegistry.connect(url, settings=FAR)
    assert refused.value.sqlstate == "28000"


async def test_sslmode_require_works_end_to_end(tls_server: TlsServer, database: str) -> None:
    await end_to_end(tls_server, database, tls_server.url(database, query="sslmode=require"))


async def test_ssl_require_is_taken_as_sslmode(tls_server: TlsServer, database: str) -> None:
    # SQLAlchemy's and asyncpg's spelling; the LISTEN connection once sent it to the server
    await end_to_end(tls_server, database, tls_server.url(database, query="ssl=require"))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_verify_full_accepts_the_servers_certificate(
    tls_server: TlsServer, database: str, host: str
) -> None:
    url = verify_full(tls_server, database, str(tls_server.ca_file), host=host)
    await end_to_end(tls_server, database, url)


async def test_verify_full_with_another_ca_fails_clearly(
    tls_server: TlsServer, database: str
) -> None:
    url = verify_full(tls_server, database, str(tls_server.other_ca_file))
    with pytest.raises(DatabaseUnavailableError, match="certificate verify failed") as caught:
        await migrate(url)
    assert not isinstance(caught.value, ssl.SSLError)
    with pytest.raises(DatabaseUnavailableError, match="certificate verify failed") as caught:
        await RunRegistry.connect(url, settings=FAR)
    assert not isinstance(caught.value, ssl.SSLError)
    # nothing was migrated: the database is still empty
    assert (await schema_status(tls_server.url(database, query="sslmode=require"))).revision is None
