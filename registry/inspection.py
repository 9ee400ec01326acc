"""The operator's calls: :class:`RegistryInspector`.

The base of :class:`~registry.registry.RunRegistry`: it owns the connection lane and the
closed flag, and answers the questions operators, the CLI and the demo ask (runs in any
status, decisions, the audit trail, stored chunks). Its one write is :meth:`prune`, on the
history of ended runs; it starts no background work, so the facade above it stays about the
run API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

from registry import repository
from registry.connections import ConnectionLane
from registry.database import DriverConnection
from registry.errors import InvalidInputError, RegistryClosedError
from registry.models import RunRecord, RunStatus, StreamChunk, check_count, check_id
from registry.settings import RegistrySettings

_T = TypeVar("_T")

#: streams (runs) whose chunks one retention transaction deletes
PRUNE_BATCH_RUNS = 100


class RegistryInspector:
    """Operator calls over the registry's tables: snapshot reads, and pruning of history.

    Each call raises :class:`InvalidInputError` for a bad argument,
    :class:`DatabaseUnavailableError` when the server cannot be reached (after one retry on a
    fresh connection), and :class:`RegistryClosedError` after :meth:`close`.
    """

    def __init__(self, *, dsn: str, settings: RegistrySettings) -> None:
        self.settings = settings
        self._dsn = dsn
        self._lane = ConnectionLane(
            dsn,
            settings.pool_size,
            call_timeout=settings.call_timeout,
            statement_cache_size=settings.statement_cache_size,
        )
        self._closed = False

    async def close(self) -> None:
        """Close every connection. Idempotent."""
        self._closed = True
        await self._lane.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (it may still be in progress)."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryClosedError()

    async def _active_run_of_thread(self, thread_id: str, agent_id: str | None) -> RunRecord | None:
        # the seed's ownership check: another agent's run is no run at all
        check_id("thread_id", thread_id)
        if agent_id is not None:
            check_id("agent_id", agent_id)
        record = await self._retry_once(
            lambda connection: repository.active_run_by_thread(connection, thread_id)
        )
        return None if record is None or agent_id not in (None, record.agent_id) else record

    async def _retry_once(self, operation: Callable[[DriverConnection], Awaitable[_T]]) -> _T:
        # repeatable reads: once more on a fresh connection after a server restart
        self._check_open()
        return await self._lane.retry_once(operation)

    async def server_version(self) -> int:
        """The server's ``server_version_num`` (for example 150019)."""
        return await self._retry_once(repository.server_version)

    async def audited_decision_counts(self) -> dict[str, int]:
        """Decisions per status through the ``decision_audit`` view, every status present:
        what a role with only the auditor's grants may count."""
        return await self._retry_once(repository.audited_decision_counts)

    async def schema_revision(self) -> str | None:
        """The Alembic revision the database is at, ``None`` before the first migration."""
        return await self._retry_once(repository.schema_revision)

    async def run(self, run_id: str) -> RunRecord | None:
        """The row of ``run_id`` in any status (active or history), or ``None``."""
        check_id("run_id", run_id)
        return await self._retry_once(lambda connection: repository.run_by_id(connection, run_id))

    async def run_details(self, run_id: str) -> dict[str, Any] | None:
        """Every column of the run's row plus ``stored_chunks`` (``stream_seq`` is the newest
        chunk's seq, ``None`` when it has no stream or it was pruned); ``None`` if no such run."""
        check_id("run_id", run_id)
        return await self._retry_once(lambda connection: repository.run_details(connection, run_id))

    async def list_runs(
        self,
        *,
        thread_id: str | None = None,
        agent_id: str | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        """Runs in any status matching every filter given, newest first, at most ``limit``."""
        for field, value in (("thread_id", thread_id), ("agent_id", agent_id)):
            if value is not None:
                check_id(field, value)
        if status is not None and not isinstance(status, RunStatus):
            raise InvalidInputError("status", "expected a RunStatus")
        check_count("limit", limit, minimum=1)
        return await self._retry_once(
            lambda connection: repository.list_runs(
                connection, thread_id=thread_id, agent_id=agent_id, status=status, limit=limit
            )
        )

    async def status_counts(self) -> dict[str, dict[str, int]]:
        """Rows per status, every status present: ``{"runs": {...}, "decisions": {...}}``."""
        return await self._retry_once(repository.status_counts)

    async def decisions_of_run(self, run_id: str) -> list[dict[str, Any]]:
        """Every decision row of a run in forward order, ``result`` decoded (the audit trail)."""
        check_id("run_id", run_id)
        return await self._retry_once(
            lambda connection: repository.decisions_of_run(connection, run_id)
        )

    async def audit_trail(
        self,
        *,
        run_id: str | None = None,
        thread_id: str | None = None,
        agent_id: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Rows of the ``decision_audit`` view matching every filter given, oldest first;
        with ``limit``, only the newest ``limit``. Latencies are ``timedelta``."""
        for field, value in (("run_id", run_id), ("thread_id", thread_id), ("agent_id", agent_id)):
            if value is not None:
                check_id(field, value)
        if since is not None and not isinstance(since, datetime):
            raise InvalidInputError("since", "expected a datetime")
        if limit is not None:
            check_count("limit", limit, minimum=1)
        return await self._retry_once(
            lambda connection: repository.audit_trail(
                connection,
                run_id=run_id,
                thread_id=thread_id,
                agent_id=agent_id,
                since=since,
                limit=limit,
            )
        )

    async def read_chunks(
        self, run_id: str, *, after: int = 0, limit: int = 1000
    ) -> list[StreamChunk]:
        """The run's stored chunks with seq > ``after``, in order, at most ``limit``."""
        check_id("run_id", run_id)
        check_count("after", after, minimum=0)
        check_count("limit", limit, minimum=1)
        return await self._retry_once(
            lambda connection: repository.read_chunks(connection, run_id, after=after, limit=limit)
        )

    async def prune(self, older_than: timedelta) -> int:
        """Delete the stream chunks of runs that ended more than ``older_than`` ago.

        Returns how many chunks were deleted. Active runs' streams and decisions (the audit
        trail) are never touched; a pruned stream can no longer be subscribed to. Deletes
        ``PRUNE_BATCH_RUNS`` streams per transaction, oldest first, and pauses between batches
        as long as each took (so a large backlog takes about twice its working time, and
        publishers are not stalled behind it); each batch is committed, so an interrupted
        prune keeps what it did and the next one goes on. Safe to run from several places at
        once (they take disjoint batches).
        """
        if not isinstance(older_than, timedelta) or older_than < timedelta(0):
            raise InvalidInputError("older_than", "must be a non-negative timedelta")
        self._check_open()
        deleted = 0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            async with self._lane.autocommit(write=True) as connection:
                batch = await repository.prune_streams(connection, older_than, PRUNE_BATCH_RUNS)
            deleted += batch.chunks
            if batch.runs < PRUNE_BATCH_RUNS:
                return deleted
            # paced: as long idle as the batch took, so publishers' commits (and their WAL
            # flushes) are never queued behind a retention run for long
            await asyncio.sleep(loop.time() - started)
