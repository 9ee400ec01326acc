"""Tunables of a registry: :class:`RegistrySettings`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Self

from registry.errors import InvalidInputError
from registry.models import checked_schema
from registry.notifications import MAX_INLINE_BYTES


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """Tunables of a :class:`RunRegistry`; the defaults suit an agent server.

    ``safety_interval``: seconds between re-reads of the tables for every waiting token and
    inbox, so a lost notification costs at most this much latency, never correctness.
    ``health_interval``: seconds between round trips that check the LISTEN connection.
    ``max_decisions_per_forward``: larger forwards raise :class:`TooManyDecisionsError`.
    ``max_result_bytes``: largest JSON-encoded ``result`` of one decision.
    ``lease_seconds``: how long a run's owner claim lasts without renewal.
    ``heartbeat_interval``: seconds between lease renewals of all runs this worker owns (one
    statement each time); keep it well under ``lease_seconds``.
    ``max_delivery_attempts``: a decision delivered this many times without an ack is dropped
    as dead-lettered instead of being delivered again.
    ``pool_size``: query connections this registry keeps open at most.
    ``inbox_batch``: how many decisions an inbox claims per round trip.
    ``max_chunk_bytes``: largest stream chunk; larger raises :class:`InvalidInputError`.
    ``stream_notify_window``: seconds during which one run's chunk notifications from this
    process are coalesced into one (a NOTIFY takes a database-wide lock at commit).
    ``inline_chunk_bytes``: chunks up to this size travel inside their notification.
    ``subscriber_buffer``: inline chunks a subscriber holds before it reads the table instead.
    ``stream_read_batch``: chunks a subscriber reads per round trip.
    ``call_timeout``: seconds each database call may take, waiting for a connection and
    connecting included; past it the call raises :class:`DatabaseUnavailableError` (a server
    that stopped answering, a half-open socket) and its connection is discarded.
    ``close_timeout``: seconds :meth:`RunRegistry.close` spends on each goodbye to the server
    (the last flush, the lease release) before it gives up on it and closes anyway.
    ``statement_cache_size``: asyncpg's prepared statement cache per query connection; set 0
    behind pgbouncer in ``pool_mode=transaction`` (unless it is 1.21+ with
    ``max_prepared_statements`` set), so every statement is an unnamed one.
    ``schema``: the PostgreSQL schema that holds the registry's tables (a plain lower-case
    identifier); ``None`` takes the URL's ``schema`` parameter, else ``REGISTRY_SCHEMA``, else
    ``registry``. A URL that names another schema raises :class:`InvalidInputError`.
    """

    safety_interval: float = 1.0
    health_interval: float = 2.0
    max_decisions_per_forward: int = 1000
    max_result_bytes: int = 1_048_576
    lease_seconds: float = 15.0
    heartbeat_interval: float = 5.0
    max_delivery_attempts: int = 5
    pool_size: int = 10
    inbox_batch: int = 100
    max_chunk_bytes: int = 1_048_576
    stream_notify_window: float = 0.005
    inline_chunk_bytes: int = 3000
    subscriber_buffer: int = 1024
    stream_read_batch: int = 1000
    call_timeout: float = 5.0
    close_timeout: float = 5.0
    statement_cache_size: int = 100
    schema: str | None = None

    def __new__(cls, *args: object, **kwargs: object) -> Self:
        # before the generated __init__, which refuses a misspelt setting with a bare TypeError
        known = {setting.name for setting in fields(cls)}
        for name in kwargs:
            if name not in known:
                raise InvalidInputError(name, "is not a setting of RegistrySettings")
        return object.__new__(cls)  # not super(): slots=True makes a new class

    def __post_init__(self) -> None:
        for setting in fields(self):
            if setting.type not in ("int", "float"):
                continue  # checked on their own below (the schema)
            value = getattr(self, setting.name)
            kinds = (int,) if setting.type == "int" else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds):
                what = "an integer" if kinds == (int,) else "a number"
                raise InvalidInputError(setting.name, f"must be {what}")
        for name in (
            "safety_interval",
            "health_interval",
            "lease_seconds",
            "heartbeat_interval",
            "call_timeout",
            "close_timeout",
        ):
            if not getattr(self, name) > 0:
                raise InvalidInputError(name, "must be a positive number of seconds")
        if not self.stream_notify_window >= 0:
            raise InvalidInputError("stream_notify_window", "must not be negative")
        for name in (
            "max_decisions_per_forward",
            "max_result_bytes",
            "pool_size",
            "inbox_batch",
            "max_chunk_bytes",
            "subscriber_buffer",
            "stream_read_batch",
            "max_delivery_attempts",
        ):
            if not getattr(self, name) >= 1:
                raise InvalidInputError(name, "must be at least 1")
        if not self.statement_cache_size >= 0:
            raise InvalidInputError("statement_cache_size", "must not be negative")
        if self.schema is not None:
            checked_schema(self.schema)
        if self.heartbeat_interval >= self.lease_seconds:
            raise InvalidInputError("heartbeat_interval", "must be shorter than lease_seconds")
        if not 0 <= self.inline_chunk_bytes <= MAX_INLINE_BYTES:
            raise InvalidInputError(
                "inline_chunk_bytes", f"must be between 0 and {MAX_INLINE_BYTES}"
            )
