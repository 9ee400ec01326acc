"""The URL parameters users set (libpq's) reach every connection: the query connections, the
LISTEN connection, and the SQLAlchemy engine that migrations run on.

First the conversion itself (pure: no server), then real connections with each parameter.
Registries wait with a safety re-check interval far longer than the deadlines here, so a
token that trips in time was woken through the LISTEN connection.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.engine import URL, make_url

import registry
from registry import (
    DatabaseUnavailableError,
    InvalidInputError,
    RegistrySettings,
    RunRegistry,
    repository,
    testing,
)
from registry.connections import ConnectionLane
from registry.database import admin_connection
from registry.listener import LISTENER_APPLICATION_NAME
from registry.schema import current_revision, head_revision, schema_status
from registry.urls import APPLICATION_NAME, async_url, asyncpg_dsn, connect_arguments
from tests.helpers.database import fetch

#: longer than any test: the safety net must not be what wakes a waiter
FAR = RegistrySettings(safety_interval=60)
#: how long a wake-up may take here; it should take milliseconds
WAKE = 5.0


def arguments(dsn: str, timeout: float = 60.0, **settings: str) -> tuple[str, dict[str, Any]]:
    settings.setdefault("application_name", APPLICATION_NAME)
    return dsn, {"timeout": timeout, "server_settings": settings}


# --- the conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "postgresql://app:s3cret@db.example:6432/runs",
            arguments("postgresql://app:s3cret@/runs?host=db.example&port=6432"),
            id="plain",
        ),
        pytest.param(
            "postgresql://app@db.example/runs?sslmode=verify-full&sslrootcert=/etc/ca.pem"
            "&sslcert=/etc/client.crt&sslkey=/etc/client.key&sslpassword=pw&sslcrl=/etc/crl.pem",
            arguments(
                "postgresql://app@/runs?host=db.example&sslmode=verify-full"
                "&sslrootcert=/etc/ca.pem&sslcert=/etc/client.crt&sslkey=/etc/client.key"
                "&sslpassword=pw&sslcrl=/etc/crl.pem"
            ),
            id="tls-files",
        ),
        pytest.param(
            "postgresql+asyncpg://app@db.example/runs?ssl=require",
            arguments("postgresql://app@/runs?host=db.example&sslmode=require"),
            id="ssl-is-sslmode",
        ),
        pytest.param(
            "postgres://app@db.example/runs?connect_timeout=7&target_session_attrs=read-write",
            arguments(
                "postgresql://app@/runs?host=db.example&target_session_attrs=read-write",
                timeout=7.0,
            ),
            id="timeout-and-target",
        ),
        pytest.param(
            "postgresql://app@db.example/runs?connect_timeout=0",
            arguments("postgresql://app@/runs?host=db.example"),
            id="timeout-zero-is-the-default",
        ),
        pytest.param(
            "postgresql://app@db.example/runs?application_name=my%20agent",
            arguments("postgresql://app@/runs?host=db.example", application_name="my agent"),
            id="application-name-wins",
        ),
        pytest.param(
            "postgresql://app@db.example/runs?fallback_application_name=fallback",
            arguments("postgresql://app@/runs?host=db.example", application_name="fallback"),
            id="fallback-application-name",
        ),
        pytest.param(
            "postgresql://app@db.example/runs?options=-c%20statement_timeout%3D1234"
            "%20-clock_timeout%3D5s%20--search-path%3Da%5C%20b%2Cpublic",
            arguments(
                "postgresql://app@/runs?host=db.example",
                statement_timeout="1234",
                lock_timeout="5s",
                search_path="a b,public",
            ),
            id="options",
        ),
        pytest.param(
            "postgresql://app@db.example/runs?options=-c%20application_name%3Dopt"
            "&application_name=param",
            arguments("postgresql://app@/runs?host=db.example", application_name="param"),
            id="application-name-over-options",
        ),
        pytest.param(
            "postgresql://app@primary:5432,standby:5433/runs",
            arguments("postgresql://app@/runs?host=primary,standby&port=5432,5433"),
            id="host-list",
        ),
        pytest.param(
            "postgresql://app@/runs?host=primary,standby&port=5432,5433",
            arguments("postgresql://app@/runs?host=primary,standby&port=5432,5433"),
            id="host-list-in-the-query",
        ),
        pytest.param(
            "postgresql://app@/runs?host=primary:5432&host=standby:5433",
            arguments("postgresql://app@/runs?host=primary,standby&port=5432,5433"),
            id="sqlalchemy-host-list",
        ),
        pytest.param(
            "postgresql://app@db.example/runs?port=6543",
            arguments("postgresql://app@/runs?host=db.example&port=6543"),
            id="port-parameter",  # asyncpg alone ignores it next to a host in the authority
        ),
        pytest.param(
            "postgresql://app@[::1]:6543/runs",
            arguments("postgresql://app@/runs?host=%5B::1%5D&port=6543"),
            id="ipv6",
        ),
        pytest.param(
            "postgresql://postgres:@/postgres?host=/tmp/pg%20dir",
            arguments("postgresql://postgres@/postgres?host=/tmp/pg%20dir"),
            id="unix-socket",
        ),
        pytest.param(
            "postgresql://a%40b:p%2Fw%2Bx@db.example/r%C3%BCns?application_name=a+b",
            arguments(
                "postgresql://a%40b:p%2Fw%2Bx@/r%C3%BCns?host=db.example",
                application_name="a+b",  # as libpq reads it: '+' is a plus sign
            ),
            id="escapes",
        ),
        pytest.param(
            "postgresql://app:p/w@db.example/runs?application_name=me@example.org",
            arguments(
                "postgresql://app:p%2Fw@/runs?host=db.example", application_name="me@example.org"
            ),
            id="slash-in-password-at-in-query",
        ),
        pytest.param(
            "postgresql://app@db.example/runs?sslcompression=1&client_encoding=UTF8"
            "&gssencmode=disable&dbname=other&user=someone",
            arguments("postgresql://someone@/other?host=db.example"),
            id="no-effect-and-folded",
        ),
    ],
)
def test_a_url_becomes_asyncpgs_arguments(url: str, expected: tuple[str, Any]) -> None:
    assert connect_arguments(url) == expected
    # the registry's DSN keeps every parameter, and reads back the same
    assert connect_arguments(asyncpg_dsn(url)) == expected
    assert asyncpg_dsn(asyncpg_dsn(url)) == asyncpg_dsn(url)


def test_the_callers_defaults_yield_to_the_url() -> None:
    plain = "postgresql://app@db.example/runs"
    assert connect_arguments(plain, application_name="mine", timeout=3) == (
        "postgresql://app@/runs?host=db.example",
        {"timeout": 3, "server_settings": {"application_name": "mine"}},
    )
    named = f"{plain}?application_name=theirs&connect_timeout=9"
    assert connect_arguments(named, application_name="mine", timeout=3)[1] == {
        "timeout": 9.0,
        "server_settings": {"application_name": "theirs"},
    }


def test_a_sqlalchemy_url_object_is_read_too() -> None:
    url = make_url("postgresql+asyncpg://app@db.example:6432/runs?ssl=require")
    assert connect_arguments(url) == arguments(
        "postgresql://app@/runs?host=db.example&port=6432&sslmode=require"
    )


def test_async_url_reads_a_host_list() -> None:
    parsed = async_url("postgresql://app@primary:5432,standby:5433/runs?sslmode=require")
    assert parsed.drivername == "postgresql+asyncpg"
    assert parsed.query["host"] == ("primary:5432", "standby:5433")
    assert (parsed.database, parsed.query["sslmode"]) == ("runs", "require")


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("sslmode=bogus", "sslmode: 'bogus' is not one of"),
        ("ssl=yes-please", "ssl: 'yes-please' is not one of"),
        ("ssl=require&sslmode=disable", "contradicts"),
        ("target_session_attrs=whatever", "target_session_attrs: 'whatever'"),
        ("connect_timeout=abc", "connect_timeout: 'abc' is not a whole number"),
        ("connect_timeout=1.5", "connect_timeout: '1.5'"),
        ("port=abc", "port: 'abc' is not a port number"),
        ("port=99999", "port: '99999' is not a port number"),
        ("port=1,2,3", "port: 3 ports for 1 hosts"),
        ("host=a,,b", "a host in the list is empty"),
        ("statement_timeout=5", "unknown parameter 'statement_timeout'"),
        ("prepared_statement_cache_size=0", "unknown parameter 'prepared_statement_cache_size'"),
        ("keepalives=1", "libpq parameter 'keepalives' is not supported"),
        ("gssencmode=require", "gssencmode='require' is not supported"),
        ("options=-B%208MB", "options: '-B' is not -c name=value"),
        ("options=-c%20statement_timeout", "options: 'statement_timeout' is not name=value"),
        ("options=-c", "options: -c needs name=value"),
        ("options=-c%20x%3D1%5C", "options: ends with a lone backslash"),
        ("sslmode", "parameter 'sslmode' has no value"),
        ("application_name=x%00y", "contains a NUL character"),
    ],
)
def test_a_bad_parameter_is_named(query: str, named: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(named)) as caught:
        asyncpg_dsn(f"postgresql://app@db.example/runs?{query}")
    assert caught.value.field == "url"
    with pytest.raises(InvalidInputError, match=re.escape(named)):
        connect_arguments(f"postgresql://app@db.example/runs?{query}")


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("postgresql://app@db.example:abc/runs", "port: 'abc' is not a port number"),
        ("postgresql://app@db.example:99999/runs", "port: '99999' is not a port number"),
        ("postgresql://app@a:1,:2/runs", "a host in the list is empty"),
        ("postgresql://app@[::1/runs", "is not [address]:port"),
        ("mysql://app@db.example/runs", "unsupported scheme 'mysql'"),
        ("db.example:5432", "not a database URL"),
        ("postgresql://app%00x@db.example/runs", "contains a NUL character"),
        ("postgresql://app@db.example/ru%00ns", "contains a NUL character"),
    ],
)
def test_a_bad_url_is_named(url: str, named: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(named)):
        asyncpg_dsn(url)


# --- real connections -------------------------------------------------------------------------


def with_query(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


def options(*switches: str) -> str:
    """An ``options=`` parameter (percent-encoded)."""
    return "options=" + urllib.parse.quote(" ".join(switches), safe="")


def refusing_first(url: str, *, in_authority: bool) -> str:
    """``url`` with 127.0.0.1:1 (nothing listens there) as the first of two hosts."""
    parsed = make_url(url)
    host = parsed.host or str(parsed.query["host"])  # else a Unix socket's directory
    port = parsed.port or int(str(parsed.query.get("port", "5432")))
    rest = URL.create(
        parsed.drivername,
        username=parsed.username,
        password=parsed.password,
        database=parsed.database,
        query={key: value for key, value in parsed.query.items() if key not in ("host", "port")},
    )
    base = rest.render_as_string(hide_password=False)
    if in_authority:
        assert "@/" in base
        return base.replace("@/", f"@127.0.0.1:1,{host}:{port}/", 1)
    return with_query(base, f"host=127.0.0.1,{urllib.parse.quote(host, safe='/')}&port=1,{port}")


async def application_names(url: str) -> dict[int, str]:
    """The ``application_name`` of every other session on ``url``'s database, by pid."""
    rows = await fetch(
        url,
        "SELECT pid, application_name FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    return {row["pid"]: row["application_name"] for row in rows}


async def cancel_trips_a_token(url: str) -> None:
    """A cancel from another registry trips a token through the LISTEN connection."""
    async with (
        await RunRegistry.connect(url, worker_id="holder", settings=FAR) as holder,
        await RunRegistry.connect(url, worker_id="canceller", settings=FAR, listen=False) as other,
    ):
        token = (await holder.register("run-1", "agent-a", "thread-1")).cancellation_token()
        assert await other.cancel_active_run_by_id("run-1")
        async with asyncio.timeout(WAKE):
            await token.wait()


@pytest.fixture
async def empty_database(registry_server: testing.TestServer) -> AsyncIterator[str]:
    """The URL of a fresh database without any schema, dropped afterwards."""
    name = f"registry_urls_{uuid.uuid4().hex[:12]}"
    async with admin_connection(registry_server.admin_url) as connection:
        await repository.create_database(connection, name)
    yield registry_server.database_url(name)
    async with admin_connection(registry_server.admin_url) as connection:
        await repository.drop_database(connection, name)


async def test_the_urls_application_name_names_every_connection(
    registry_database_url: str,
) -> None:
    url = with_query(registry_database_url, "application_name=my-agent&connect_timeout=5")
    async with await RunRegistry.connect(url, settings=FAR) as runs:
        await runs.register("run-1", "agent-a", "thread-1")
        listener = runs.listener
        assert listener is not None
        assert listener.backend_pid is not None
        names = await application_names(registry_database_url)
        assert names[listener.backend_pid] == "my-agent"
        assert set(names.values()) == {"my-agent"}  # the query connections too
    assert (await schema_status(url)).ready


async def test_options_set_run_time_parameters_of_every_connection(
    registry_database_url: str,
) -> None:
    url = with_query(
        registry_database_url,
        options("-c statement_timeout=1234", "--application-name=via\\ options"),
    )
    lane = ConnectionLane(asyncpg_dsn(url), 1)
    try:
        async with lane.autocommit() as connection:
            assert await connection.fetchval("SHOW statement_timeout") == "1234ms"
    finally:
        await lane.close()
    async with admin_connection(url) as connection:
        assert await connection.fetchval("SHOW statement_timeout") == "1234ms"
    async with await RunRegistry.connect(url, settings=FAR) as runs:
        listener = runs.listener
        assert listener is not None
        assert listener.backend_pid is not None
        names = await application_names(registry_database_url)
        assert names[listener.backend_pid] == "via options"
        assert set(names.values()) == {"via options"}
    assert await current_revision(url) == head_revision()


async def test_target_session_attrs_finds_the_primary(registry_database_url: str) -> None:
    url = with_query(registry_database_url, "target_session_attrs=read-write")
    await registry.migrate(url)
    await cancel_trips_a_token(url)


@pytest.mark.parametrize("in_authority", [False, True], ids=["host-parameter", "authority"])
async def test_a_refusing_first_host_is_skipped(
    registry_database_url: str, in_authority: bool
) -> None:
    if in_authority and make_url(registry_database_url).host is None:
        pytest.skip("the server is reached through a Unix socket: no host:port to list")
    url = refusing_first(registry_database_url, in_authority=in_authority)
    await registry.migrate(url)
    await cancel_trips_a_token(url)


async def test_migrate_and_connect_take_every_parameter_at_once(empty_database: str) -> None:
    url = with_query(
        refusing_first(empty_database, in_authority=False),
        "&".join(
            [
                "application_name=all-at-once",
                "connect_timeout=10",
                "target_session_attrs=read-write",
                options("-c statement_timeout=30000"),
            ]
        ),
    )
    assert await current_revision(url) is None
    await registry.migrate(url)
    assert (await schema_status(url)).ready
    await cancel_trips_a_token(url)


async def test_an_unknown_parameter_is_refused_before_connecting(
    registry_database_url: str,
) -> None:
    # never a server setting that fails later (or a keyword asyncpg does not take)
    for query in ("statement_timeout=5", "pool_size=3"):
        url = with_query(registry_database_url, query)
        name = query.partition("=")[0]
        with pytest.raises(InvalidInputError, match=f"unknown parameter '{name}'"):
            await RunRegistry.connect(url)
        with pytest.raises(InvalidInputError, match=f"unknown parameter '{name}'"):
            await registry.migrate(url)


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port of 127.0.0.1 that accepts connections and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def test_connect_timeout_bounds_each_connection_attempt(silent_port: int) -> None:
    url = f"postgresql://postgres@127.0.0.1:{silent_port}/test?sslmode=disable&connect_timeout=1"
    patient = RegistrySettings(call_timeout=10)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError):
        await RunRegistry.connect(url, settings=patient)
    # two attempts (the first read is retried once) of a second each, not the call timeout
    assert time.monotonic() - started < 5
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError):
        await registry.migrate(url)
    assert time.monotonic() - started < 5


async def test_the_listener_keeps_its_own_name_by_default(registry_database_url: str) -> None:
    async with await RunRegistry.connect(registry_database_url, settings=FAR) as runs:
        await runs.register("run-1", "agent-a", "thread-1")
        listener = runs.listener
        assert listener is not None
        pid = listener.backend_pid
        assert pid is not None
        names = await application_names(registry_database_url)
    assert names.pop(pid) == LISTENER_APPLICATION_NAME
    assert set(names.values()) == {APPLICATION_NAME}
