"""Lifetimes as blocks: a run's, :class:`RunScope` (``async with runs.run(...) as run:``),
and the registry's own, :class:`Connecting` (``async with RunRegistry.connect(url) as runs:``).

The scope registers the run (or takes a resumed or adopted handle), waits its turn when it
was queued, and on exit records how the run ended, so that a run body needs no try/except of
its own:

========================================  ===================================================
the block ends with                        the run
========================================  ===================================================
no exception                               ``completed`` (``cancelled`` if its cancel was
                                           seen)
the run's cancel or supersede (the scope   ``cancelled`` (a superseded run stays
cancels the body; or the body raised       ``superseded``); the cancel is absorbed
``RunCancelledError``)
a ``RunEndedError`` (a publish after a     left as it is (nothing overwritten); absorbed
supersede, a lease lost)
another exception                          ``failed``, the exception's summary as reason;
                                           re-raised
``CancelledError`` from elsewhere          ``interrupted``; re-raised
the registry closing (``CancelledError``   left ``active`` for adoption (``close`` released
or ``RegistryClosedError``)                its lease); ``RegistryClosedError`` absorbed
========================================  ===================================================

A queued run cancelled (or deleted) before its turn never becomes active, and a block cannot
be skipped in Python: entering the scope raises :class:`RunNotStartedError` (a
``RunEndedError``), and the block does not run; nothing is left to record. Catch it around
the ``async with`` where a queued run may be cancelled.

Outcomes are written fenced by the run's owner epoch, and only over an active run: a run that
ended meanwhile keeps the outcome it has.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from registry import telemetry
from registry.errors import (
    RegistryClosedError,
    RegistryError,
    RunCancelledError,
    RunEndedError,
)
from registry.handle import RunCancellationToken, RunHandle
from registry.models import RunOutcome, RunStatus, failure_summary

logger = logging.getLogger(__name__)


class _Closable(Protocol):
    async def close(self) -> None: ...


_Opened = TypeVar("_Opened", bound=_Closable)


#: the reason recorded for a run whose task was cancelled by something else than the run
INTERRUPTED_REASON = "the task running the run was cancelled"


class RunScope:
    """The block a run body runs in; see the module's table for what its exit records.

    ``start`` gives the run's handle (a register, or a handle resumed or adopted), ``closed``
    tells whether the registry is closing. With ``cancel_body`` (the default), a cancel,
    supersede or lost lease of the run cancels the task running the block, wherever it
    awaits. Entering raises what ``start`` raises, and for a queued run what
    ``RunHandle.wait_active`` raises: :class:`RunNotStartedError` if the run was cancelled
    before its turn (the block does not run), :class:`LeaseLostError` if another registry
    took it over meanwhile (a cancel of the entering task cancels the queued run, which then
    never becomes active). A scope is entered once.
    """

    def __init__(
        self,
        start: Callable[[], Awaitable[RunHandle]],
        closed: Callable[[], bool],
        *,
        cancel_body: bool = True,
    ) -> None:
        self._start = start
        self._closed = closed
        self._cancel_body = cancel_body
        self._handle: RunHandle | None = None
        self._token: RunCancellationToken | None = None
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopped_body = False
        self._span: telemetry.RunSpan | None = None

    async def __aenter__(self) -> RunHandle:
        if self._handle is not None:
            raise RuntimeError("a run scope is entered once")
        handle = await self._start()
        if handle.record.status is RunStatus.QUEUED:
            try:
                await handle.wait_active()
            except BaseException:
                if not self._closed():
                    await _quietly(handle.cancel(), handle, "cancel the queued run")
                raise
        self._handle = handle
        self._span = telemetry.RunSpan(
            handle.telemetry_target, run_id=handle.run_id, thread_id=handle.thread_id
        )
        self._token = handle.cancellation_token()
        self._task = asyncio.current_task()
        if self._cancel_body:
            self._watcher = asyncio.create_task(self._stop_body_on_cancel(self._token))
        return handle

    async def _stop_body_on_cancel(self, token: RunCancellationToken) -> None:
        try:
            await token.wait()
        except RegistryClosedError:
            return  # a shutdown: the block ends as the registry's close makes it
        assert self._task is not None
        self._stopped_body = True
        self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        assert self._span is not None
        try:
            absorbed = await self._exit(exc)
        except BaseException as error:
            self._span.end(error)
            raise
        self._span.end(None if absorbed else exc)
        return absorbed

    async def _exit(self, exc: BaseException | None) -> bool:
        # whether the block's exception is absorbed (the module's table)
        handle, token, task = self._handle, self._token, self._task
        assert handle is not None
        assert token is not None
        assert task is not None
        if self._watcher is not None:
            self._watcher.cancel()  # before any await: it must not cancel the exit itself
        # our own cancel of the body is spent here; any other cancel stays pending on the task
        ours = self._stopped_body and task.uncancel() == 0
        if self._closed():
            # shutdown: the run stays active; close() released the lease, so it is adopted
            if exc is None:
                logger.warning(
                    "run %s ended after the registry closed: it stays active until adopted",
                    handle.run_id,
                    extra=_log_fields(handle),
                )
            return isinstance(exc, RegistryClosedError)
        if token.lease_lost:
            return ours or isinstance(exc, RunEndedError | RunCancelledError)
        reason: str | None = None
        if exc is None:
            outcome = RunOutcome.CANCELLED if token.is_cancelled() else RunOutcome.COMPLETED
        elif ours or isinstance(exc, RunCancelledError):
            outcome = RunOutcome.CANCELLED
        elif isinstance(exc, asyncio.CancelledError) and token.is_cancelled():
            outcome = RunOutcome.CANCELLED  # the caller stopped the body on the run's cancel
        elif isinstance(exc, asyncio.CancelledError):
            outcome, reason = RunOutcome.INTERRUPTED, INTERRUPTED_REASON
        elif isinstance(exc, Exception):
            outcome, reason = RunOutcome.FAILED, failure_summary(exc)
        else:
            return False  # KeyboardInterrupt, SystemExit: the process ends, the run is adopted
        finished = await self._finish(handle, outcome, reason, raise_errors=exc is None)
        if ours or isinstance(exc, RunCancelledError):
            return True
        return isinstance(exc, RunEndedError) and not finished

    async def _finish(
        self, handle: RunHandle, outcome: RunOutcome, reason: str | None, *, raise_errors: bool
    ) -> bool:
        # shielded: a second cancel of the task must not leave the run active and held here
        finishing = asyncio.ensure_future(handle.finish(outcome, reason))
        try:
            return await asyncio.shield(finishing)
        except RunEndedError:
            return False  # another registry took the run over: its outcome is not ours
        except asyncio.CancelledError:
            finishing.add_done_callback(_log_failure)
            raise
        except RegistryError:
            if raise_errors:
                raise
            # the body's own exception is what the caller must see; the lease expires and
            # the run is adopted
            logger.warning(
                "could not record run %s as %s",
                handle.run_id,
                outcome.value,
                exc_info=True,
                extra=_log_fields(handle),
            )
            return False


def _log_fields(handle: RunHandle) -> dict[str, str]:
    return telemetry.log_fields(handle.run_id, handle.thread_id, handle.record.owner_id)


def _log_failure(task: asyncio.Future[bool]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("recording a run's outcome failed", exc_info=task.exception())


async def _quietly(action: Awaitable[object], handle: RunHandle, what: str) -> None:
    # on the way out of a failed enter: the original error is what the caller must see
    try:
        await asyncio.shield(action)
    except (RegistryError, asyncio.CancelledError):
        logger.warning(
            "could not %s %s", what, handle.run_id, exc_info=True, extra=_log_fields(handle)
        )


class Connecting(Generic[_Opened]):
    """What ``RunRegistry.connect`` returns: await it for the registry, or use it as
    ``async with`` to have the registry closed when the block ends (however it ends)."""

    def __init__(self, open_registry: Callable[[], Coroutine[Any, Any, _Opened]]) -> None:
        self._open = open_registry
        self._registry: _Opened | None = None

    def __await__(self) -> Generator[Any, None, _Opened]:
        return self._open().__await__()

    async def __aenter__(self) -> _Opened:
        self._registry = await self._open()
        return self._registry

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._registry is not None:
            await self._registry.close()
