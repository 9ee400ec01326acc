"""Health checks of a registry database, for operators and container probes.

:func:`check_health` answers three questions, each as a :class:`HealthCheck`: does the server
answer, is the schema at this version's head, and does LISTEN/NOTIFY work (the connection
LISTENs on :data:`PROBE_CHANNEL`, NOTIFYs itself and must receive its own notification in
time). A failed check never raises: it is a result saying why.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

from registry import repository
from registry.database import (
    APPLICATION_NAME,
    DriverConnection,
    close_quietly,
    connect,
    translate_errors,
)
from registry.errors import RegistryError
from registry.schema import head_revision
from registry.urls import asyncpg_dsn

#: The channel of the listener round trip: not the registry's own, so no registry sees it.
PROBE_CHANNEL = "registry_health_v1"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One check's outcome."""

    #: ``server``, ``schema`` or ``listener``
    name: str
    ok: bool
    #: one line: what was seen, or why the check failed
    detail: str


async def check_health(url: str, *, seconds: float) -> list[HealthCheck]:
    """Check the database at ``url``: ``server``, ``schema`` and ``listener``, in that order.

    Each check has ``seconds`` seconds (connecting included in the first). When the server does
    not answer, the other two fail saying so. Never raises for what it finds, a missing
    privilege included; cancellation passes through.
    """
    started = time.monotonic()
    try:
        with translate_errors():
            async with asyncio.timeout(seconds):
                connection = await connect(
                    asyncpg_dsn(url),
                    application_name=f"{APPLICATION_NAME}-check",
                    connect_timeout=seconds,
                )
                version = await repository.server_version(connection)
    except (RegistryError, TimeoutError) as exc:
        reason = _reason(exc, seconds)
        return [
            HealthCheck("server", False, f"does not answer: {reason}"),
            HealthCheck("schema", False, "not checked: the server does not answer"),
            HealthCheck("listener", False, "not checked: the server does not answer"),
        ]
    try:
        elapsed = _milliseconds(started)
        server = HealthCheck(
            "server", True, f"PostgreSQL {version // 10000}.{version % 10000}, {elapsed}"
        )
        return [server, await _schema(connection, seconds), await _listener(connection, seconds)]
    finally:
        await close_quietly(connection)


async def _schema(connection: DriverConnection, seconds: float) -> HealthCheck:
    head = head_revision()
    try:
        with translate_errors():
            async with asyncio.timeout(seconds):
                revision = await repository.schema_revision(connection)
    except (RegistryError, TimeoutError) as exc:
        return HealthCheck("schema", False, f"cannot read the revision: {_reason(exc, seconds)}")
    if revision == head:
        return HealthCheck("schema", True, f"at head ({head})")
    return HealthCheck(
        "schema", False, f"at {revision or 'no revision'}, head is {head}: run `registry migrate`"
    )


async def _listener(connection: DriverConnection, seconds: float) -> HealthCheck:
    token = secrets.token_hex(8)
    received: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def deliver(_connection: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == token and not received.done():
            received.set_result(None)

    started = time.monotonic()
    try:
        with translate_errors():
            async with asyncio.timeout(seconds):
                await connection.add_listener(PROBE_CHANNEL, deliver)
                await repository.notify_probe(connection, PROBE_CHANNEL, token)
                await received
    except TimeoutError:
        return HealthCheck("listener", False, f"no notification came back within {seconds:g} s")
    except RegistryError as exc:
        return HealthCheck("listener", False, f"LISTEN/NOTIFY failed: {exc}")
    return HealthCheck("listener", True, f"LISTEN/NOTIFY round trip in {_milliseconds(started)}")


def _milliseconds(since: float) -> str:
    return f"{(time.monotonic() - since) * 1000:.0f} ms"


def _reason(exc: BaseException, seconds: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {seconds:g} s"
    return str(exc)
